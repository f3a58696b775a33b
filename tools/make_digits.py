#!/usr/bin/env python
"""Builds a small real ImageFolder dataset from scikit-learn's bundled handwritten digits (the demo's data).

The 1,797 8x8 grey digits of ``sklearn.datasets.load_digits`` are upscaled (bicubic) to ``--size``
pixels, stored as RGB JPEGs in ``OUT/{train,val}/<digit>/<index>.jpg`` with classes ``0`` .. ``9``,
and split per class (stratified) with a seeded shuffle, so the split is the same on every machine.
No download is needed: the digits ship with scikit-learn.

Idempotent: a finished dataset carries ``OUT/.make_digits.json``; a second run with the same options
does nothing. The dataset is written to a temporary folder next to ``OUT`` and renamed into place,
so an interrupted run never leaves a half-written dataset behind.

Usage::

    python tools/make_digits.py --out datasets/digits [--size 32] [--val-fraction 0.2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `python tools/...` anywhere

from engine.errors import main_guard

MARKER = ".make_digits.json"


def split_indices(targets: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split: per class, a shuffled ``round(n * val_fraction)`` go to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        n_val = round(len(idx) * val_fraction)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """An 8x8 digit (values 0..16) as a ``size`` x ``size`` RGB image."""
    grey = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
    return grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def build(out: Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Writes the dataset to ``out`` (unless it is already complete) and returns its description."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    train_idx, val_idx = split_indices(digits.target, val_fraction, seed)
    meta = {
        "source": "sklearn.datasets.load_digits",
        "size": size,
        "val_fraction": val_fraction,
        "seed": seed,
        "train": len(train_idx),
        "val": len(val_idx),
        "classes": [str(c) for c in range(10)],
    }
    marker = out / MARKER
    if marker.is_file():
        existing = json.loads(marker.read_text())
        if existing == meta:
            meta["skipped"] = True
            return meta
        raise SystemExit(
            f"{out} holds a digits dataset made with other options ({existing}); remove it or choose another --out."
        )
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not an (unfinished) make_digits output; choose another --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split, indices in (("train", train_idx), ("val", val_idx)):
            for c in range(10):
                (tmp / split / str(c)).mkdir(parents=True)
            for i in indices:
                label = int(digits.target[i])
                digit_image(digits.images[i], size).save(tmp / split / str(label) / f"{i:04d}.jpg", quality=95)
        (tmp / MARKER).write_text(json.dumps(meta, indent=1))
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta["skipped"] = False
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="dataset root to create")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class in val (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    args = parser.parse_args(argv)
    if args.size < 8:
        parser.error("--size must be >= 8")
    if not 0.0 < args.val_fraction < 1.0:
        parser.error("--val-fraction must be in (0, 1)")
    meta = build(args.out, args.size, args.val_fraction, args.seed)
    state = "already complete, nothing to do" if meta["skipped"] else "written"
    print(
        f"{args.out}: {meta['train']} train + {meta['val']} val images, 10 classes, {args.size}x{args.size} ({state})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
