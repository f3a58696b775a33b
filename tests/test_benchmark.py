"""tools/benchmark.py on the CPU: rows, table, JSON, errors, the fixed batch and the loader path."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

import data
import models
from tools import benchmark

REPO = Path(__file__).resolve().parent.parent
TINY = {"base_width": 8}  # ResNet-18 at 1/8 width: a few ms per step at 32x32
FAST = {"batch_size": 4, "img_size": 32, "warmup": 1, "steps": 2, "repeats": 2, "device": "cpu", "num_classes": 10}
CLI = [
    "--device",
    "cpu",
    "--img-size",
    "32",
    "--batch-size",
    "4",
    "--warmup",
    "1",
    "--steps",
    "2",
    "--repeats",
    "2",
    "--num-classes",
    "10",
]
TIMING_KEYS = {
    "images_per_sec",
    "images_per_sec_min",
    "images_per_sec_max",
    "images_per_sec_repeats",
    "ms_per_step",
    "seconds_repeats",
    "warmup_seconds",
    "peak_mem_mib",
    "peak_mem_kind",
    "params_m",
    "gmacs",
    "achieved_tflops",
}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_row_reports_positive_finite_throughput(mode, precision, channels_last):
    row = benchmark.benchmark_row(
        "resnet18", "an", mode=mode, precision=precision, channels_last=channels_last, model_kwargs=TINY, **FAST
    )
    assert row.keys() >= TIMING_KEYS
    ips = row["images_per_sec_repeats"]
    assert len(ips) == 2 and all(math.isfinite(v) and v > 0 for v in ips)
    assert row["images_per_sec_min"] <= row["images_per_sec"] <= row["images_per_sec_max"]
    assert row["ms_per_step"] == pytest.approx(1000 * 4 / row["images_per_sec"], rel=1e-6)  # median of 2 = mean
    assert row["peak_mem_kind"] == "process_max_rss" and row["peak_mem_mib"] > 0
    assert row["memory_format"] == ("channels_last" if channels_last else "NCHW")
    assert (row["mode"], row["precision"], row["backend"]) == (mode, precision, "none")
    assert row["params_m"] == pytest.approx(
        models.count_params(models.create_model("resnet18", norm="an", num_classes=10, **TINY)) / 1e6
    )
    assert row["gmacs"] > 0 and row["achieved_tflops"] > 0
    assert "loader_images_per_sec" not in row


def test_fixed_batch_is_made_once_and_reused(monkeypatch):
    made, seen = [], []
    make = benchmark.make_fixed_batch
    create = models.create_model

    def counting_make(*args, **kwargs):
        made.append(1)
        return make(*args, **kwargs)

    def hooked_create(*args, **kwargs):
        model = create(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].data_ptr()))
        return model

    monkeypatch.setattr(benchmark, "make_fixed_batch", counting_make)
    monkeypatch.setattr(models, "create_model", hooked_create)
    benchmark.benchmark_row("resnet18", "bn", model_kwargs=TINY, count_macs=False, **{**FAST, "steps": 3})
    assert len(made) == 1
    assert len(seen) == 1 + 2 * 3  # warm-up + repeats x steps: every step ran, on the same tensor
    assert len(set(seen)) == 1


def test_train_step_is_the_trainers(monkeypatch):
    """The timed training step is engine.loop.train_step with the trainer's optimizer."""
    calls, optimizers = [], []
    real_step, real_build = benchmark.train_step, benchmark.build_optimizer

    def spy_step(ctx, images, target, step):
        calls.append(step)
        return real_step(ctx, images, target, step)

    def spy_build(model, cfg, lr):
        optimizers.append(real_build(model, cfg, lr))
        return optimizers[-1]

    monkeypatch.setattr(benchmark, "train_step", spy_step)
    monkeypatch.setattr(benchmark, "build_optimizer", spy_build)
    benchmark.benchmark_row("resnet18", "bn", model_kwargs=TINY, count_macs=False, **FAST)
    assert calls == [0, 0, 1, 0, 1]  # warm-up, then each repeat of 2 steps
    (opt,) = optimizers
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-4
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])  # zero_grad(set_to_none=True)


def test_loader_path_uses_build_loaders(monkeypatch):
    built = []
    real = data.build_loaders

    def spy(cfg, **kwargs):
        built.append(cfg.data.backend)
        return real(cfg, **kwargs)

    monkeypatch.setattr(data, "build_loaders", spy)
    row = benchmark.benchmark_row("resnet18", "bn", backend="synthetic", model_kwargs=TINY, **FAST)
    assert built == ["synthetic"]
    assert row["backend"] == "synthetic"
    assert row["images_per_sec"] > 0 and row["loader_images_per_sec"] > 0
    assert 0.0 <= row["data_wait_frac"] <= 1.0


def test_main_writes_json_and_markdown_table(tmp_path, capsys):
    out = tmp_path / "b.json"
    md = tmp_path / "b.md"
    argv = [
        *CLI,
        "--models",
        "resnet18",
        "--norms",
        "bn",
        "an",
        "--mode",
        "both",
        "--model-kwargs",
        "base_width=8",
        "--backend",
        "synthetic",
        "--ceilings",
        "--ceiling-size",
        "64",
        "--ceiling-copy-mib",
        "8",
        "--json",
        str(out),
        "--markdown",
        str(md),
    ]
    assert benchmark.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "Ceilings on" in stdout
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| model | norm | impl | batch | precision | format | compile | mode |")
    assert "img/s (median)" in lines[0] and "peak mem" in lines[0] and "loader img/s" in lines[0]
    assert len(lines) == 2 + 4  # header, rule, (bn, an) x (train, infer)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "RSS" in lines[2]
    result = json.loads(out.read_text())
    assert {"environment", "settings", "ceilings", "rows"} <= result.keys()
    env = result["environment"]
    for key in ("torch", "cuda", "cudnn", "device_name", "cpu_model", "git_revision", "command"):
        assert key in env
    assert "--mode both" in env["command"]
    assert result["ceilings"]["matmul_tflops"] > 0 and result["ceilings"]["copy_gb_per_sec"] > 0
    rows = result["rows"]
    assert [(r["norm"], r["mode"]) for r in rows] == [
        ("bn", "train"),
        ("bn", "infer"),
        ("an", "train"),
        ("an", "infer"),
    ]
    assert all(r["error"] is None and r["images_per_sec"] > 0 for r in rows)
    assert md.read_text().count("| resnet18 |") == 4
    shown = benchmark.show([str(out)])
    assert shown.count("| resnet18 |") == 4 and "Ceilings on" in shown and "--mode both" in shown


def test_unknown_model_or_norm_is_a_clear_error(capsys):
    assert benchmark.main([*CLI, "--models", "resnet5O"]) == 2
    err = capsys.readouterr().err
    assert "Unknown model 'resnet5O'" in err and "resnet50" in err
    assert benchmark.main([*CLI, "--rows", "resnet18:batchnorm"]) == 2
    assert "Unknown norm type 'batchnorm'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown model"):
        benchmark.benchmark_row("nope", "bn", **FAST)


def test_failing_row_becomes_an_error_row(tmp_path, capsys):
    """base_width is a ResNet option: the MobileNetV2 row fails, the ResNet rows before and after still run."""
    out = tmp_path / "b.json"
    argv = [
        *CLI,
        "--rows",
        "resnet18:bn",
        "mobilenetv2:bn",
        "resnet18:an:2",
        "--model-kwargs",
        "base_width=8",
        "--json",
        str(out),
    ]
    assert benchmark.main(argv) == 1
    stdout = capsys.readouterr().out
    (bad,) = [line for line in stdout.splitlines() if line.startswith("| mobilenetv2")]
    assert "ERROR: ValueError: mobilenetv2 does not support option 'base_width'" in bad
    rows = json.loads(out.read_text())["rows"]
    assert [r["error"] is None for r in rows] == [True, False, True]
    assert rows[2]["batch_size"] == 2 and rows[2]["images_per_sec"] > 0


def test_row_expansion():
    args = benchmark.parse_args(
        [
            "--rows",
            "resnet50:bn:256",
            "resnet50:an",
            "--batch-size",
            "32",
            "--an-impl",
            "reference",
            "fused",
            "--precision",
            "bf16",
            "fp16",
            "--compile",
            "both",
        ]
    )
    specs = benchmark.expand(args)
    bn = [s for s in specs if s.norm == "bn"]
    an_rows = [s for s in specs if s.norm == "an"]
    assert len(bn) == 2 * 2 and {s.an_impl for s in bn} == {None} and {s.batch_size for s in bn} == {256}
    assert len(an_rows) == 2 * 2 * 2 and {s.an_impl for s in an_rows} == {"reference", "fused"}
    assert {s.batch_size for s in an_rows} == {32}
    args = benchmark.parse_args(["--models", "resnet18", "mobilenetv2", "--norms", "bn", "gn", "--mode", "both"])
    assert len(benchmark.expand(args)) == 2 * 2 * 2
    assert benchmark.parse_model_kwargs(["base_width=8", "deep_stem=true", "norm_k=[1, 2]", "an_placement=all"]) == {
        "base_width": 8,
        "deep_stem": True,
        "norm_k": [1, 2],
        "an_placement": "all",
    }
    with pytest.raises(ValueError, match="key=value"):
        benchmark.parse_model_kwargs(["base_width"])
    with pytest.raises(ValueError, match="model:norm"):
        benchmark.parse_rows(benchmark.parse_args(["--rows", "resnet50"]))


SCRIPT = REPO / "scripts" / "gpu_benchmark.sh"


def test_gpu_script_is_valid_bash_and_needs_a_part_and_a_folder(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    for env in ({}, {"PART": "4"}):
        proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env={**os.environ, **env}, capture_output=True)
        assert proc.returncode == 2 and b"usage: PART=1|2|3" in proc.stderr
    # No path of one particular machine: the only absolute paths are defaults under /tmp (overridable by env).
    body = SCRIPT.read_text().split("\n", 1)[1]  # after the #! line
    absolute = set(re.findall(r"(?:^|[\s=(:])(/[A-Za-z_][\w.-]*)", body, flags=re.MULTILINE))
    assert absolute <= {"/tmp", "/dev"}, absolute


def test_gpu_script_unpacks_dali_from_three_parts(tmp_path):
    """The DALI parts are a tar archive, xz-compressed and split in three: the script's setup_dali unpacks them
    into SITE and puts it first on PYTHONPATH (checked with a stand-in archive and a Python that has no DALI)."""
    tree = tmp_path / "tree" / "nvidia" / "dali"
    tree.mkdir(parents=True)
    (tree / "__init__.py").write_text("__version__ = 'stand-in'\n")
    parts = tmp_path / "parts"
    parts.mkdir()
    archive = tmp_path / "dali.tar.xz"
    pack = f"tar -C {tmp_path / 'tree'} -cf - . | xz -1 > {archive} && split -n 3 -d {archive} {parts}/d-"
    subprocess.run(["bash", "-c", pack], check=True)
    assert sorted(p.name for p in parts.iterdir()) == ["d-00", "d-01", "d-02"]
    site = tmp_path / "site"
    fn = f"source <(sed -n '/^setup_dali()/,/^}}/p' {SCRIPT}); setup_dali && echo \"PYTHONPATH=$PYTHONPATH\""
    env = {**os.environ, "PY": "false", "DALI_PARTS": str(parts), "SITE": str(site), "PYTHONPATH": "/x"}
    out = subprocess.run(["bash", "-c", fn], env=env, capture_output=True, text=True, check=True).stdout
    assert (site / "nvidia" / "dali" / "__init__.py").read_text() == "__version__ = 'stand-in'\n"
    assert f"PYTHONPATH={site}:/x" in out
    (parts / "d-02").unlink()
    proc = subprocess.run(["bash", "-c", fn], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "not all in" in proc.stdout


@pytest.mark.slow
def test_gpu_script_parts_run_on_the_cpu(tmp_path):
    """PART=1, 2 and 3 in quick mode on the CPU (the flow of each part, tiny sizes): each writes its JSON and log;
    part 2 takes the AN implementation that trained fastest in part 1; part 3 times the loaders on JPEGs it wrote."""
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "THREADS": "1", "JPEGS": str(tmp_path / "jpegs")}
    results = tmp_path / "results"
    for part in ("1", "2", "3"):
        proc = subprocess.run(
            ["bash", str(SCRIPT), str(results)], env={**env, "PART": part}, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-3000:]
        log = (results / f"part{part}.log").read_text()
        assert f"part {part}:" in log and "(timed out)" not in log, log[-3000:]
        rows = json.loads((results / f"part{part}.json").read_text())["rows"]
        assert rows and all(r["error"] is None and r["images_per_sec"] > 0 for r in rows), log[-3000:]
        if part == "1":
            assert {(r["norm"], r.get("an_impl"), r["compile"], r["mode"]) for r in rows} == {
                (n, i, i == "compile", m)
                for n, i in [("bn", "auto"), ("an", "fused"), ("an", "reference"), ("an", "compile")]
                for m in ("train", "infer")
            }
            trained = [r for r in rows if r["norm"] == "an" and r["mode"] == "train"]
            best = max(trained, key=lambda r: r["images_per_sec"])["an_impl"]
        elif part == "2":
            assert f"AN implementation: {best}" in log
            assert {r["an_impl"] for r in rows if r["norm"] == "an"} == {best}
        else:
            assert [r["backend"] for r in rows] == ["none", "dali_cpu", "torch"]
            assert all(r["loader_images_per_sec"] > 0 for r in rows[1:])
            (line,) = (results / "part3_loader.jsonl").read_text().splitlines()
            assert json.loads(line)["split"] == "val"
    assert sorted(p.name for p in results.iterdir()) == sorted(
        [f"part{i}.{ext}" for i in "123" for ext in ("json", "log")] + ["part3_loader.jsonl"]
    )
