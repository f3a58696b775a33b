#!/usr/bin/env python
"""Measures the throughput (images per second) of a data backend, warm-up steps excluded.

With ``--make-jpegs DIR`` it first writes ImageNet-like JPEGs (500x375, quality 90, multi-scale
smoothed noise: ~90 KB each, close to ImageNet's typical file size) in the ImageNet layout under DIR
(``val/`` holds hard links to the same files; skipped when DIR already holds them) and then
measures on DIR. ``--split val`` measures the evaluation pipeline instead of the training one.

The loop only pulls batches (no model), so the figure is the loader's ceiling on this machine. On
CUDA the device is synchronized before each clock reading. One JSON line with the result is printed last.

Usage::

    python tools/bench_loader.py --make-jpegs /tmp/bench --num-images 500 --classes 10 \\
        --backend dali_cpu --batch-size 64 --steps 20 --workers 2
    python tools/bench_loader.py --data-root /data/imagenet --backend dali --device cuda --batch-size 256 --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `python tools/...` anywhere

import data
from data.folder import list_classes
from engine.config import Config
from engine.errors import main_guard

JPEG_SIZE = (500, 375)


def natural_image(rng: np.random.Generator, width: int = JPEG_SIZE[0], height: int = JPEG_SIZE[1]) -> Image.Image:
    """Smoothed multi-scale color noise: large blobs plus fine texture, like an out-of-focus photo."""
    acc = np.zeros((height, width, 3), np.float32)
    for cells, amp in ((4, 1.0), (12, 0.6), (40, 0.4), (125, 0.45), (250, 0.45)):
        coarse = rng.standard_normal((max(2, cells * height // width), cells, 3)).astype(np.float32)
        for c in range(3):
            layer = Image.fromarray(coarse[:, :, c], mode="F").resize((width, height), Image.Resampling.BICUBIC)
            acc[:, :, c] += amp * np.asarray(layer)
    acc += 0.18 * rng.standard_normal((height, width, 3)).astype(np.float32)
    acc = (acc - acc.mean()) / (acc.std() + 1e-6)
    return Image.fromarray(np.clip(128 + 48 * acc, 0, 255).astype(np.uint8))


def make_jpegs(root: Path, num_images: int, classes: int, seed: int = 0) -> Path:
    """Writes ``num_images`` JPEGs over ``classes`` classes to ``train/``; ``val/`` gets links to the same files."""
    if all(len(list((root / s).glob("*/*.JPEG"))) == num_images for s in ("train", "val")):
        return root
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        name = f"n{i % classes:08d}"
        (root / "train" / name).mkdir(parents=True, exist_ok=True)
        (root / "val" / name).mkdir(parents=True, exist_ok=True)
        src, dst = root / "train" / name / f"img_{i:06d}.JPEG", root / "val" / name / f"img_{i:06d}.JPEG"
        natural_image(rng).save(src, quality=90)
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return root


def bench(cfg: Config, device, steps: int, warmup: int, split: str, memory_format) -> dict:
    """Pulls ``warmup + steps`` batches (several epochs if needed) and times the last ``steps``."""
    import torch

    with data.build_loaders(
        cfg, device=device, memory_format=memory_format, build_train=split == "train", build_val=split == "val"
    ) as loaders:

        def batches():
            epoch = 0
            while True:
                yield from (loaders.train.epoch(epoch) if split == "train" else loaders.val)
                epoch += 1

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        images = 0
        t_start = time.perf_counter()
        t0 = None
        for i, (x, _) in enumerate(batches()):
            if i == warmup:
                sync()
                t0 = time.perf_counter()
                images = 0
            if i >= warmup:
                images += x.shape[0]
            if i + 1 == warmup + steps:
                break
        sync()
        t1 = time.perf_counter()
    if t0 is None:  # fewer batches than the warm-up: time them all
        t0 = t_start
    return {"images": images, "seconds": t1 - t0, "images_per_sec": images / (t1 - t0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, help="dataset root (ImageNet layout)")
    parser.add_argument("--backend", default="torch", choices=data.BACKENDS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed batches")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--workers", type=int, default=4, help="loader processes (torch) or DALI threads")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--split", default="train", choices=("train", "val"), help="training or eval pipeline")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--make-jpegs", type=Path, metavar="DIR", help="write ImageNet-like JPEGs to DIR first")
    parser.add_argument("--num-images", type=int, default=500, help="with --make-jpegs: training images")
    parser.add_argument("--classes", type=int, default=10, help="with --make-jpegs: classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads of the main process (default: torch's)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    if args.make_jpegs:
        t = time.perf_counter()
        args.data_root = make_jpegs(args.make_jpegs, args.num_images, args.classes, args.seed)
        print(f"JPEGs ready in {args.data_root} ({time.perf_counter() - t:.1f} s)")
    if args.data_root is None and args.backend != "synthetic":
        parser.error("--data-root or --make-jpegs is required (except for --backend synthetic)")
    device = torch.device(args.device)
    cfg = Config()
    cfg.data.root = str(args.data_root or "")
    cfg.data.backend = args.backend
    cfg.data.batch_size = args.batch_size
    cfg.data.eval_batch_size = args.batch_size
    cfg.data.workers = args.workers
    cfg.data.img_size = args.img_size
    cfg.train.seed = args.seed
    if args.backend != "synthetic":
        cfg.model.num_classes = len(list_classes(Path(cfg.data.root) / args.split))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    result = bench(cfg, device, args.steps, args.warmup, args.split, memory_format)
    result.update(
        backend=args.backend,
        split=args.split,
        batch_size=args.batch_size,
        workers=args.workers,
        img_size=args.img_size,
        device=str(device),
        steps=args.steps,
        warmup=args.warmup,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
    )
    if args.backend.startswith("dali"):
        import nvidia.dali

        result["dali"] = nvidia.dali.__version__
    print(
        f"{args.backend} ({args.split}, batch {args.batch_size}, {args.workers} workers, {device}): "
        f"{result['images_per_sec']:.1f} images/s over {result['images']} images in {result['seconds']:.2f} s"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
