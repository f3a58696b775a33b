"""Lists of files in the reports of the dataset tools (tools/check_dataset.py, tools/prepare_imagenet.py)."""

from __future__ import annotations


def show_list(items: list, limit: int = 10) -> str:
    """``items`` one per line, indented by four spaces; past ``limit`` of them a last line says how many in all."""
    lines = [f"    {item}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"    ... ({len(items)} in all)")
    return "\n".join(lines)
