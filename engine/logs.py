"""Rank-0 logging: console (progress bar on a terminal, plain lines in SLURM logs), log.jsonl, TensorBoard.

The module is ``logs`` rather than ``logging`` so that it never shadows the standard library's module.

Every rank gets a logger, but only rank 0 prints at INFO; other ranks print warnings and errors only,
prefixed with their rank, so a failure on any rank is still visible in the job log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import an
from engine.checkpoint import write_text_atomic

LOGGER_NAME = "an"


class _CurrentStdout(logging.StreamHandler):
    """A console handler that writes to whatever ``sys.stdout`` is at the time of each record (a notebook or a
    test harness may swap it), rather than to the stream that was current when the handler was made."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


# Library modules (an/, data/, models/) log under their own names; a run routes them through its handlers.
LIBRARY_LOGGERS = (LOGGER_NAME, "data", "models")


@contextlib.contextmanager
def logging_to(rank: int = 0, output_dir: str | Path | None = None) -> Iterator[logging.Logger]:
    """Configures the framework's loggers for one run and restores them afterwards.

    Rank 0 logs INFO to stdout (and to ``output_dir/train.log``); other ranks log warnings and errors only,
    prefixed with their rank. On exit the run's handlers are closed and every logger gets back its earlier
    handlers, level and propagation, so calling ``train.main`` from Python (a notebook, a test) leaves the
    caller's logging as it was.
    """
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    prefix = "" if rank == 0 else f"[rank {rank}] "
    console = _CurrentStdout()
    console.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S"))
    handlers: list[logging.Handler] = [console]
    if rank == 0 and output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(output_dir) / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        handlers.append(handler)
    for lg in loggers:
        lg.handlers = list(handlers)
        lg.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        lg.propagate = False
    try:
        yield loggers[0]
    finally:
        for lg, old_handlers, level, propagate in saved:
            lg.handlers, lg.level, lg.propagate = old_handlers, level, propagate
        for handler in handlers:
            handler.close()


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocated CUDA memory on a GPU, the process's maximum resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Progress:
    """Per-epoch progress: a tqdm bar on an interactive terminal, otherwise a plain line every N steps."""

    def __init__(
        self, total: int, desc: str, mode: str = "auto", interval: int = 50, enabled: bool = True, first_step: int = 0
    ):
        self.total = total
        self.first_step = first_step
        self.desc = desc
        self.interval = interval
        self.enabled = enabled
        use_bar = mode == "bar" or (mode == "auto" and sys.stdout.isatty())
        self.bar = None
        if enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=first_step, desc=desc, dynamic_ncols=True, leave=False)
        self.start = time.perf_counter()

    def update(self, step: int, metrics: dict[str, float] | None = None) -> None:
        """Called after each step with the count of steps done in this epoch; ``metrics`` at log steps."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if metrics:
                self.bar.set_postfix({k: _fmt(v) for k, v in metrics.items()}, refresh=False)
            return
        if metrics:
            elapsed = time.perf_counter() - self.start
            done = max(step - self.first_step, 1)
            eta = elapsed / done * (self.total - step)
            text = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
            get_logger().info(f"{self.desc} [{step}/{self.total}]  {text}  eta {_fmt_time(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class JsonlWriter:
    """Appends one JSON object per line; each line is flushed, so a killed run keeps what it logged."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """The records written so far; a line cut off by a kill is skipped."""
        return _parse_records(self.path.read_text()) if self.path.exists() else []

    def truncate_after(self, completed_epochs: int) -> None:
        """On resume, drops lines of epochs after ``completed_epochs`` (logged after the checkpoint we resume from).

        Records carry the 1-based number of completed epochs, so a checkpoint taken after 3 epochs keeps
        the lines of epochs 1, 2 and 3.
        """
        if not self.path.exists():
            return
        text = self.path.read_text()
        kept = "".join(json.dumps(r) + "\n" for r in _parse_records(text) if r.get("epoch", 0) <= completed_epochs)
        if kept != text:
            write_text_atomic(self.path, kept)


def _parse_records(text: str) -> list[dict[str, Any]]:
    """The JSON records of a log.jsonl text, one a line; a line cut off by a kill is skipped."""
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class TensorBoard:
    """A thin, optional wrapper of SummaryWriter (absent package or disabled -> every call is a no-op)."""

    def __init__(self, log_dir: str | Path | None, enabled: bool = True):
        self.writer = None
        if enabled and log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                get_logger().warning(
                    "tensorboard is not installed; TensorBoard logging is off (pip install tensorboard)."
                )
                return
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}{k}", v, step)

    def histogram(self, tag: str, values, step: int) -> None:
        if self.writer is not None:
            self.writer.add_histogram(tag, values, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class AttentionProbe:
    """Captures the AN attention weights (lambda, N x K) of the first validation batch for TensorBoard histograms.

    Usage: pass :meth:`arm` as ``on_batch`` to ``engine.loop.evaluate`` (it hooks the attention branches
    of every AN layer for batch 0 and unhooks them at batch 1), then :meth:`log` the captured values.
    """

    def __init__(self, model: nn.Module):
        self.modules = {name: m.attention for name, m in model.named_modules() if isinstance(m, an.AttentiveNorm2d)}
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []

    def arm(self, batch_index: int) -> None:
        if batch_index == 0 and not self.handles:
            for name, module in self.modules.items():
                self.handles.append(module.register_forward_hook(self._hook(name)))
        elif batch_index == 1:
            self.remove()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.values[name] = output.detach().float().cpu()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def log(self, tb: TensorBoard, step: int) -> None:
        self.remove()
        for name, values in self.values.items():
            tb.histogram(f"an_attention/{name}", values, step)
