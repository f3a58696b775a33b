"""Plot a run's log.jsonl: training loss, learning rate, validation accuracy and throughput per epoch.

python tools/plot_run.py runs/resnet50_an                  # writes runs/resnet50_an/curves.png
python tools/plot_run.py runs/r50_bn runs/r50_an --out compare.png   # several runs on one figure
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `python tools/...` anywhere

from engine.errors import main_guard


def read_log(run: Path) -> list[dict]:
    path = run / "log.jsonl" if run.is_dir() else run
    if not path.exists():
        raise SystemExit(f"plot_run: {path} does not exist (a run folder holds log.jsonl after its first epoch)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise SystemExit(f"plot_run: {path}:{n} is not a JSON line") from None
    if not records:
        raise SystemExit(f"plot_run: {path} is empty")
    return records


PANELS = [
    ("train loss", [("train_loss", "")]),
    ("learning rate (end of epoch)", [("lr", "")]),
    ("validation top-1 (%)", [("val_top1", ""), ("ema_top1", " EMA")]),
    ("validation top-5 (%)", [("val_top5", ""), ("ema_top5", " EMA")]),
    ("images / s", [("images_per_sec", " total"), ("compute_images_per_sec", " compute")]),
    ("peak memory (MiB)", [("peak_memory_mb", "")]),
]


def plot(runs: dict[str, list[dict]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, series) in zip(axes.flat, PANELS):
        for name, records in runs.items():
            for key, suffix in series:
                points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
                if points:
                    xs, ys = zip(*points)
                    label = f"{name}{suffix}" if len(runs) > 1 or suffix else None
                    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    best = {name: max((r.get("val_top1") or -1) for r in records) for name, records in runs.items()}
    fig.suptitle("   ".join(f"{n}: best top-1 {b:.2f}" for n, b in best.items() if b >= 0))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (or log.jsonl files)")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN/curves.png for one run)")
    args = parser.parse_args(argv)
    runs = {Path(r).name if Path(r).is_dir() else Path(r).parent.name: read_log(Path(r)) for r in args.runs}
    if args.out:
        out = Path(args.out)
    elif len(args.runs) == 1:
        first = Path(args.runs[0])
        out = (first if first.is_dir() else first.parent) / "curves.png"
    else:
        raise SystemExit("plot_run: with several runs, pass --out FILE.png")
    print(plot(runs, out))
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
