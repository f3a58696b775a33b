#!/usr/bin/env python
"""Training and inference throughput (images/s) of any (model, norm), one table per invocation.

Each row builds the model, optimizer and AMP set-up the way ``train.py`` does and times whole steps:
the training step is ``engine.loop.train_step`` itself (autocast forward, float32 cross-entropy,
GradScaler for fp16, SGD with momentum 0.9 and weight decay from ``engine.optim.build_optimizer``,
``zero_grad(set_to_none=True)``), so the figure is the trainer's speed. Inference is ``model.eval()``
under ``torch.inference_mode()`` and autocast. After ``--warmup`` untimed steps (compilation included),
``--repeats`` repeats of ``--steps`` steps are timed (CUDA events with a synchronize on the GPU,
``time.perf_counter`` on the CPU); the table shows the median images/s and the min-max spread.

Data: by default (``--backend none``) one random batch is made once and stays on the device, so no
data work is measured. ``--backend synthetic|torch|dali|dali_cpu`` feeds the steps from
``data.build_loaders`` instead and adds the loader-only images/s (batches pulled without compute) and
the fraction of step time spent waiting for data; several backends give one row per backend.
``--compile auto`` compiles only the rows of the ``compile`` AN implementation (the one written for it).

Peak memory is ``torch.cuda.max_memory_allocated`` (reset before each row) on the GPU; on the CPU it is
the process's maximum resident set size so far (``ru_maxrss``, which never decreases across rows).
The TFLOP/s column counts 2 FLOPs per MAC of ``models.count_macs`` (convolutions and linear layers)
and a training step as 3 forward passes (the usual convention: the backward pass costs about twice the
forward). ``--ceilings`` first measures the machine's matrix-multiply TFLOP/s (bf16 on the GPU, fp32 on the
CPU) and device copy bandwidth (bytes read + written). A failing row (bad option, missing kernel, out of
memory) becomes an error row and the other rows still run; the exit status is 1 when any row failed (2 for
an unknown model or norm).
``--json`` is rewritten after every row, so a run cut short by a timeout keeps its finished rows.

Usage::

    python tools/benchmark.py --models resnet50 --norms bn an --batch-size 256 --mode both --json rn50.json
    python tools/benchmark.py --rows resnet50:bn:256 resnet50:an:256 mobilenetv2:an:128 --compile both
    python tools/benchmark.py --device cpu --models resnet18 --norms bn an --batch-size 4 --img-size 64 \\
        --precision fp32 bf16 --steps 2 --repeats 2 --model-kwargs base_width=8
    python tools/benchmark.py --rows resnet50:an:256 --backend dali --data-root /data/imagenet --workers 12
    python tools/benchmark.py --show docs/perf/part1.json    # saved results as markdown
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `python tools/...` anywhere

import torch
import yaml
from torch import nn

import an
import data
import models
from engine import checkpoint as ck
from engine.config import Config
from engine.errors import main_guard
from engine.loop import (
    NonFiniteLossError,
    TrainContext,
    autocast,
    begin_epoch,
    check_finite,
    epoch_batches,
    train_step,
)
from engine.optim import Schedule, build_optimizer

PRECISIONS: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
AN_NORMS = ("an", "an_gn")  # norms for which --an-impl means something
# Row names that are a norm plus a model option (the paper's "SE" rows: BN with squeeze-excitation blocks).
NORM_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {"se": ("bn", {"attn_layer": "se"})}
AN_IMPLS = ("auto", "reference", "fused", "compile")
BACKENDS = ("none", *data.BACKENDS)
MODES = ("train", "infer")
LR = 1e-3  # the learning rate does not change the speed; a small one keeps random-label training finite


# ----------------------------------------------------------------------------------------------------
# Timing helpers.
# ----------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds that ``fn()`` takes: CUDA events around it on the GPU (after a synchronize), else perf_counter."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summarize(images_per_step: int, steps: int, seconds: list[float]) -> dict[str, Any]:
    """Images/s of each repeat, their median and spread, and the milliseconds per step at the median."""
    ips = [images_per_step * steps / s for s in seconds]
    median = statistics.median(ips)
    return {
        "images_per_sec": median,
        "images_per_sec_min": min(ips),
        "images_per_sec_max": max(ips),
        "images_per_sec_repeats": ips,
        "seconds_repeats": seconds,
        "ms_per_step": 1000.0 * images_per_step / median,  # the step time at the median throughput
    }


# ----------------------------------------------------------------------------------------------------
# Data sources.
# ----------------------------------------------------------------------------------------------------


def make_fixed_batch(
    batch_size: int, img_size: int, num_classes: int, device: torch.device, memory_format: torch.memory_format
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random normalized-looking batch on the device, made once per row (never per step)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=g)
    labels = torch.randint(0, num_classes, (batch_size,), generator=g)
    return images.to(device).contiguous(memory_format=memory_format), labels.to(device)


def endless_batches(train_loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's epochs back to back, so the pipeline stays full across repeats."""
    for epoch in itertools.count():
        yield from train_loader.epoch(epoch)


class StepSource:
    """A train loader whose every "epoch" is the next ``steps`` batches of ``batches``."""

    def __init__(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches
        self.steps_per_epoch = 0
        self.batch_size = 0

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.islice(self.batches, self.steps_per_epoch - start_step)


def loader_config(
    backend: str, data_root: str | None, batch_size: int, img_size: int, workers: int, num_classes: int
) -> Config:
    cfg = Config()
    cfg.data.backend = backend
    cfg.data.root = str(data_root or "")
    cfg.data.batch_size = batch_size
    cfg.data.img_size = img_size
    cfg.data.workers = workers
    cfg.model.num_classes = num_classes
    return cfg


# ----------------------------------------------------------------------------------------------------
# One row.
# ----------------------------------------------------------------------------------------------------


def _build_model(name: str, norm: str, num_classes: int, kwargs: dict, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    if device.type == "cuda":
        try:  # initialising on the GPU is much faster than on the CPU for the large models
            with torch.device(device):
                return models.create_model(name, norm=norm, num_classes=num_classes, **kwargs)
        except (RuntimeError, NotImplementedError):
            pass
    return models.create_model(name, norm=norm, num_classes=num_classes, **kwargs).to(device)


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20,
            "peak_mem_kind": "cuda_max_allocated",
        }
    return {
        "peak_mem_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_mem_kind": "process_max_rss",
    }


def _train_runner(
    model: nn.Module,
    forward_model: nn.Module,
    dtype: torch.dtype | None,
    device: torch.device,
    batches: Iterator,
    batch_size: int,
    stats: dict,
) -> Callable[[int], None]:
    """A function running ``n`` training steps exactly as train.py does (``engine.loop.train_step``)."""
    optimizer = build_optimizer(model, Config(), LR)  # SGD, momentum 0.9, weight decay 1e-4, the trainer's groups
    ctx = TrainContext(
        model=model,
        forward_model=forward_model,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type) if dtype == torch.float16 else None,
        schedule=Schedule(peak_lr=LR, total_steps=1, warmup_steps=0, name="constant"),
        loss_fn=nn.CrossEntropyLoss(),
        device=device,
        amp=dtype,
    )
    source = StepSource(batches)
    source.batch_size = batch_size

    def run(n: int) -> None:
        source.steps_per_epoch = n
        begin_epoch(ctx, 0)
        with epoch_batches(source, 0) as epoch:
            for step, (images, target) in enumerate(epoch):
                train_step(ctx, images, target, step)
        try:
            check_finite(ctx, 0, n)
        except NonFiniteLossError:  # the speed is still measured; flag it and go on
            stats["nonfinite_loss"] = True
            ctx.nonfinite = None
        stats["data_time"] = ctx.meters["data_time"]

    return run


def _infer_runner(
    forward_model: nn.Module, dtype: torch.dtype | None, device: torch.device, batches: Iterator, stats: dict
) -> Callable[[int], None]:
    def run(n: int) -> None:
        data_time = 0.0
        with torch.inference_mode(), autocast(device, dtype):
            for _ in range(n):
                t0 = time.perf_counter()
                images, _ = next(batches)
                data_time += time.perf_counter() - t0
                forward_model(images)
        stats["data_time"] = data_time

    return run


def benchmark_row(
    model: str,
    norm: str,
    *,
    batch_size: int = 64,
    img_size: int = 224,
    precision: str = "bf16",
    channels_last: bool = True,
    compile: bool = False,
    compile_mode: str = "default",
    compile_backend: str = "inductor",
    mode: str = "train",
    warmup: int = 10,
    steps: int = 20,
    repeats: int = 3,
    device: str | torch.device = "cpu",
    an_impl: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    backend: str = "none",
    data_root: str | None = None,
    workers: int = 4,
    num_classes: int = 1000,
    count_macs: bool = True,
) -> dict[str, Any]:
    """Measures one (model, norm, batch, precision, memory format, compile, mode) configuration.

    Args:
        model: a name from ``models.list_models()``.
        norm: a norm type from ``models.list_norm_types()``.
        precision: ``bf16`` | ``fp16`` (autocast; fp16 adds a GradScaler) | ``fp32`` (no autocast; TF32 on
            the GPU, as in train.py).
        compile: wrap the model in ``torch.compile(mode=compile_mode)``.
        mode: ``train`` (a full trainer step) or ``infer`` (eval forward).
        an_impl: AN implementation passed to the model as ``norm_kwargs['impl']`` (None or ``auto``: the default).
        backend: ``none`` (one fixed device batch) or a ``data.build_loaders`` backend.
        data_root: dataset root for the folder backends.
        count_macs: add ``gmacs`` (``models.count_macs`` at ``img_size``) and the achieved TFLOP/s.

    Returns:
        The configuration, ``images_per_sec`` (median) with ``images_per_sec_min``/``_max`` and the
        per-repeat values, ``ms_per_step``, ``warmup_seconds`` (compilation included), ``peak_mem_mib``
        and its kind, ``params_m``, ``gmacs``, ``achieved_tflops``; with a loader backend also
        ``loader_images_per_sec`` and ``data_wait_frac``.

    Raises:
        ValueError: unknown model, norm, option, precision, mode or backend (and whatever the model or
            the device raises, e.g. out of memory).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}.")
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; valid: {', '.join(MODES)}.")
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; valid: {', '.join(BACKENDS)}.")
    if min(batch_size, steps, repeats) < 1 or warmup < 0:
        raise ValueError("batch_size, steps and repeats must be >= 1 and warmup >= 0")
    device = torch.device(device)
    dtype = PRECISIONS[precision]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    kwargs = dict(model_kwargs or {})
    row_norm = norm
    if norm in NORM_ALIASES:
        norm, extra = NORM_ALIASES[norm]
        kwargs.update(extra)
    if an_impl not in (None, "auto"):
        kwargs["norm_kwargs"] = {**kwargs.get("norm_kwargs", {}), "impl": an_impl}
    row: dict[str, Any] = {
        "model": model,
        "norm": row_norm,
        "an_impl": an_impl or "auto",
        "batch_size": batch_size,
        "img_size": img_size,
        "precision": precision,
        "channels_last": channels_last,
        "memory_format": "channels_last" if channels_last else "NCHW",
        "compile": compile,
        "compile_mode": compile_mode if compile else None,
        "mode": mode,
        "backend": backend,
        "device": str(device),
        "warmup": warmup,
        "steps": steps,
        "repeats": repeats,
        "model_kwargs": model_kwargs or {},
    }
    if device.type == "cuda":  # train.py's settings
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if compile:
        torch._dynamo.reset()  # every row compiles afresh (and never hits the recompilation limit)
    _reset_memory(device)

    net = _build_model(model, norm, num_classes, kwargs, device)
    net = net.to(memory_format=memory_format)
    row["params_m"] = models.count_params(net) / 1e6
    row["gmacs"] = None
    if count_macs and hasattr(models, "count_macs"):
        row["gmacs"] = models.count_macs(net, img_size) / 1e9
    net.train(mode == "train")
    if compile:  # torch.compile takes a mode (inductor's) or another backend
        options = {"mode": compile_mode} if compile_backend == "inductor" else {"backend": compile_backend}
        forward_model = torch.compile(net, **options)
    else:
        forward_model = net

    loaders = None
    batches: Iterator | None = None
    try:
        if backend == "none":
            fixed = make_fixed_batch(batch_size, img_size, num_classes, device, memory_format)
            batches = itertools.repeat(fixed)
        else:
            cfg = loader_config(backend, data_root, batch_size, img_size, workers, num_classes)
            loaders = data.build_loaders(cfg, device=device, memory_format=memory_format, build_val=False)
            batches = endless_batches(loaders.train)

        stats: dict[str, Any] = {}
        if mode == "train":
            run = _train_runner(net, forward_model, dtype, device, batches, batch_size, stats)
        else:
            run = _infer_runner(forward_model, dtype, device, batches, stats)

        t0 = time.perf_counter()
        if warmup:
            run(warmup)
        _sync(device)
        row["warmup_seconds"] = time.perf_counter() - t0

        seconds, waits = [], []
        for _ in range(repeats):
            seconds.append(time_call(lambda: run(steps), device))
            waits.append(stats["data_time"] / seconds[-1])
        row.update(summarize(batch_size, steps, seconds))
        row["nonfinite_loss"] = stats.get("nonfinite_loss", False)
        row.update(_peak_memory(device))
        if row["gmacs"] is not None:
            flops_per_image = 2e9 * row["gmacs"] * (3 if mode == "train" else 1)
            row["achieved_tflops"] = flops_per_image * row["images_per_sec"] / 1e12

        if loaders is not None:
            row["data_wait_frac"] = min(1.0, statistics.median(waits))

            def pull() -> None:
                for _ in range(steps):
                    next(batches)
                _sync(device)

            loader_seconds = [time_call(pull, device) for _ in range(repeats)]
            only = summarize(batch_size, steps, loader_seconds)
            row["loader_images_per_sec"] = only["images_per_sec"]
            row["loader_images_per_sec_min"] = only["images_per_sec_min"]
            row["loader_images_per_sec_max"] = only["images_per_sec_max"]
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        if loaders is not None:
            loaders.close()
    return row


# ----------------------------------------------------------------------------------------------------
# Machine ceilings and environment.
# ----------------------------------------------------------------------------------------------------


def _matmul_tflops(n: int, dtype: torch.dtype, device: torch.device, iters: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def matmuls() -> None:
        for _ in range(iters):
            torch.mm(a, b, out=out)

    matmuls()
    seconds = [time_call(matmuls, device) for _ in range(repeats)]
    return 2 * n**3 * iters / statistics.median(seconds) / 1e12


def _copy_gb_per_sec(mib: int, device: torch.device, copies: int, repeats: int) -> float:
    src = torch.ones(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def copy() -> None:
        for _ in range(copies):
            dst.copy_(src)

    copy()
    seconds = [time_call(copy, device) for _ in range(repeats)]
    return 2 * src.numel() * copies / statistics.median(seconds) / 1e9


def measure_ceilings(
    device: str | torch.device, matmul_size: int | None = None, copy_mib: int | None = None, repeats: int = 5
) -> dict[str, Any]:
    """Dense matmul TFLOP/s (bf16 on the GPU, fp32 on the CPU) and device copy GB/s (read + written)."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    n = matmul_size or (8192 if gpu else 1024)
    dtype = torch.bfloat16 if gpu else torch.float32
    mib = copy_mib or (2048 if gpu else 256)
    result = {
        "matmul_size": n,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_tflops": _matmul_tflops(n, dtype, device, 20 if gpu else 3, repeats),
        "copy_mib": mib,
        "copy_gb_per_sec": _copy_gb_per_sec(mib, device, 10 if gpu else 3, repeats),
        "copy_counts": "bytes read + bytes written",
    }
    _reset_memory(device)
    return result


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device, argv: list[str]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join([sys.executable, str(Path(__file__)), *argv]),
        "git_revision": ck.git_revision(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hostname": platform.node(),
    }
    if device.type == "cuda":
        env["tf32"] = True  # train.py enables TF32, so fp32 rows use TF32 convolutions and matmuls
    with contextlib.suppress(ImportError):
        import nvidia.dali  # type: ignore[import-not-found]

        env["dali"] = nvidia.dali.__version__
    return env


# ----------------------------------------------------------------------------------------------------
# Table.
# ----------------------------------------------------------------------------------------------------


def _num(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:,.{digits}f}"


def _sig(x: float | None) -> str:
    """Three significant figures below 100 (GMACs and TFLOP/s of tiny test models stay readable)."""
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (error rows show the error in the img/s column)."""
    with_loader = any(r.get("backend", "none") != "none" for r in rows)
    with_macs = any(r.get("gmacs") is not None for r in rows)
    head = [
        "model",
        "norm",
        "impl",
        "batch",
        "precision",
        "format",
        "compile",
        "mode",
        "data",
        "img/s (median)",
        "min-max",
        "ms/step",
        "peak mem (MiB)",
        "params (M)",
    ]
    if with_macs:
        head += ["GMACs", "TFLOP/s"]
    if with_loader:
        head += ["loader img/s", "data wait"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        impl = r.get("an_impl", "auto") if r.get("norm") in AN_NORMS else "-"
        comp = (r.get("compile_mode") or "on") if r.get("compile") else "off"
        cells = [
            r.get("model", "?"),
            r.get("norm", "?"),
            impl,
            str(r.get("batch_size", "?")),
            r.get("precision", "?"),
            r.get("memory_format", "?"),
            comp,
            r.get("mode", "?"),
            "fixed" if r.get("backend", "none") == "none" else r["backend"],
        ]
        if r.get("error"):
            msg = " ".join(str(r["error"]).split())
            msg = msg if len(msg) <= 140 else msg[:137] + "..."
            cells.append("ERROR: " + msg.replace("|", "/"))
            cells += [""] * (len(head) - len(cells))
        else:
            mem = _num(r.get("peak_mem_mib"), 0) + (" RSS" if r.get("peak_mem_kind") == "process_max_rss" else "")
            cells += [
                _num(r["images_per_sec"]),
                f"{_num(r['images_per_sec_min'])}-{_num(r['images_per_sec_max'])}",
                _num(r["ms_per_step"], 2),
                mem,
                _num(r.get("params_m"), 2),
            ]
            if with_macs:
                cells += [_sig(r.get("gmacs")), _sig(r.get("achieved_tflops"))]
            if with_loader:
                if r.get("backend", "none") == "none":
                    cells += ["-", "-"]
                else:
                    cells += [_num(r.get("loader_images_per_sec")), f"{100 * r.get('data_wait_frac', 0):.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_ceilings(c: dict[str, Any], env: dict[str, Any]) -> str:
    return (
        f"Ceilings on {env['device_name']} ({env['device']}): {c['matmul_dtype']} matmul {c['matmul_size']}^3 "
        f"{_sig(c['matmul_tflops'])} TFLOP/s; device copy of {c['copy_mib']} MiB {_sig(c['copy_gb_per_sec'])} GB/s "
        f"(bytes read + written)."
    )


# ----------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSpec:
    model: str
    norm: str
    batch_size: int
    an_impl: str | None
    precision: str
    compile: bool
    mode: str
    backend: str = "none"


def parse_model_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``['base_width=8', 'an_placement=all']`` -> ``{'base_width': 8, 'an_placement': 'all'}`` (YAML values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-kwargs expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def parse_rows(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(model, norm, batch) triples from --rows, else the product of --models and --norms."""
    if args.rows:
        triples = []
        for item in args.rows:
            parts = item.split(":")
            if len(parts) not in (2, 3) or not all(parts):
                raise ValueError(f"--rows expects model:norm[:batch], got {item!r}")
            try:
                batch = int(parts[2]) if len(parts) == 3 else args.batch_size
            except ValueError:
                raise ValueError(f"--rows: the batch in {item!r} is not an integer") from None
            triples.append((parts[0], parts[1], batch))
        return triples
    return [(m, n, args.batch_size) for m in args.models for n in args.norms]


def expand(args: argparse.Namespace) -> list[RowSpec]:
    """Every row to measure, in table order."""
    modes = list(MODES) if args.mode == "both" else [args.mode]
    specs = []
    for model, norm, batch in parse_rows(args):
        impls = args.an_impl if norm in AN_NORMS else [None]
        for impl, prec, backend in itertools.product(impls, args.precision, args.backend):
            if args.compile == "auto":
                compiles = [impl == "compile"]
            else:
                compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
            for comp, mode in itertools.product(compiles, modes):
                specs.append(RowSpec(model, norm, batch, impl, prec, comp, mode, backend))
    return specs


def check_names(specs: list[RowSpec]) -> None:
    """Raises ValueError for an unknown model or norm before anything is measured."""
    norms = [*an.list_norms(), *NORM_ALIASES]
    for s in specs:
        models.model_entrypoint(s.model)
        if s.norm not in norms:
            raise ValueError(f"Unknown norm type '{s.norm}'. Valid: {', '.join(norms)}.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("rows")
    g.add_argument("--models", nargs="+", default=["resnet50"], help="models (product with --norms)")
    g.add_argument("--norms", nargs="+", default=["bn"], help="norm types (product with --models)")
    g.add_argument("--rows", nargs="+", metavar="MODEL:NORM[:BATCH]", help="explicit rows (replace --models/--norms)")
    g.add_argument("--batch-size", type=int, default=64, help="batch of rows that do not give one")
    g.add_argument("--img-size", type=int, default=224)
    g.add_argument("--precision", nargs="+", default=["bf16"], choices=list(PRECISIONS))
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels_last memory format (default) or NCHW",
    )
    g.add_argument(
        "--compile",
        nargs="?",
        const="on",
        default="off",
        choices=("off", "on", "both", "auto"),
        help="torch.compile the model; 'both' measures eager and compiled rows; 'auto' compiles only the rows of "
        "the 'compile' AN implementation",
    )
    g.add_argument("--compile-mode", default="default", choices=("default", "max-autotune", "reduce-overhead"))
    g.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (e.g. eager: dynamo without code generation)",
    )
    g.add_argument("--mode", default="train", choices=("train", "infer", "both"))
    g.add_argument(
        "--an-impl",
        nargs="+",
        default=["auto"],
        choices=AN_IMPLS,
        help="AN implementation(s) passed to the model as norm_kwargs impl (AN rows only)",
    )
    g.add_argument(
        "--model-kwargs",
        nargs="*",
        metavar="KEY=VALUE",
        default=[],
        help="extra model options, values parsed as YAML (e.g. base_width=8)",
    )
    g.add_argument("--num-classes", type=int, default=1000)
    t = p.add_argument_group("timing")
    t.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    t.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    t.add_argument("--repeats", type=int, default=3, help="timed repeats (median and min-max reported)")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    t.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    t.add_argument("--ceilings", action="store_true", help="also measure matmul TFLOP/s and copy GB/s")
    t.add_argument("--ceiling-size", type=int, default=None, help="matmul size (default 8192 on GPU, 1024 on CPU)")
    t.add_argument("--ceiling-copy-mib", type=int, default=None, help="copied MiB (default 2048 on GPU, 256 on CPU)")
    d = p.add_argument_group("data")
    d.add_argument(
        "--backend",
        nargs="+",
        default=["none"],
        choices=BACKENDS,
        help="none: one fixed random batch on the device; else steps are fed by data.build_loaders (several: a row "
        "per backend)",
    )
    d.add_argument("--data-root", default=None, help="dataset root (ImageNet layout) for torch/dali/dali_cpu")
    d.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers / DALI threads")
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, default=None, help="write everything here (rewritten after each row)")
    o.add_argument("--markdown", type=Path, default=None, help="also write the table (and ceilings) here")
    args = p.parse_args(argv)
    folder = [b for b in args.backend if b not in ("none", "synthetic")]
    if folder and not args.data_root:
        p.error(f"--backend {' '.join(folder)} needs --data-root")
    return args


def _write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _label(s: RowSpec) -> str:
    impl = f"({s.an_impl})" if s.an_impl else ""
    data_src = "" if s.backend == "none" else f" {s.backend}"
    return (
        f"{s.model} {s.norm}{impl} b{s.batch_size} {s.precision} {s.mode}{' compiled' if s.compile else ''}{data_src}"
    )


def show(paths: list[str]) -> str:
    """Markdown of saved results (``--json`` files): command, environment, ceilings and table of each."""
    out = []
    for path in paths:
        res = json.loads(Path(path).read_text())
        env = res["environment"]
        out += [f"`{env['command']}`", ""]
        dali = f", DALI {env['dali']}" if env.get("dali") else ""
        software = f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}{dali}"
        out += [f"{env['device_name']}; {software}; git {env['git_revision']}; {env['time']}", ""]
        if res.get("ceilings"):
            out += [format_ceilings(res["ceilings"], env), ""]
        out += [format_table(res["rows"]) if res["rows"] else "(no rows)", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--show"]:
        print(show(argv[1:]))
        return 0
    args = parse_args(argv)
    try:
        specs = expand(args)
        check_names(specs)
        model_kwargs = parse_model_kwargs(args.model_kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device, argv)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload: dict[str, Any] = {"environment": env, "settings": settings, "ceilings": None, "rows": []}
    header = []
    if args.ceilings:
        payload["ceilings"] = measure_ceilings(device, args.ceiling_size, args.ceiling_copy_mib)
        header.append(format_ceilings(payload["ceilings"], env))
        print(header[-1], flush=True)
        _write_json(args.json, payload)

    rows = payload["rows"]
    for i, s in enumerate(specs, 1):
        try:
            row = benchmark_row(
                s.model,
                s.norm,
                batch_size=s.batch_size,
                img_size=args.img_size,
                precision=s.precision,
                channels_last=args.channels_last,
                compile=s.compile,
                compile_mode=args.compile_mode,
                compile_backend=args.compile_backend,
                mode=s.mode,
                warmup=args.warmup,
                steps=args.steps,
                repeats=args.repeats,
                device=device,
                an_impl=s.an_impl,
                model_kwargs=model_kwargs,
                backend=s.backend,
                data_root=args.data_root,
                workers=args.workers,
                num_classes=args.num_classes,
            )
            row["error"] = None
            note = f"{row['images_per_sec']:.1f} img/s"
        except Exception as e:  # one bad row (missing kernel, bad option, out of memory) must not stop the table
            row = {
                "model": s.model,
                "norm": s.norm,
                "an_impl": s.an_impl or "auto",
                "batch_size": s.batch_size,
                "img_size": args.img_size,
                "precision": s.precision,
                "channels_last": args.channels_last,
                "memory_format": "channels_last" if args.channels_last else "NCHW",
                "compile": s.compile,
                "compile_mode": args.compile_mode if s.compile else None,
                "mode": s.mode,
                "backend": s.backend,
                "device": str(device),
                "error": f"{type(e).__name__}: {e}",
            }
            note = row["error"].splitlines()[0] if row["error"] else "error"
        _reset_memory(device)  # the failed row's tensors are free once the exception is gone
        rows.append(row)
        print(f"[{i}/{len(specs)}] {_label(s)}: {note}", file=sys.stderr, flush=True)
        _write_json(args.json, payload)

    table = format_table(rows)
    print()
    print(table)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        text = [f"`{env['command']}`", "", f"{env['device_name']}, torch {env['torch']}, git {env['git_revision']}"]
        args.markdown.write_text("\n".join([*header, "", *text, "", table, ""]))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
