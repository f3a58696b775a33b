#!/usr/bin/env python
"""Scans an ImageNet-layout dataset and reports what would trouble training or evaluation.

Problems (exit code 1): a missing split, a split without class folders, an empty class, train and
val with different classes, a folder that cannot be read (permissions) or a symbolic link that loops,
a file in a class folder that is not an image (wrong extension; the loaders ignore it), an image that
cannot be decoded (each file is opened with PIL, ``verify()``-ed, then re-opened and fully decoded with
``load()``), and a class none of whose images can be decoded (the loaders stop on it). Also printed,
for information only: images per split, non-RGB images (CMYK, greyscale...), files whose content is
another format than their extension says, and the largest image (a hint for the DALI preallocation
options).

Usage::

    python tools/check_dataset.py /data/imagenet [--workers 16] [--splits train val]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `python tools/...` anywhere

from data.folder import (
    IMG_EXTENSIONS,
    SPLITS,
    DatasetError,
    entry_is_dir,
    entry_is_file,
    is_image_file,
    list_classes,
    read_dir,
)
from engine.errors import main_guard
from tools.listing import show_list

_FORMAT_OF_EXT = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
    ".ppm": "PPM",
    ".pgm": "PPM",
    ".pbm": "PPM",
}


def check_image(path: str) -> tuple[str, str | None, tuple[int, int] | None, str | None, str | None]:
    """Decodes one file: returns ``(path, error, (width, height), mode, format)``; ``error`` is None if fine."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
            return path, None, img.size, img.mode, img.format
    except Exception as e:  # PIL raises many types for bad files
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return path, f"{type(e).__name__}: {text}"[:200], None, None, None


@dataclass
class SplitReport:
    split: str
    classes: list[str] = field(default_factory=list)
    images: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    unreadable_classes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    modes: Counter = field(default_factory=Counter)
    format_mismatch: list[str] = field(default_factory=list)
    largest: tuple[int, int] = (0, 0)


def scan_split(root: Path, split: str, workers: int) -> SplitReport:
    """Checks one split folder."""
    report = SplitReport(split)
    folder = root / split
    if not folder.is_dir():
        report.problems.append(f"missing folder {folder}")
        return report
    try:
        report.classes = list_classes(folder)
    except DatasetError as e:  # the split folder cannot be listed, or holds a looping link
        report.problems.append(str(e))
        return report
    if not report.classes:
        report.problems.append(f"no class folders in {folder}")
    per_class: dict[str, list[str]] = {}
    for name in report.classes:
        files: list[str] = []
        try:
            entries = sorted(read_dir(folder / name), key=lambda e: e.name)
        except DatasetError as e:
            report.problems.append(str(e))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry_is_dir(entry):
                    report.not_images.append(f"{entry.path}/ (a sub-folder; the loaders do not look inside)")
                elif is_image_file(entry.name) and entry_is_file(entry):
                    files.append(entry.path)
                else:
                    report.not_images.append(entry.path)
            except DatasetError as e:
                report.problems.append(str(e))
        if files:
            per_class[name] = files
        else:
            report.empty_classes.append(str(folder / name))
    images = [path for files in per_class.values() for path in files]
    report.images = len(images)
    if workers > 1 and len(images) > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(check_image, images, chunksize=max(1, min(256, len(images) // (4 * workers)))))
    else:
        results = [check_image(p) for p in images]
    bad = set()
    for path, error, size, mode, fmt in results:
        if error is not None:
            report.unreadable.append((path, error))
            bad.add(path)
            continue
        report.modes[mode] += 1
        expected = _FORMAT_OF_EXT.get(os.path.splitext(path)[1].lower())
        if expected and fmt and fmt != expected and not (expected == "PPM" and fmt in ("PPM", "PGM", "PBM")):
            report.format_mismatch.append(f"{path} ({fmt} data)")
        if size[0] * size[1] > report.largest[0] * report.largest[1]:
            report.largest = size
    report.unreadable_classes = [str(folder / n) for n, files in per_class.items() if all(f in bad for f in files)]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="dataset root holding train/ and val/")
    parser.add_argument("--workers", type=int, default=1, help="processes decoding in parallel (default 1)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to check")
    parser.add_argument("--max-list", type=int, default=20, help="files listed per problem (default 20)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2

    reports = [scan_split(args.root, split, args.workers) for split in args.splits]
    problems = 0
    for r in reports:
        print(
            f"[{r.split}] {len(r.classes)} classes, {r.images} images, {len(r.unreadable)} unreadable, "
            f"{len(r.not_images)} non-image files, {len(r.empty_classes)} empty classes"
        )
        for text in r.problems:
            print(f"  problem: {text}")
        if r.unreadable:
            print(
                f"  problem: unreadable images (the torch backend skips them, DALI stops on them):\n"
                f"{show_list([f'{p} ({e})' for p, e in r.unreadable], args.max_list)}"
            )
        if r.not_images:
            print(
                f"  problem: files that are not images (extensions accepted: {', '.join(IMG_EXTENSIONS)}):\n"
                f"{show_list(r.not_images, args.max_list)}"
            )
        if r.empty_classes:
            print(f"  problem: class folders without images:\n{show_list(r.empty_classes, args.max_list)}")
        if r.unreadable_classes:
            print(
                f"  problem: class folders none of whose images can be decoded (training stops on them; replace "
                f"the images, or remove the class from train/ and val/):\n"
                f"{show_list(r.unreadable_classes, args.max_list)}"
            )
        if r.format_mismatch:
            print(
                f"  note: {len(r.format_mismatch)} files hold another format than their extension says "
                f"(both backends decode by content):\n{show_list(r.format_mismatch, args.max_list)}"
            )
        other_modes = {m: n for m, n in r.modes.items() if m != "RGB"}
        if other_modes:
            print(f"  note: non-RGB images (converted to RGB when loaded): {dict(sorted(other_modes.items()))}")
        if r.images:
            print(
                f"  note: largest image {r.largest[0]}x{r.largest[1]} (DALI hints: "
                f"data.dali_preallocate_width / data.dali_preallocate_height)"
            )
        problems += len(r.problems) + len(r.unreadable) + len(r.not_images) + len(r.empty_classes)
        problems += len(r.unreadable_classes)
    by_split = {r.split: r for r in reports}
    if "train" in by_split and "val" in by_split:
        train, val = by_split["train"].classes, by_split["val"].classes
        if train and val and train != val:
            problems += 1
            only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
            print(
                f"problem: train and val classes differ; only in train: {only_train[:10] or 'none'}, "
                f"only in val: {only_val[:10] or 'none'}"
            )
    if problems:
        print(f"FAILED: {problems} problem(s) in {args.root}")
        return 1
    print(f"OK: {args.root} is ready ({', '.join(f'{r.split} {r.images}' for r in reports)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
