"""torch.compile and CUDA graphs for the training and evaluation models: the one place they are applied (ours).

``train.compile: true`` compiles the models with inductor (``mode="default"``). ``train.cuda_graph: true`` compiles
them with ``mode="reduce-overhead"``: inductor's kernels are recorded into CUDA graphs (one graph per compiled
region and input shape, replayed on every later call), which removes the per-kernel launch cost that dominates
small layers such as AN's attention branch. CUDA graphs need a CUDA device; on any other device the key is refused
with a :class:`~engine.config.ConfigError` (:func:`check_accel`).

What gets captured: everything torch.compile traces, i.e. the whole forward and backward of models built with the
``reference`` or ``compile`` AN implementations. The ``fused`` AN layers are hidden from torch.compile (see
``an/fused.py``): each one is a graph break, and its Triton kernels run eagerly between graph replays. The
optimizer step, the loss scaling and the data loading stay eager. A step boundary is marked before every call of
a graphed model (``torch.compiler.cudagraph_mark_step_begin``), so a training step, an accumulation micro-batch
or an evaluation batch may freely reuse the previous call's memory.

Usage (what ``train.py`` does when building its step context)::

    forward_model, eval_model = compile_models(model, forward_model, cfg, device)
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import Config, ConfigError

__all__ = ["check_accel", "compile_mode", "compile_models"]


def compile_mode(cfg: Config) -> str | None:
    """The ``torch.compile`` mode the config asks for: None (eager), ``"default"`` or ``"reduce-overhead"``."""
    if cfg.train.cuda_graph:
        return "reduce-overhead"
    return "default" if cfg.train.compile else None


def check_accel(cfg: Config, device: torch.device | str, source: str | None = None) -> None:
    """Raises ConfigError when ``train.cuda_graph`` cannot work on ``device`` (anything but CUDA)."""
    device = torch.device(device)
    if cfg.train.cuda_graph and device.type != "cuda":
        where = f" ({source})" if source else ""
        raise ConfigError(
            f"train.cuda_graph=true{where} records the training step in CUDA graphs "
            f"(torch.compile mode='reduce-overhead'), which needs a CUDA device, but this run is on {device.type}. "
            f"Set train.cuda_graph=false (train.compile=true still compiles the model), or run on a GPU."
        )


def _mark_step(module: nn.Module, args) -> None:
    torch.compiler.cudagraph_mark_step_begin()


def compile_models(
    model: nn.Module,
    forward_model: nn.Module,
    cfg: Config,
    device: torch.device | str,
    backend: str = "inductor",
) -> tuple[nn.Module, nn.Module]:
    """``(forward_model, eval_model)`` compiled as ``cfg.train`` asks (unchanged when it asks for neither).

    Args:
        model: The raw model (the evaluation model is compiled from it: never DDP).
        forward_model: What runs the training forward (``model`` or its DDP wrapper).
        cfg: The run's config (``train.compile``, ``train.cuda_graph``).
        device: The run's device (``train.cuda_graph`` needs CUDA).
        backend: torch.compile backend (tests use ``"eager"``).

    Raises:
        ConfigError: ``train.cuda_graph`` on a device other than CUDA.
    """
    check_accel(cfg, device)
    mode = compile_mode(cfg)
    if mode is None:
        return forward_model, model
    options = {"mode": mode} if backend == "inductor" else {"backend": backend}  # torch.compile takes one of them
    compiled = []
    for module in (forward_model, model):
        out = torch.compile(module, **options)
        if mode == "reduce-overhead":
            out.register_forward_pre_hook(_mark_step)
        compiled.append(out)
    return compiled[0], compiled[1]
