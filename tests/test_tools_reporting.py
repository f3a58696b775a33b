"""tools/make_table.py and tools/plot_run.py on fabricated results."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from tools import make_table, plot_run

DOCS_AN = Path(__file__).resolve().parent.parent / "docs" / "AN.md"


def fake_eval(run: Path, model: str, norm: str, top1: float, top5: float, epochs: int = 120, name: str = "best"):
    run.mkdir(parents=True, exist_ok=True)
    record = {
        "top1": top1,
        "top5": top5,
        "count": 50000,
        "model": model,
        "norm": norm,
        "params": 25_755_000,
        "macs": 4.1e9,
        "checkpoint": str(run / f"{name}.pth"),
        "recipe": {
            "epochs": epochs,
            "label_smoothing": 0.1 if epochs == 200 else 0.0,
            "mixup": 0.2 if epochs == 200 else 0.0,
        },
    }
    (run / f"{name}.eval.json").write_text(json.dumps(record) + "\n")


def _docs_table(section: str) -> list[list[str]]:
    """The cells of the first markdown table under ``### <section>`` in docs/AN.md (header and rule skipped)."""
    text = DOCS_AN.read_text(encoding="utf-8")
    lines = text[text.index(f"### {section}") :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table


def _number(cell: str) -> float | None:
    found = re.search(r"\d+(\.\d+)?", cell)
    return float(found[0]) if found else None


def test_the_tools_paper_figures_are_the_tables_of_docs_an():
    """tools/paper/imagenet_top1.csv (what make_table.py prints) against docs/AN.md 5.1 and 5.2, cell by cell."""
    norms = {"BN": "bn", "GN": "gn", "SN": "sn", "SE": "se", "AN": "an", "AN (w/ BN)": "an"}
    docs = {}
    for setup, section in (("normal", "5.1"), ("advanced", "5.2")):
        for backbone, norm, params, flops, top1, top5 in _docs_table(section):
            label = backbone.replace(" (deep stem)", "")
            key = (setup, label, norms[norm.rstrip("*")])
            docs[key] = (_number(params), _number(flops), _number(top1), _number(top5), norm.endswith("*"))
    tools = {(r[0], r[1], r[3]): (*r[4:8], r[8]) for r in make_table.PAPER_ROWS}
    assert len(docs) == 21
    for key, figures in docs.items():
        assert tools[key] == figures, key
    # DenseNet-121 has no table row in docs/AN.md 5.1 (the refactor's figures are quoted in its text).
    assert {key[1] for key in set(tools) - set(docs)} == {"DenseNet-121"}


def test_make_table_matches_paper_rows(tmp_path, capsys):
    fake_eval(tmp_path / "r50_an", "resnet50", "an", top1=78.50, top5=94.00)
    fake_eval(tmp_path / "r50_an_seed1", "resnet50", "an", top1=78.30, top5=94.20)
    fake_eval(tmp_path / "r50_an", "resnet50", "an", top1=70.0, top5=90.0, name="last")  # ignored: --which best
    fake_eval(tmp_path / "r50_an_200e", "resnet50", "an", top1=80.00, top5=95.00, epochs=200)
    fake_eval(tmp_path / "r18_bn", "resnet18", "bn", top1=70.0, top5=89.0)  # not a paper row: appended
    csv_path, md_path = tmp_path / "t.csv", tmp_path / "t.md"
    runs = [str(p) for p in sorted(tmp_path.glob("r*"))]
    assert make_table.main([*runs, "--csv", str(csv_path), "--markdown", str(md_path)]) == 0
    text = capsys.readouterr().out
    assert text == md_path.read_text()
    # ResNet-50 AN normal: mean error of the two seeds (21.50 and 21.70) vs the paper's 21.59.
    line = next(line for line in text.splitlines() if line.startswith("| ResNet-50 | AN (w/ BN) |"))
    assert "| 21.60 ± 0.14 | 21.59 | +0.01 | 5.90 | 5.88 | +0.02 | 2 |" in line
    assert "25.755 / 25.76" in line and "4.10 / 4.09" in line
    advanced = text.split("advanced setup")[1]
    assert "| ResNet-50 | AN (w/ BN) | 25.755 / 25.76 | 4.10 / 4.09 | 20.00 | 19.92 | +0.08 |" in advanced
    assert "| ResNet-50 | SE* |" in text and "| resnet18 | BN |" in text
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == len(make_table.PAPER_ROWS) + 1
    an_row = next(r for r in rows if r["setup"] == "normal" and r["model"] == "resnet50" and r["norm"] == "AN (w/ BN)")
    assert float(an_row["top1_err"]) == pytest.approx(21.6) and an_row["runs"] == "2"
    empty = next(r for r in rows if r["model"] == "aognet40m" and r["setup"] == "normal" and r["norm"] == "BN")
    assert empty["top1_err"] == "" and float(empty["paper_top1_err"]) == 19.84


def test_make_table_last_and_bad_input(tmp_path, capsys):
    fake_eval(tmp_path / "run", "resnet50", "bn", top1=70.0, top5=90.0, name="last")
    make_table.main([str(tmp_path / "run"), "--which", "last", "--only-results"])
    out = capsys.readouterr().out
    assert "| ResNet-50 | BN |" in out and "30.00 | 23.01 | +6.99" in out and "AOGNet" not in out
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"is not an eval\.py result"):
        make_table.main([str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit, match="does not exist"):
        make_table.main([str(tmp_path / "missing")])


def test_plot_run_writes_png(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "lr": 0.1 / e,
            "val_top1": 50 + e,
            "val_top5": 80 + e,
            "images_per_sec": 100.0,
            "compute_images_per_sec": 120.0,
            "peak_memory_mb": 900.0,
        }
        for e in range(1, 6)
    ]
    (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert plot_run.main([str(run)]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="pass --out"):
        plot_run.main([str(run), str(run)])
    with pytest.raises(SystemExit, match="does not exist"):
        plot_run.main([str(tmp_path / "nothing")])
