"""Two real processes (spawn, gloo): exact validation counts and the same global training batches as one process."""

from __future__ import annotations

import hashlib
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data
from engine.config import Config
from tests.conftest import data_config
from tests.image_folders import make_image_folder


def make_cfg(root, batch_size) -> Config:
    return data_config(root, "torch", seed=11, batch_size=batch_size, eval_batch_size=2)


def digest(images: torch.Tensor) -> list[str]:
    return [hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest() for img in images]


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with data.build_loaders(make_cfg(root, batch_size=2), rank=rank, world_size=world) as ld:
            count = torch.zeros(1, dtype=torch.int64)
            keys = []
            for images, labels in ld.val:
                count += labels.numel()
                keys += digest(images)
            dist.all_reduce(count)
            all_keys = [None] * world
            dist.all_gather_object(all_keys, keys)
            steps = [digest(x) for x, _ in ld.train.epoch(1)]
            all_steps = [None] * world
            dist.all_gather_object(all_steps, steps)
            if rank == 0:
                with open(out, "w") as f:
                    json.dump(
                        {"count": int(count), "total": ld.val.total_samples, "val": all_keys, "train": all_steps}, f
                    )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_validation_exact_and_same_global_batches(tmp_path):
    root = make_image_folder(tmp_path / "ds", train_per_class=[5, 4, 4], val_per_class=[3, 2, 2])
    out = tmp_path / "result.json"
    mp.spawn(_worker, args=(2, free_port(), str(root), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())

    with data.build_loaders(make_cfg(root, batch_size=4)) as single:
        val_ref = [k for x, _ in single.val for k in digest(x)]
        train_ref = [digest(x) for x, _ in single.train.epoch(1)]

    assert result["count"] == result["total"] == 7  # odd: ranks hold 4 and 3 images, no padding
    seen = result["val"][0] + result["val"][1]
    assert len(result["val"][0]) == 4 and len(result["val"][1]) == 3
    assert sorted(seen) == sorted(val_ref) and len(set(seen)) == 7
    rank0, rank1 = result["train"]
    assert len(rank0) == len(rank1) == len(train_ref) == 13 // 4
    for step, ref in enumerate(train_ref):
        assert sorted(rank0[step] + rank1[step]) == sorted(ref)  # bitwise-identical augmented images
