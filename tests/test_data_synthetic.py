"""The ``synthetic`` backend: deterministic, sharded like real data, resumable bitwise."""

from __future__ import annotations

import pytest
import torch

import data
from engine.config import Config
from tests.conftest import collect, data_config


def make_cfg(train_size=50, val_size=11, batch_size=4, **data_kw) -> Config:
    return data_config(
        None,
        "synthetic",
        seed=1,
        num_classes=5,
        batch_size=batch_size,
        img_size=12,
        synthetic_train_size=train_size,
        synthetic_val_size=val_size,
        synthetic_bank_size=16,
        **data_kw,
    )


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_shapes_dtypes_ranges(fmt):
    cfg = make_cfg(eval_batch_size=3)
    with data.build_loaders(cfg, memory_format=fmt) as ld:
        assert ld.num_classes == 5 and ld.class_names is None and ld.steps_per_epoch == 50 // 4
        batches = collect(ld.train.epoch(0))
        assert len(batches) == 12
        lo = (0 - max(cfg.data.mean)) / min(cfg.data.std)
        hi = (1 - min(cfg.data.mean)) / min(cfg.data.std)
        for x, y in batches:
            assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32 and x.is_contiguous(memory_format=fmt)
            assert y.dtype == torch.int64 and ((y >= 0) & (y < 5)).all()
            assert lo - 1e-5 <= x.min() and x.max() <= hi + 1e-5
        val = collect(ld.val)
        assert [len(y) for _, y in val] == [3, 3, 3, 2] and ld.val.total_samples == 11


def test_sample_is_a_function_of_seed_and_index():
    with data.build_loaders(make_cfg()) as a, data.build_loaders(make_cfg()) as b:
        x1, y1 = a.train.bank.batch([0, 1, 17])
        x2, y2 = b.train.bank.batch([0, 1, 17])
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(x1[1], x1[2]) and y1[1] == y1[2]  # 17 % 16 == 1: same bank entry, same label
        assert not torch.equal(x1[0], x1[1])
    cfg = make_cfg()
    cfg.train.seed = 2
    with data.build_loaders(cfg) as c:
        assert not torch.equal(c.train.bank.batch([0])[0], x1[:1])


def test_reshuffle_resume_and_sharding():
    with data.build_loaders(make_cfg()) as ld:
        e0, e1 = collect(ld.train.epoch(0)), collect(ld.train.epoch(1))
        assert not all(torch.equal(y, y1) for (_, y), (_, y1) in zip(e0, e1))
        tail = collect(ld.train.epoch(1, start_step=5))
        assert all(torch.equal(x, xt) and torch.equal(y, yt) for (x, y), (xt, yt) in zip(e1[5:], tail))
        idx_single = ld.train.batch_indices(1)
    with (
        data.build_loaders(make_cfg(batch_size=2), rank=0, world_size=2) as r0,
        data.build_loaders(make_cfg(batch_size=2), rank=1, world_size=2) as r1,
    ):
        i0, i1 = r0.train.batch_indices(1), r1.train.batch_indices(1)
        for step in range(len(idx_single)):
            assert sorted(idx_single[step].tolist()) == sorted(i0[step].tolist() + i1[step].tolist())
        n0, n1 = r0.val.num_samples, r1.val.num_samples
        assert (n0, n1) == (6, 5)
        assert sum(len(y) for _, y in r0.val) + sum(len(y) for _, y in r1.val) == 11


def test_too_small_for_a_global_batch():
    with pytest.raises(data.DatasetError, match="synthetic_train_size"):
        data.build_loaders(make_cfg(train_size=7, batch_size=4), world_size=2)
