"""Parameters and MACs of every (backbone, norm) beside the AN paper's figures, as a markdown table.

Parameters are counted at 1000 classes. MACs are counted by :func:`models.count_macs` with a forward pass of
one 224x224 image: "GMACs" is conv + linear (torchvision's and the paper's convention for ResNets); "thop"
adds 4 operations per norm output element, as thop does (the AN authors' counter). Models are built on the
meta device (no memory, a few seconds in all); ``--device cpu`` builds real ones instead.

Paper figures (``docs/AN.md`` 5): the AOGNet-v2 README table (120-epoch setup, 5.1), the refactor's model zoo
for exact parameter counts (ResNet-34, the ResNet-50 placements, bias-free SE, DenseNet-121-AN; 5.3), and the
deep-stem ("-D") ResNets' counts built from the official code (4.2). Rows without a paper figure show "-".

Usage:
    python tools/model_stats.py                               # every model x norm, plus the variant rows
    python tools/model_stats.py --models resnet50,aognet12m --norms bn,an
    python tools/model_stats.py --paper-only                  # rows with a paper figure only
    python tools/model_stats.py --matrix                      # parameters, model x norm
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, for `import models`

import an
import models
from engine.errors import main_guard
from models.stats import mac_breakdown
from tools.paper import figure, read_figures

D = {"deep_stem": True, "avg_down": True}


@dataclass(frozen=True)
class Row:
    """One table row: a model, a norm type and options, with the paper's figures where known."""

    model: str
    norm: str
    options: dict = field(default_factory=dict)
    label: str = ""
    paper_params_m: float | None = None
    paper_gflops: float | None = None


# (model, norm) -> (paper params in M, paper FLOPs in G); docs/AN.md 5.1 / 5.3, from tools/paper/model_size.csv.
PAPER = {(r["model"], r["norm"]): (figure(r["params_m"]), figure(r["gflops"])) for r in read_figures("model_size.csv")}

VARIANTS = [
    Row("resnet50", "bn", {"attn_layer": "se"}, "attn_layer=se", 28.09),
    Row("resnet50", "bn", {"attn_layer": "se", "attn_kwargs": {"bias": False}}, "attn_layer=se, bias=False", 28.072),
    Row("resnet50", "an", {"norm_placement": "bn3"}, "norm_placement=bn3", 26.349),
    Row("resnet50", "an", {"norm_placement": "all"}, "norm_placement=all", 26.947),
    Row("resnet50", "bn", D, "-D (deep stem, avg down)", 25.576, 4.09),
    Row("resnet50", "an", D, "-D (deep stem, avg down)", 25.775, 4.09),
    Row("resnet101", "bn", D, "-D (deep stem, avg down)", 44.568, 8.12),
    Row("resnet101", "an", D, "-D (deep stem, avg down)", 45.020, 8.12),
]


def all_rows() -> list[Row]:
    """Every model x norm (with paper figures attached), then the variant rows after their base model."""
    rows = []
    for name in models.list_models():
        for norm in an.list_norms():
            rows.append(Row(name, norm, {}, "", *PAPER.get((name, norm), (None, None))))
        rows += [v for v in VARIANTS if v.model == name]
    return rows


def _matches(value: str, patterns: str | None) -> bool:
    return patterns is None or any(fnmatch.fnmatch(value, p.strip()) for p in patterns.split(","))


def measure(row: Row, device: str, img_size: int) -> tuple[int, int, int]:
    """(parameters, conv+linear MACs, thop-style MACs) of one row."""
    with torch.device(device):
        model = models.create_model(row.model, row.norm, num_classes=1000, **row.options)
    c = mac_breakdown(model, img_size)
    macs = c["conv"] + c["linear"]
    return models.count_params(model), macs, macs + 4 * c["norm_elements"]


def _diff(ours: float, paper: float | None) -> str:
    if paper is None:
        return "-"
    pct = 100 * (ours - paper) / paper
    return "0.00%" if abs(pct) < 0.005 else f"{pct:+.2f}%"


def table(rows: list[Row], device: str, img_size: int) -> str:
    """The markdown table of ``rows``."""
    out = [
        "| Model | Norm | Options | Params (M) | Paper (M) | Δ params | GMACs | thop GMACs | Paper FLOPs (G) "
        "| Δ GMACs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        params, macs, thop = measure(row, device, img_size)
        paper_p = f"{row.paper_params_m:.3f}" if row.paper_params_m is not None else "-"
        paper_f = f"{row.paper_gflops:.2f}" if row.paper_gflops is not None else "-"
        out.append(
            f"| {row.model} | {row.norm} | {row.label or '-'} | {params / 1e6:.3f} | {paper_p} | "
            f"{_diff(params / 1e6, row.paper_params_m)} | {macs / 1e9:.3f} | {thop / 1e9:.3f} | {paper_f} | "
            f"{_diff(macs / 1e9, row.paper_gflops)} |"
        )
    return "\n".join(out)


def matrix(names: list[str], norms: list[str], device: str, img_size: int) -> str:
    """Parameters (M) of every model x norm, with the conv+linear GMACs of the BN model."""
    out = ["| Model | " + " | ".join(norms) + " | GMACs (bn) |", "|---|" + "---:|" * (len(norms) + 1)]
    for name in names:
        cells = []
        for norm in norms:
            with torch.device(device):
                cells.append(f"{models.count_params(models.create_model(name, norm)) / 1e6:.3f}")
        macs = measure(Row(name, "bn"), device, img_size)[1]
        out.append(f"| {name} | " + " | ".join(cells) + f" | {macs / 1e9:.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated names or globs (default: all)")
    parser.add_argument("--norms", help="comma-separated norm types (default: all)")
    parser.add_argument("--paper-only", action="store_true", help="only rows with a paper figure")
    parser.add_argument("--device", default="meta", choices=("meta", "cpu"), help="where to build the models")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--matrix", action="store_true", help="parameters as a model x norm matrix instead")
    args = parser.parse_args(argv)
    rows = [
        r
        for r in all_rows()
        if _matches(r.model, args.models)
        and _matches(r.norm, args.norms)
        and (not args.paper_only or r.paper_params_m is not None or r.paper_gflops is not None)
    ]
    if not rows:
        raise SystemExit(
            f"No model/norm matches --models/--norms; models: {', '.join(models.list_models())}; "
            f"norms: {', '.join(an.list_norms())}."
        )
    t0 = time.perf_counter()
    if args.matrix:
        names = [n for n in models.list_models() if _matches(n, args.models)]
        norms = [n for n in an.list_norms() if _matches(n, args.norms)]
        rows = [Row(m, n) for m in names for n in norms]
        print(matrix(names, norms, args.device, args.img_size))
    else:
        print(table(rows, args.device, args.img_size))
    print(
        f"\n{len(rows)} rows, {args.img_size}x{args.img_size}, device={args.device}, torch {torch.__version__}, "
        f"{platform.machine()} {os.cpu_count()} CPUs, {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
