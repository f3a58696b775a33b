#!/usr/bin/env python
"""Sorts the official flat ImageNet validation folder into class sub-folders, from a ground-truth file.

Ground truth, either format:

* ``LOC_val_solution.csv`` (Kaggle/ILSVRC localization): a header ``ImageId,PredictionString`` and rows
  ``ILSVRC2012_val_00000001,n01751748 x y x y n01751748 ...``; the first token of the prediction
  string is the class;
* a plain list, one ``filename label`` per line (space, tab or comma separated), the label being a
  synset or any class folder name; the file name may carry its extension or not.

Every image ``VAL_DIR/<id>.JPEG`` is moved (never copied, never deleted) to ``VAL_DIR/<class>/<id>.JPEG``.
An existing destination is never overwritten (reported as a conflict, exit code 1). Images missing
from the ground truth stay where they are and are listed. A second run finds nothing to move and
succeeds, so the tool is safe to re-run after an interruption.

Usage::

    python tools/prepare_imagenet.py /data/imagenet/val LOC_val_solution.csv [--dry-run]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `python tools/...` anywhere

from data.folder import is_image_file
from engine.errors import main_guard
from tools.listing import show_list


class GroundTruthError(ValueError):
    """The ground-truth file cannot be used; the message says why."""


def _image_id(name: str) -> str:
    base = os.path.basename(name.strip())
    return os.path.splitext(base)[0] if is_image_file(base) else base


def _check_label(label: str, where: str) -> str:
    if not label or label in (".", "..") or "/" in label or "\\" in label or label.startswith("."):
        raise GroundTruthError(f"{where}: '{label}' cannot be a class folder name")
    return label


def read_ground_truth(path: Path) -> dict[str, str]:
    """Maps image id (file name without extension) to class folder name.

    Raises:
        GroundTruthError: unreadable format, a line without a label, or one image given two classes.
    """
    text = path.read_text(encoding="utf-8-sig")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise GroundTruthError(f"{path} is empty")
    labels: dict[str, str] = {}

    def add(image: str, label: str, where: str) -> None:
        key = _image_id(image)
        label = _check_label(label, where)
        if labels.setdefault(key, label) != label:
            raise GroundTruthError(f"{where}: {key} is given two classes, {labels[key]} and {label}")

    header = [h.strip() for h in lines[0].split(",")]
    if header[:2] == ["ImageId", "PredictionString"]:
        for n, row in enumerate(csv.reader(lines[1:]), start=2):
            if len(row) < 2 or not row[1].split():
                raise GroundTruthError(f"{path}:{n}: expected 'ImageId,PredictionString', got {','.join(row)!r}")
            add(row[0], row[1].split()[0], f"{path}:{n}")
        return labels
    for n, line in enumerate(lines, start=1):
        parts = line.replace(",", " ").split()
        if len(parts) == 1:
            raise GroundTruthError(
                f"{path}:{n}: one token per line ({parts[0]!r}). This looks like the devkit's "
                f"ILSVRC2012_validation_ground_truth.txt (class numbers in devkit order, no file names), which "
                f"this tool does not read; use LOC_val_solution.csv or a 'filename label' list."
            )
        add(parts[0], parts[1], f"{path}:{n}")
    return labels


@dataclass
class Plan:
    """What a run would do."""

    moves: list[tuple[Path, Path]] = field(default_factory=list)
    conflicts: list[tuple[Path, Path]] = field(default_factory=list)
    unmatched: list[Path] = field(default_factory=list)
    sorted_already: int = 0
    misplaced: list[tuple[Path, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def make_plan(val_dir: Path, labels: dict[str, str]) -> Plan:
    """Compares the folder with the ground truth."""
    plan = Plan()
    found: set[str] = set()
    with os.scandir(val_dir) as entries:
        entries = sorted(entries, key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir() and not entry.name.startswith("."):
            with os.scandir(entry.path) as inner:
                for f in inner:
                    if f.is_file() and is_image_file(f.name):
                        key = _image_id(f.name)
                        found.add(key)
                        plan.sorted_already += 1
                        if key in labels and labels[key] != entry.name:
                            plan.misplaced.append((Path(f.path), labels[key]))
        elif entry.is_file() and is_image_file(entry.name):
            key = _image_id(entry.name)
            if key not in labels:
                plan.unmatched.append(Path(entry.path))
                continue
            found.add(key)
            dst = val_dir / labels[key] / entry.name
            if dst.exists():
                plan.conflicts.append((Path(entry.path), dst))
            else:
                plan.moves.append((Path(entry.path), dst))
    plan.missing = sorted(set(labels) - found)
    return plan


def execute(plan: Plan) -> int:
    """Moves the planned images; returns how many moved. Refuses to overwrite (a race adds a conflict)."""
    moved = 0
    for src, dst in plan.moves:
        dst.parent.mkdir(exist_ok=True)
        try:
            os.link(src, dst)  # fails if dst exists: no overwrite, even in a race
        except FileExistsError:
            plan.conflicts.append((src, dst))
            continue
        except OSError:  # no hard links on this file system: check, then rename
            if dst.exists():
                plan.conflicts.append((src, dst))
                continue
            os.rename(src, dst)
            moved += 1
            continue
        os.unlink(src)
        moved += 1
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("val_dir", type=Path, help="the validation folder (flat, or partly sorted)")
    parser.add_argument("ground_truth", type=Path, help="LOC_val_solution.csv or a 'filename label' list")
    parser.add_argument("--dry-run", action="store_true", help="report what would move; change nothing")
    args = parser.parse_args(argv)
    if not args.val_dir.is_dir():
        print(f"error: {args.val_dir} is not a folder", file=sys.stderr)
        return 2
    try:
        labels = read_ground_truth(args.ground_truth)
    except (OSError, GroundTruthError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = make_plan(args.val_dir, labels)
    classes = Counter(dst.parent.name for _, dst in plan.moves)
    if args.dry_run:
        print(f"[dry run] would move {len(plan.moves)} images into {len(classes)} class folders")
    else:
        moved = execute(plan)
        print(f"moved {moved} images into {len(classes)} class folders of {args.val_dir}")
    print(
        f"{plan.sorted_already} images were already in class folders; {len(set(labels.values()))} classes "
        f"in the ground truth ({len(labels)} images)"
    )
    if not plan.moves and not plan.conflicts and not plan.unmatched:
        print("nothing to do: the folder is sorted")
    if plan.unmatched:
        print(
            f"warning: {len(plan.unmatched)} images are not in the ground truth and were left in place:\n"
            f"{show_list(plan.unmatched)}"
        )
    if plan.missing:
        print(f"warning: {len(plan.missing)} ground-truth images were not found:\n{show_list(plan.missing)}")
    if plan.misplaced:
        print(
            f"warning: {len(plan.misplaced)} images sit in a class folder that disagrees with the ground truth "
            f"(not moved):\n{show_list([f'{p} (ground truth: {c})' for p, c in plan.misplaced])}"
        )
    if plan.conflicts:
        print(
            f"error: {len(plan.conflicts)} images were not moved because the destination exists (never "
            f"overwritten; compare and remove one copy by hand):\n"
            f"{show_list([f'{s} -> {d}' for s, d in plan.conflicts])}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
