"""Gather eval.py results into the AN paper's ImageNet tables, our errors beside the paper's.

    python tools/make_table.py runs/*                       # markdown on stdout
    python tools/make_table.py runs/* --csv results.csv --markdown results.md
    python tools/make_table.py runs/r50_an/best.eval.json   # single result files work too

Each argument is a run folder (its ``best.eval.json`` is used, or ``last.eval.json`` with
``--which last``; the paper reports best-epoch numbers) or an eval JSON file. A result is matched to
a paper row by backbone, norm and setup (normal, or the 200-epoch "advanced" setup with label
smoothing and mixup, read from the result's recipe). Several results for one row (seeds) are
averaged and their count shown. Rows of the paper without a result are listed with "-".
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `python tools/...` anywhere

from engine.errors import main_guard
from tools.paper import figure, read_figures

# (setup, backbone label, model name, norm, paper params (M), paper GFLOPs, top-1 err, top-5 err, quoted?):
# the paper's tables, docs/AN.md 5.1 (normal: 120 epochs, MobileNetV2 150) and 5.2 (advanced: 200 epochs + label
# smoothing + mixup), from tools/paper/imagenet_top1.csv.
PAPER_ROWS = [
    (r["setup"], r["backbone"], r["model"], r["norm"], figure(r["params_m"]), figure(r["gflops"]),
     figure(r["top1_err"]), figure(r["top5_err"]), r["quoted"] == "yes")
    for r in read_figures("imagenet_top1.csv")
]  # fmt: skip
NORM_LABELS = {
    "bn": "BN",
    "gn": "GN",
    "sn": "SN",
    "se": "SE",
    "an": "AN (w/ BN)",
    "an_gn": "AN (w/ GN)",
    "iebn": "IEBN",
}
SETUP_TITLES = {
    "normal": "ImageNet-1k, normal setup (120 epochs; MobileNetV2 150)",
    "advanced": "ImageNet-1k, advanced setup (200 epochs, label smoothing 0.1, mixup 0.2)",
}


@dataclass
class Result:
    setup: str
    model: str
    norm: str
    top1: float
    top5: float
    count: int
    params: float | None  # millions
    macs: float | None  # G
    source: str


def row_norm(record: dict) -> str:
    """The table's norm label of an eval.py record: the norm, or the attention layer for BN + SE ('se')."""
    attn = record.get("attn_layer")
    if not attn:
        return record["norm"]
    return attn if record["norm"] == "bn" else f"{record['norm']}+{attn}"


def setup_of(record: dict) -> str:
    recipe = record.get("recipe") or {}
    advanced = (recipe.get("epochs") or 0) >= 200 or (recipe.get("mixup") or 0) > 0
    return "advanced" if advanced else "normal"


def find_results(paths: list[str], which: str) -> list[Result]:
    results = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            files = [path / f"{which}.eval.json"]
            files = [f for f in files if f.exists()] or sorted(path.glob(f"{which}*.eval.json"))
            if not files:
                print(
                    f"make_table: no {which}.eval.json in {path} (run eval.py on its checkpoint); skipped",
                    file=sys.stderr,
                )
                continue
        elif path.is_file():
            files = [path]
        else:
            raise SystemExit(f"make_table: {path} does not exist")
        for f in files:
            try:
                record = json.loads(f.read_text().strip().splitlines()[-1])
                results.append(
                    Result(
                        setup=setup_of(record),
                        model=record["model"],
                        norm=row_norm(record),
                        top1=float(record["top1"]),
                        top5=float(record["top5"]),
                        count=int(record.get("count", 0)),
                        params=record["params"] / 1e6 if record.get("params") else None,
                        macs=record["macs"] / 1e9 if record.get("macs") else None,
                        source=str(f),
                    )
                )
            except (ValueError, KeyError, IndexError) as e:
                raise SystemExit(f"make_table: {f} is not an eval.py result ({type(e).__name__}: {e})") from None
    return results


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _diff(ours: float | None, paper: float | None) -> str:
    if ours is None or paper is None:
        return "-"
    return f"{ours - paper:+.2f}"


def build_rows(results: list[Result]) -> list[dict]:
    """One dict per table row: every paper row, then results that match no paper row."""
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.setup, r.model, r.norm), []).append(r)
    rows = []
    seen = set()
    for setup, label, model, norm, p_params, p_flops, p_e1, p_e5, quoted in PAPER_ROWS:
        key = (setup, model, norm)
        seen.add(key)
        rows.append(_row(setup, label, model, norm, groups.get(key, []), p_params, p_flops, p_e1, p_e5, quoted))
    for key, group in sorted(groups.items()):
        if key not in seen:
            setup, model, norm = key
            rows.append(_row(setup, model, model, norm, group, None, None, None, None, False))
    return rows


def _row(setup, label, model, norm, group, p_params, p_flops, p_e1, p_e5, quoted) -> dict:
    e1 = statistics.mean(100 - r.top1 for r in group) if group else None
    e5 = statistics.mean(100 - r.top5 for r in group) if group else None
    params = next((r.params for r in group if r.params), None)
    macs = next((r.macs for r in group if r.macs), None)
    return {
        "setup": setup,
        "backbone": label,
        "model": model,
        "norm": NORM_LABELS.get(norm, norm) + ("*" if quoted else ""),
        "runs": len(group),
        "images": group[0].count if group else None,
        "params_m": params,
        "paper_params_m": p_params,
        "gmacs": macs,
        "paper_gflops": p_flops,
        "top1_err": e1,
        "paper_top1_err": p_e1,
        "top1_diff": None if e1 is None or p_e1 is None else e1 - p_e1,
        "top5_err": e5,
        "paper_top5_err": p_e5,
        "top5_diff": None if e5 is None or p_e5 is None else e5 - p_e5,
        "top1_err_std": statistics.stdev(100 - r.top1 for r in group) if len(group) > 1 else None,
    }


def to_markdown(rows: list[dict]) -> str:
    out = []
    for setup in ("normal", "advanced"):
        part = [r for r in rows if r["setup"] == setup]
        if not part:
            continue
        out.append(f"### {SETUP_TITLES[setup]}\n")
        out.append(
            "| Backbone | Norm | Params (M) ours / paper | GMACs ours / paper FLOPs | top-1 err ours | paper | diff "
            "| top-5 err ours | paper | diff | runs |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in part:
            e1 = _fmt(r["top1_err"]) + (f" ± {r['top1_err_std']:.2f}" if r["top1_err_std"] is not None else "")
            out.append(
                f"| {r['backbone']} | {r['norm']} | {_fmt(r['params_m'], 3)} / {_fmt(r['paper_params_m'])} | "
                f"{_fmt(r['gmacs'])} / {_fmt(r['paper_gflops'])} | {e1} | {_fmt(r['paper_top1_err'])} | "
                f"{_diff(r['top1_err'], r['paper_top1_err'])} | {_fmt(r['top5_err'])} | {_fmt(r['paper_top5_err'])} | "
                f"{_diff(r['top5_err'], r['paper_top5_err'])} | {r['runs']} |"
            )
        out.append("")
    out.append("Errors in %, single 224 crop (resize 256). * rows are quoted in the paper from other papers.")
    return "\n".join(out) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run folders or eval JSON files")
    parser.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint whose eval to use")
    parser.add_argument("--markdown", default=None, help="also write the markdown table here")
    parser.add_argument("--csv", default=None, help="write the table as CSV here")
    parser.add_argument("--only-results", action="store_true", help="omit paper rows without a result")
    args = parser.parse_args(argv)
    rows = build_rows(find_results(args.paths, args.which))
    if args.only_results:
        rows = [r for r in rows if r["runs"]]
    text = to_markdown(rows)
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.csv and rows:
        write_csv(rows, Path(args.csv))
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
