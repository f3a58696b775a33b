"""Forward+backward time of every norm layer of ``an`` against BatchNorm at the ResNet-50 bn2 shapes.

Shapes (224 input, bn2 of each stage): C=64@56x56, 128@28x28, 256@14x14, 512@7x7, with AN's K per stage
[10, 10, 20, 20] as in the paper. Each timed iteration is ``y = layer(x); y.backward(g)`` in train mode;
the layers are timed round-robin and the table reports the median over ``--repeats`` rounds and the ratio
to BN at the same shape.

With ``--an-impls`` it instead compares AN implementations (``create_norm('an', impl=...)``; ``compile`` is
wrapped in ``torch.compile``) at the same shapes: forward and forward+backward times, and the achieved GB/s
counted over the minimum traffic (forward: x read twice + y written = 3 tensors; backward: g and x read twice
+ dx written = 5 tensors; forward+backward 8).

Usage:
    python tools/bench_norm.py --device cpu --batch-size 8 --repeats 20
    python tools/bench_norm.py --device cuda --batch-size 128 --dtype bfloat16 --impl reference
    python tools/bench_norm.py --device cuda --batch-size 256 --dtype bfloat16 --channels-last \
        --an-impls reference fused compile
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import platform
import statistics
import sys
import time

if "--count-kernels" in sys.argv and "TRITON_INTERPRET" not in os.environ and "--device" not in sys.argv:
    # Counting on the CPU: run the fused layers' Triton kernels in Triton's interpreter, which reads this variable
    # when the kernels are defined (when `an` is imported below).
    os.environ["TRITON_INTERPRET"] = "1"

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, for `import an`

import an
from an.factory import IMPLS
from engine.errors import main_guard

SHAPES = ((64, 56, 10), (128, 28, 10), (256, 14, 20), (512, 7, 20))  # (channels, spatial size, AN's K)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(
    layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, device: torch.device, backward: bool = True
) -> float:
    """Seconds for one forward+backward, or forward only (autocast to x's dtype when it is not float32)."""
    _sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=x.dtype, enabled=x.dtype != torch.float32):
        y = layer(x)
    if backward:
        y.backward(g)
    _sync(device)
    elapsed = time.perf_counter() - t0
    x.grad = None
    layer.zero_grad(set_to_none=True)
    return elapsed


def time_layers(
    layers: dict[str, torch.nn.Module],
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
    stat: str = "median",
    memory_format: torch.memory_format = torch.contiguous_format,
    backward: bool = True,
) -> dict[str, float]:
    """Seconds (median or min over rounds) of one forward+backward of each layer on the same input of ``shape``.

    The layers are timed round-robin (one iteration of each per round), so a transient load on the machine
    affects all of them alike and the ratios stay meaningful.

    Args:
        layers: Name -> layer (float32 parameters, train mode).
        shape: Input shape (N, C, H, W).
        device: Where to run.
        dtype: Input dtype (and autocast dtype when not float32).
        repeats: Timed rounds.
        warmup: Untimed rounds first.
        stat: ``"median"`` or ``"min"`` (the min is the more robust to other load on a shared machine).
        memory_format: Of the input and of the output gradient (e.g. ``torch.channels_last``).
        backward: Time forward+backward (True) or the training-mode forward alone.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype, memory_format=memory_format)
    x.requires_grad_()
    g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype, memory_format=memory_format)
    layers = {name: layer.to(device).train() for name, layer in layers.items()}
    times: dict[str, list[float]] = {name: [] for name in layers}
    for i in range(warmup + repeats):
        for name, layer in layers.items():
            t = _step(layer, x, g, device, backward)
            if i >= warmup:
                times[name].append(t)
    reduce = statistics.median if stat == "median" else min
    return {name: reduce(ts) for name, ts in times.items()}


def _build(name: str, channels: int, k: int, impl: str) -> torch.nn.Module:
    kwargs = {}
    if name in ("an", "an_gn"):
        kwargs.update(k=k, impl=impl)
    return an.create_norm(name, channels, **kwargs)


# ---------------------------------------------------------------------------------------------- kernel counting
# aten ops that launch no device kernel: allocations (and views, recognised by OpOverload.is_view).
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "sym_size", "sym_stride",
              "sym_numel", "sym_storage_offset", "is_contiguous", "lift_fresh"}  # fmt: skip


class KernelCounter(TorchDispatchMode):
    """Counts kernel launches: aten ops that reach the dispatcher (what eager PyTorch turns into device kernels)
    and Triton launches (compiled kernels and Triton's interpreter alike), by name.

    ``aten`` counts ops that launch a kernel, ``no_kernel`` the allocations and views (they launch none),
    ``triton`` the Triton launches; the torch ops Triton's interpreter issues while it runs a kernel are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.aten: collections.Counter = collections.Counter()
        self.no_kernel: collections.Counter = collections.Counter()
        self.triton: collections.Counter = collections.Counter()
        self._in_triton = 0
        self._patched: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._in_triton:
            name = func.overloadpacket.__name__
            (self.no_kernel if func.is_view or name in _NO_KERNEL else self.aten)[name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        with contextlib.suppress(ImportError):  # no Triton: nothing to patch
            import triton.runtime.interpreter as interp
            import triton.runtime.jit as jit

            for cls in (jit.JITFunction, interp.InterpretedFunction):
                self._patched.append((cls, cls.run))
                cls.run = self._wrap(cls.run)
        return super().__enter__()

    def __exit__(self, *exc):
        for cls, orig in self._patched:
            cls.run = orig
        self._patched.clear()
        return super().__exit__(*exc)

    def _wrap(self, orig):
        counter = self

        def run(kernel, *args, grid, warmup, **kwargs):
            if not warmup:
                counter.triton[getattr(kernel, "__name__", None) or getattr(kernel.fn, "__name__", "?")] += 1
            counter._in_triton += 1
            try:
                return orig(kernel, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                counter._in_triton -= 1

        return run

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())


def count_kernels(layer: torch.nn.Module, x: torch.Tensor, backward: bool = True) -> KernelCounter:
    """Kernel launches of one ``layer(x)`` (and its backward, with a given output gradient) after a warm-up call."""
    g = torch.ones_like(x)

    def step():
        xx = x.detach().requires_grad_(backward)
        with torch.autocast(x.device.type, dtype=x.dtype, enabled=x.dtype != torch.float32):
            y = layer(xx)
        if backward:
            y.backward(g)
        layer.zero_grad(set_to_none=True)

    step()
    with KernelCounter() as counter:
        step()
    return counter


def run_count_kernels(args: argparse.Namespace) -> str:
    """Markdown table: kernel launches per layer, forward+backward in training and forward in evaluation."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    c, s, k = SHAPES[args.count_shape]
    x = torch.randn(args.batch_size, c, s, s).to(device=device, dtype=dtype, memory_format=fmt)
    layers = {"bn": an.create_norm("bn", c)}
    for impl in ("reference", "fused", "compile"):
        layers[f"an ({impl}{', run eagerly' if impl == 'compile' else ''})"] = an.create_norm("an", c, k=k, impl=impl)
    if "an (fused)" in layers:
        import an.fused as fused

        kernels = fused._kernels_for(x, "auto").name
        layers[f"an (fused, {kernels} kernels)"] = layers.pop("an (fused)")
    lines = [
        f"Kernel launches per layer at C={c} @ {s}x{s}, K={k}, batch {args.batch_size}, {args.dtype}, "
        f"{'channels_last' if args.channels_last else 'NCHW'}, on {device.type}"
        + (" (Triton kernels in Triton's interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else ""),
        "",
        "| layer | train fwd+bwd | of which Triton | eval fwd | aten ops (train) |",
        "|---|---|---|---|---|",
    ]
    for name, layer in layers.items():
        layer = layer.to(device).train()
        train = count_kernels(layer, x, backward=True)
        evaluation = count_kernels(layer.eval(), x, backward=False)
        ops = ", ".join(f"{op} {n}" for op, n in train.aten.most_common())
        triton_launches = sum(train.triton.values())
        lines.append(f"| {name} | {train.total} | {triton_launches} | {evaluation.total} | {ops or '-'} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> str:
    """Runs the benchmark and returns the markdown table."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    names = args.norms or an.list_norms()
    if "bn" not in names:
        names = ["bn", *names]
    per_shape = []
    for c, s, k in SHAPES:
        layers = {name: _build(name, c, k, args.impl) for name in names}
        shape = (args.batch_size, c, s, s)
        per_shape.append(time_layers(layers, shape, device, dtype, args.repeats, args.warmup, args.stat))
    header = "| norm | " + " | ".join(f"C={c} @ {s}x{s} (K={k})" for c, s, k in SHAPES) + " |"
    lines = [header, "|---|" + "---|" * len(SHAPES)]
    for name in names:
        cells = [f"{r[name] * 1e3:.2f} ms ({r[name] / r['bn']:.2f}x)" for r in per_shape]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_an_impls(args: argparse.Namespace) -> str:
    """Compares AN implementations: markdown table of forward and forward+backward ms and achieved GB/s."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    lines = [
        "| impl | pass | " + " | ".join(f"C={c} @ {s}x{s} (K={k})" for c, s, k in SHAPES) + " |",
        "|---|---|" + "---|" * len(SHAPES),
    ]
    cells: dict[tuple[str, str], list[str]] = {}
    for c, s, k in SHAPES:
        torch.manual_seed(0)
        layers = {impl: an.create_norm("an", c, k=k, impl=impl) for impl in args.an_impls}
        state = next(iter(layers.values())).state_dict()
        for impl, layer in layers.items():
            layer.load_state_dict(state)
            if impl == "compile":
                layers[impl] = torch.compile(layer)
        shape = (args.batch_size, c, s, s)
        tensor_bytes = args.batch_size * c * s * s * dtype.itemsize
        for label, backward, passes in (("fwd", False, 3), ("fwd+bwd", True, 8)):
            times = time_layers(layers, shape, device, dtype, args.repeats, args.warmup, args.stat, fmt, backward)
            for impl, t in times.items():
                gbs = passes * tensor_bytes / t / 1e9
                cells.setdefault((impl, label), []).append(f"{t * 1e3:.3f} ms, {gbs:.0f} GB/s")
    for (impl, label), row in cells.items():
        lines.append(f"| {impl} | {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20, help="timed rounds per shape (one iteration of each layer)")
    p.add_argument("--stat", default="median", choices=("median", "min"), help="statistic over the rounds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="input dtype; autocast if not float32")
    p.add_argument("--impl", default="auto", choices=IMPLS, help="AN implementation")
    p.add_argument(
        "--an-impls", nargs="+", choices=IMPLS, default=None, help="compare these AN implementations instead of norms"
    )
    p.add_argument("--channels-last", action="store_true", help="channels_last input and gradient")
    p.add_argument("--norms", nargs="*", default=None, help=f"subset of {an.list_norms()} (bn is always included)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument(
        "--count-kernels",
        action="store_true",
        help="count kernel launches per layer instead of timing (aten ops + Triton launches; on the CPU the Triton "
        "kernels run in Triton's interpreter)",
    )
    p.add_argument("--count-shape", type=int, default=0, choices=range(len(SHAPES)), help="shape index for counting")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.count_kernels:
        print(f"torch {torch.__version__}, device {args.device}")
        print(run_count_kernels(args))
        return
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{_cpu_name()}, {os.cpu_count()} CPUs"
    layout = "channels_last" if args.channels_last else "NCHW"
    what = f"AN impls {' '.join(args.an_impls)}" if args.an_impls else f"impl {args.impl}"
    print(
        f"torch {torch.__version__}, device {args.device} ({device_name}), threads {torch.get_num_threads()}, "
        f"batch {args.batch_size}, dtype {args.dtype}, {layout}, {what}; {args.stat} of {args.repeats} round-robin "
        "rounds of one iteration per layer"
    )
    print(run_an_impls(args) if args.an_impls else run(args))


if __name__ == "__main__":
    sys.exit(main_guard(main))
