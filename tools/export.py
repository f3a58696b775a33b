"""Export a checkpoint for deployment (ONNX, TorchScript or torch.export) and check the file against PyTorch.

    python tools/export.py runs/resnet50_an/best.pth --format onnx resnet50_an.onnx
    python tools/export.py runs/resnet50_an/best.pth --format torchscript resnet50_an.pt --ema
    python tools/export.py runs/resnet50_an/best.pth --format exported resnet50_an.pt2 --img-size 288

The model is rebuilt from the config stored in the checkpoint (``--config FILE`` to use another, ``--set
section.key=value`` to change it), loaded with the checkpoint's weights (``--ema``: the EMA weights), put in eval
mode and exported for inputs of shape (batch, channels, img_size, img_size) with a dynamic batch size:

- ``onnx``: ``torch.onnx.export`` (``--onnx-exporter dynamo``, PyTorch's default, needs the ``onnx`` and
  ``onnxscript`` packages; ``torchscript``, the older exporter, needs ``onnx``); opset ``--opset``.
- ``torchscript``: ``torch.jit.script``, or ``torch.jit.trace`` for models TorchScript cannot compile
  (``--jit auto``, the default, tries script first; the line printed says which was used). Our backbones
  trace: their timm-style trunk (modules called by path) is not TorchScript, while every norm layer scripts.
- ``exported``: ``torch.export.export`` saved with ``torch.export.save`` (load with ``torch.export.load``).

Then the written file is loaded back (ONNX with onnxruntime, an optional dependency: ``pip install onnxruntime``)
and run on a random batch of another size than the one exported with; its output must match the PyTorch model's
within ``--tolerance`` of the largest output magnitude. One JSON line reports the format, the method, the error and
the verdict (``--time-runs N`` adds the median time per check batch of the file and of the eager PyTorch model, on
the CPU with ``torch.get_num_threads()`` threads); the exit status is 0 when the check passes, 1 when it fails, 2
for a usage error or a missing package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import torch
from torch import nn

from engine import checkpoint as ck
from engine.build import build_model
from engine.config import ConfigError, checkpoint_config, validate_model

FORMATS = ("onnx", "torchscript", "exported")
ONNX_EXPORTERS = ("dynamo", "torchscript")
JIT_METHODS = ("auto", "script", "trace")
EXIT_CHECK_FAILED, EXIT_ERROR = 1, 2
DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """A missing optional package or an export that cannot be done (the message says what to do)."""


def _require(module: str, what: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(
            f"{what} needs the '{module}' package, which is not installed: pip install {module} "
            "(the ONNX packages are optional: pip install onnx onnxscript onnxruntime)"
        ) from None


# ---------------------------------------------------------------------------------------------- model
def load_model(checkpoint: str | Path, config: str | None = None, overrides=(), ema: bool = False):
    """The checkpoint's model in eval mode on the CPU, and its config."""
    path = Path(checkpoint)
    ckpt = ck.load_checkpoint(path, map_location="cpu")
    cfg = checkpoint_config(ckpt, path, config, overrides)
    validate_model(cfg, config or str(path))
    state = ck.model_weights(ckpt, path, ema)
    model = build_model(cfg)
    ck.load_model_state(model, state, path)
    return model.eval(), cfg


# ---------------------------------------------------------------------------------------------- export
def export(
    model: nn.Module,
    fmt: str,
    out: str | Path,
    example: torch.Tensor,
    *,
    jit: str = "auto",
    onnx_exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
) -> str:
    """Writes ``model`` (eval mode) to ``out`` in ``fmt`` with a dynamic batch size; returns the method used."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        method, scripted = jit, None
        if jit in ("auto", "script"):
            try:
                scripted, method = torch.jit.script(model), "script"
            except Exception as e:  # TorchScript rejects many Python constructs; trace those models
                if jit == "script":
                    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
                    raise ExportError(
                        f"torch.jit.script cannot compile this model ({first}). Use --jit trace, or the default "
                        f"--jit auto, which traces what TorchScript cannot compile (our backbones' timm-style "
                        f"trunk; every norm layer itself scripts)."
                    ) from e
        if scripted is None:
            scripted, method = torch.jit.trace(model, example), "trace"
        torch.jit.save(scripted, str(out))
        return method
    batch = torch.export.Dim("batch", min=1)
    if fmt == "exported":
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(out))
        return "torch.export"
    if fmt != "onnx":
        raise ExportError(f"Unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    _require("onnx", "ONNX export")
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset}
    if onnx_exporter == "dynamo":
        _require("onnxscript", "ONNX export with --onnx-exporter dynamo")
        kwargs["dynamic_shapes"] = ({0: batch},)
        torch.onnx.export(model, (example,), str(out), dynamo=True, external_data=False, **kwargs)
    else:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
        torch.onnx.export(model, (example,), str(out), dynamo=False, **kwargs)
    return f"onnx-{onnx_exporter}"


def load_exported(fmt: str, path: str | Path, threads: int | None = None):
    """The written file as a callable ``f(x) -> Tensor`` (ONNX: an onnxruntime session on the CPU)."""
    if fmt == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")
    if fmt == "exported":
        return torch.export.load(str(path)).module()
    ort = _require("onnxruntime", "Checking an ONNX file")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])


def run_exported(fmt: str, path: str | Path, x: torch.Tensor) -> torch.Tensor:
    """Loads the written file and runs it on ``x``."""
    with torch.no_grad():
        return load_exported(fmt, path)(x)


def median_seconds(fn, x: torch.Tensor, runs: int) -> float:
    """Median wall time of ``fn(x)`` over ``runs`` calls, after one warm-up call."""
    times = []
    with torch.no_grad():
        fn(x)
        for _ in range(runs):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Max absolute difference and the same relative to the largest reference magnitude."""
    ref, got = ref.detach().double().cpu(), got.detach().double().cpu()
    if ref.shape != got.shape:
        raise ExportError(f"the exported model returned shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
    err = (ref - got).abs().max().item()
    return {"max_abs_err": err, "rel_err": err / max(ref.abs().max().item(), 1e-12)}


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint written by train.py (best.pth, last.pth) or a converted one")
    p.add_argument("out", help="file to write (e.g. model.onnx, model.pt, model.pt2)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--config", default=None, help="build the model from this config instead of the stored one")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--img-size", type=int, default=None, help="input height and width (default: data.img_size)")
    p.add_argument("--batch-size", type=int, default=2, help="batch of the example input (the batch is dynamic)")
    p.add_argument(
        "--jit", default="auto", choices=JIT_METHODS, help="torchscript: script, trace, or script else trace"
    )
    p.add_argument("--onnx-exporter", default="dynamo", choices=ONNX_EXPORTERS)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest error, relative to the largest output")
    p.add_argument("--no-check", action="store_true", help="write the file without the numerical check")
    p.add_argument("--time-runs", type=int, default=0, help="also time the file and PyTorch on the check batch (CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.format == "onnx":  # fail before the (slow) export when a package is missing
            _require("onnx", "ONNX export")
            if args.onnx_exporter == "dynamo":
                _require("onnxscript", "ONNX export with --onnx-exporter dynamo")
            if not args.no_check:
                _require("onnxruntime", "Checking an ONNX file (or pass --no-check)")
        model, cfg = load_model(args.checkpoint, args.config, args.overrides, args.ema)
        size = args.img_size or cfg.data.img_size
        channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
        gen = torch.Generator().manual_seed(args.seed)
        example = torch.randn(args.batch_size, channels, size, size, generator=gen)
        start = time.perf_counter()
        method = export(
            model, args.format, args.out, example, jit=args.jit, onnx_exporter=args.onnx_exporter, opset=args.opset
        )
        record: dict[str, Any] = {
            "format": args.format,
            "method": method,
            "output": str(args.out),
            "checkpoint": str(args.checkpoint),
            "model": cfg.model.name,
            "norm": cfg.model.norm,
            "ema": args.ema,
            "input_shape": [-1, channels, size, size],
            "export_seconds": round(time.perf_counter() - start, 2),
            "bytes": Path(args.out).stat().st_size,
        }
        ok = True
        if not args.no_check:
            x = torch.randn(args.batch_size + 1, channels, size, size, generator=gen)  # another batch size
            with torch.no_grad():
                ref = model(x)
            record.update(compare(ref, run_exported(args.format, args.out, x)), check_batch=x.shape[0])
            ok = record["rel_err"] <= args.tolerance
            record["ok"] = ok
            if args.time_runs > 0:
                threads = torch.get_num_threads()
                loaded = load_exported(args.format, args.out, threads)
                record["ms_per_batch"] = round(1e3 * median_seconds(loaded, x, args.time_runs), 2)
                record["pytorch_ms_per_batch"] = round(1e3 * median_seconds(model, x, args.time_runs), 2)
                record["threads"] = threads
    except (ExportError, ConfigError, ck.CheckpointError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(record))
    if not ok:
        print(
            f"Error: the exported model differs from PyTorch by {record['rel_err']:.2e} of the largest output "
            f"(tolerance {args.tolerance:g})",
            file=sys.stderr,
        )
    return 0 if ok else EXIT_CHECK_FAILED


if __name__ == "__main__":
    sys.exit(main())
