"""The AN paper's published figures as data, for the tools that print them beside ours.

``imagenet_top1.csv`` (read by ``tools/make_table.py``) holds the ImageNet tables; ``model_size.csv`` (read by
``tools/model_stats.py``) the published parameter counts and FLOPs. Lines starting with ``#`` are comments; an
empty cell means the paper gives no figure.
"""

from __future__ import annotations

import csv
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read_figures(name: str) -> list[dict[str, str]]:
    """The rows of ``tools/paper/<name>`` as dicts keyed by its header, comment lines skipped."""
    with open(HERE / name, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def figure(cell: str) -> float | None:
    """A numeric cell, or None where it is empty (no published figure)."""
    return float(cell) if cell.strip() else None
