"""Fused Attentive Normalization: two passes over the activation forward and two backward (ours).

Selected by ``create_norm('an' | 'an_gn', C, impl='fused')`` (:data:`FUSED_NORMS`). From the per-(n, c) mean
``m`` and biased variance ``v`` of ``x`` over (H, W), everything in AN except two passes over ``x`` is small
(N, C) / (N, K) / (K, C) math in ordinary torch ops (:func:`_mixture`, the same code as the reference's):

    lam        = attention(m, v * HW / (HW - 1))     # module call: its hooks fire, its BN's running stats update
    mu, sigma2 = batch (BN) or group (GN) statistics from (m, v) by the law of total variance (+ running stats)
    a          = (lam @ Gamma) / sqrt(sigma2 + eps)
    b          = lam @ B + a * (m - mu)
    y          = (x - m) * a + b                     # = the reference's gamma~ * x_hat + beta~

Passes over x (each reads the N*C*H*W input-dtype elements once; statistics and accumulation in float32):

- forward  (a) per-(n, c) sum(x - p), sum((x - p)^2) with the pivot p = x[n, c, 0, 0] (robust when |mean| >> std;
  the H*W range may be split across programs, the partial sums are added in torch); (b) y = (x - m) * a + b.
- backward (c) per-(n, c) sum(g) = dL/db and sum(g * (x - m)) = dL/da (and dL/dm = -a sum(g) from y's own use
  of m); autograd then differentiates the small math as usual (exact for every attention mode; parameters get
  their gradients and hooks like anywhere else) down to dL/dm and dL/dv; (d) dx = a * g + beta * (x - m) + alpha
  with beta = 2 dL/dv / HW and alpha = dL/dm / HW (m and v are linear and quadratic in x). Two autograd Functions
  (``_Stats``: (a) and (d); ``_Affine``: (b) and (c)) bracket the small math; the first backward hands g to the
  second, so dx is written once. No double backward (``once_differentiable``).

Minimum traffic: forward 2 reads + 1 write of x's size, backward 2 x (g, x) reads + 1 write. Centring on ``m``
avoids the cancellation in the reference's ``x * a + (b - mu * a)`` when |mean| >> std (what remains there is the
float32 rounding of the means themselves, common to both).

Kernels: Triton on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` is set (Triton's interpreter,
for tests); anywhere else, and for float64, torch implementations of the same four passes run inside the same
autograd Functions. ``layer.kernels``: ``'auto'`` (that rule), ``'triton'`` (raise if Triton cannot run here) or
``'torch'``. Inputs: NCHW or channels_last (the output keeps the format), float32 / bfloat16 / float16 (output in
the input dtype, like the reference under autocast). The forward is hidden from ``torch.compile``
(``torch.compiler.disable``): a compiled model runs these layers eagerly; :data:`COMPILE_NORMS`
(``impl='compile'``) is the formulation meant for ``torch.compile`` instead: plain differentiable torch ops that
inductor can fuse (run eagerly it is slower than the reference; compile the model, ``train.compile: true``).

Both kinds fall back to the reference forward when the standardizer or the attention BN is not an exact
``nn.BatchNorm2d`` / ``nn.GroupNorm`` (e.g. the ``nn.SyncBatchNorm`` put there by :func:`an.convert_sync_norm`,
whose statistics span ranks). Parameters, buffers and the state_dict are the reference classes' (subclasses).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from an.attentive import AttentiveBatchNorm2d, AttentiveGroupNorm2d, AttentiveNorm2d
from an.functional import _bn_stats, _gn_stats, compute_dtype, fp32_region

__all__ = [
    "COMPILE_NORMS",
    "FUSED_NORMS",
    "KERNELS",
    "CompileAttentiveBatchNorm2d",
    "CompileAttentiveGroupNorm2d",
    "FusedAttentiveBatchNorm2d",
    "FusedAttentiveGroupNorm2d",
    "triton_available",
]

KERNELS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Launch shape (to be tuned on the GPU): ~TILE elements per loop step; the H*W range is split until there are
# PROGRAMS_PER_SM programs per multiprocessor (CPU_PROGRAMS in Triton's interpreter: fewest, largest programs).
TILE, NUM_WARPS, PROGRAMS_PER_SM, CPU_PROGRAMS = 2048, 4, 8, 1


# ---------------------------------------------------------------------------------------------- small math
def _mixture(layer: AttentiveNorm2d, mean: Tensor, var: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) ``(a, b)`` with ``y = (x - mean) * a + b``, from x's per-(n, c) mean and biased variance.

    Updates the running statistics exactly as the reference does (train mode). ``x`` only supplies the shape.
    """
    hw = x.shape[2] * x.shape[3]
    lam = layer.attention(mean, var * (hw / (hw - 1)) if hw > 1 else var)  # unbiased; 0 at 1x1
    scale = lam @ layer.mixture_weight.to(mean.dtype)
    shift = lam @ layer.mixture_bias.to(mean.dtype)
    norm = layer.norm
    mu, sigma2 = _gn_stats(norm, mean, var) if isinstance(norm, nn.GroupNorm) else _bn_stats(norm, x, mean, var)
    a = scale * torch.rsqrt(sigma2 + norm.eps)
    return a, shift + a * (mean - mu)


def _fusable(layer: AttentiveNorm2d) -> bool:
    """Exact affine-free BN/GN standardizer and a plain BN in the attention (not, e.g., SyncBatchNorm)."""
    return (
        type(layer.norm) in (nn.BatchNorm2d, nn.GroupNorm)
        and not layer.norm.affine
        and type(layer.attention.bn) is nn.BatchNorm2d
    )


def _dense(x: Tensor) -> tuple[Tensor, bool]:
    """``x`` as a dense NCHW or channels_last tensor (copying only if it is neither), and whether it is the latter.

    When both hold (H*W == 1 or C == 1, where the two layouts address alike) the one with wider tiles is chosen.
    """
    nchw, cl = x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last)
    if nchw and cl:
        return x, x.shape[2] * x.shape[3] == 1
    return (x, cl) if nchw or cl else (x.contiguous(), False)


def _col(t: Tensor) -> Tensor:
    return t[:, :, None, None]


# ---------------------------------------------------------------------------------------------- torch kernels
class _TorchKernels:
    """The four passes in torch ops (any device and dtype; accumulation in the compute dtype)."""

    name = "torch"

    @staticmethod
    def stats(x: Tensor, cl: bool) -> tuple[Tensor, Tensor]:
        xf = x.to(compute_dtype(x))
        mean = xf.mean((2, 3))
        return mean, (xf - _col(mean)).square_().mean((2, 3))  # exact centring

    @staticmethod
    def grad_sums(g: Tensor, x: Tensor, cl: bool, mean: Tensor) -> tuple[Tensor, Tensor]:
        gf = g.to(mean.dtype)
        return gf.sum((2, 3)), (gf * (x.to(mean.dtype) - _col(mean))).sum((2, 3))

    @staticmethod
    def affine(x, cl, mean, s1, s0, g=None, a=None) -> Tensor:
        """``(x - mean) * s1 + s0 (+ g * a)`` per (n, c), in x's dtype and memory format."""
        out = (x.to(mean.dtype) - _col(mean)).mul_(_col(s1)).add_(_col(s0))
        if g is not None:
            out.addcmul_(g.to(mean.dtype), _col(a))
        return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------- Triton kernels
try:  # optional: without Triton the torch kernels run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

# triton.jit reads TRITON_INTERPRET when the kernels below are defined, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    """Whether Triton is installed (the kernels still need CUDA tensors unless ``TRITON_INTERPRET`` was set)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _tile(n, c, hw0, C, HW, CL: tl.constexpr, BLOCK_HW: tl.constexpr):
        # Offsets and mask of the [BLOCK_C, BLOCK_HW] tile of sample n, channels c, positions hw0 + arange.
        hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = (c[:, None] < C) & (hw[None, :] < HW)
        base = n.to(tl.int64) * C * HW
        if CL:
            offs = base + (hw[None, :] * C + c[:, None])
        else:
            offs = base + (c[:, None] * HW + hw[None, :])
        return offs, mask

    @triton.jit
    def _reduce_kernel(
        x_ptr, g_ptr, center_ptr, part_ptr, C, HW, NC,
        CHUNK: tl.constexpr, GRAD: tl.constexpr, CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    ):  # fmt: skip
        # part[0|1, split, n, c] = sums over this program's H*W range of w and w * u, u = x - center[n, c],
        # w = u (statistics) or w = g (GRAD: dL/db and dL/da).
        n, split = tl.program_id(0), tl.program_id(2)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        nc = n * C + c
        center = tl.load(center_ptr + nc, mask=c < C, other=0.0)[:, None]
        acc_w = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
        acc_wu = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
        lo = split * CHUNK
        # CHUNK is a multiple of BLOCK_HW and _tile masks positions >= HW, so the loop bounds can be static
        # (a runtime bound such as min(lo + CHUNK, HW) breaks Triton 3.6's interpreter).
        for i in range(0, CHUNK, BLOCK_HW):
            offs, mask = _tile(n, c, lo + i, C, HW, CL, BLOCK_HW)
            u = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - center, 0.0)
            if GRAD:
                w = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                w = u
            acc_w += w
            acc_wu += w * u
        out = split * NC + nc
        tl.store(part_ptr + out, tl.sum(acc_w, axis=1), mask=c < C)
        tl.store(part_ptr + tl.num_programs(2) * NC + out, tl.sum(acc_wu, axis=1), mask=c < C)

    @triton.jit
    def _affine_kernel(
        x_ptr, g_ptr, out_ptr, center_ptr, s1_ptr, s0_ptr, a_ptr, C, HW,
        CHUNK: tl.constexpr, GRAD: tl.constexpr, CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    ):  # fmt: skip
        # out = (x - center) * s1 + s0 (+ g * a if GRAD), per-(n, c) coefficients, in out's dtype.
        n = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        nc = n * C + c
        center = tl.load(center_ptr + nc, mask=c < C, other=0.0)[:, None]
        s1 = tl.load(s1_ptr + nc, mask=c < C, other=0.0)[:, None]
        s0 = tl.load(s0_ptr + nc, mask=c < C, other=0.0)[:, None]
        if GRAD:
            a = tl.load(a_ptr + nc, mask=c < C, other=0.0)[:, None]
        lo = tl.program_id(2) * CHUNK
        for i in range(0, CHUNK, BLOCK_HW):
            offs, mask = _tile(n, c, lo + i, C, HW, CL, BLOCK_HW)
            out = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - center) * s1 + s0
            if GRAD:
                out += tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * a
            tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _p2(v: int) -> int:
    """The next power of two >= v (>= 1)."""
    return 1 << (max(v, 1) - 1).bit_length()


def _launch_shape(x: Tensor, cl: bool) -> tuple[tuple[int, int, int], dict]:
    """Grid (N, channel blocks, H*W splits) and the kernels' CHUNK/CL/BLOCK_* arguments."""
    n, c, h, w = x.shape
    hw = h * w
    if cl:  # channels contiguous: wide in C (blocks of at least 2: no size-1 aranges)
        block_c = min(_p2(max(c, 2)), 128)
        block_hw = min(_p2(max(hw, 2)), max(2, TILE // block_c))
    else:  # H*W contiguous: wide in H*W
        block_hw = min(_p2(max(hw, 2)), 1024)
        block_c = min(_p2(max(c, 2)), max(2, TILE // block_hw))
    c_blocks, tiles = -(-c // block_c), -(-hw // block_hw)
    target = PROGRAMS_PER_SM * _sm_count(x.device) if x.is_cuda else CPU_PROGRAMS
    per_split = -(-tiles // max(1, min(tiles, -(-target // (n * c_blocks)))))
    chunk = per_split * block_hw
    return (n, c_blocks, -(-hw // chunk)), dict(CHUNK=chunk, CL=cl, BLOCK_C=block_c, BLOCK_HW=block_hw)


class _TritonKernels:
    """The four passes as two Triton kernels (float32 / bfloat16 / float16 inputs, float32 accumulation)."""

    name = "triton"

    @staticmethod
    def _sums(x: Tensor, cl: bool, center: Tensor, g: Tensor | None) -> tuple[Tensor, Tensor]:
        grid, meta = _launch_shape(x, cl)
        n, c = x.shape[:2]
        part = torch.empty((2, grid[2], n, c), dtype=torch.float32, device=x.device)
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _reduce_kernel[grid](
                x, x if g is None else g, center, part, c, x.shape[2] * x.shape[3], n * c,
                GRAD=g is not None, num_warps=NUM_WARPS, **meta,
            )  # fmt: skip
        s = part.sum(1)
        return s[0], s[1]

    @staticmethod
    def stats(x: Tensor, cl: bool) -> tuple[Tensor, Tensor]:
        pivot = x[:, :, 0, 0].float().contiguous()
        s1, s2 = _TritonKernels._sums(x, cl, pivot, None)
        hw = x.shape[2] * x.shape[3]
        d = s1 / hw
        return pivot + d, (s2 / hw - d * d).clamp_min_(0.0)

    @staticmethod
    def grad_sums(g: Tensor, x: Tensor, cl: bool, mean: Tensor) -> tuple[Tensor, Tensor]:
        return _TritonKernels._sums(x, cl, mean.contiguous(), g)

    @staticmethod
    def affine(x, cl, mean, s1, s0, g=None, a=None) -> Tensor:
        grid, meta = _launch_shape(x, cl)
        out = torch.empty_like(x)  # same dense memory format
        vecs = [t.float().contiguous() for t in (mean, s1, s0, s1 if a is None else a)]
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _affine_kernel[grid](
                x, x if g is None else g, out, *vecs, x.shape[1], x.shape[2] * x.shape[3],
                GRAD=g is not None, num_warps=NUM_WARPS, **meta,
            )  # fmt: skip
        return out


def _kernels_for(x: Tensor, kernels: str):
    """The kernel set for ``x`` under the layer's ``kernels`` setting (see the module docstring)."""
    if kernels not in KERNELS:
        raise ValueError(f"AN fused: kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels == "torch":
        return _TorchKernels
    reason = None
    if triton is None:
        reason = "triton is not installed"
    elif x.dtype not in TRITON_DTYPES:
        reason = f"the input dtype is {x.dtype} (Triton kernels take {', '.join(map(str, TRITON_DTYPES))})"
    elif x.device.type != "cuda" and not INTERPRET:
        reason = f"the input is on {x.device.type} (Triton needs CUDA, or TRITON_INTERPRET=1 for its interpreter)"
    if reason is None:
        return _TritonKernels
    if kernels == "triton":
        raise RuntimeError(f"AN fused: kernels='triton' was requested but cannot run: {reason}")
    return _TorchKernels


# ---------------------------------------------------------------------------------------------- autograd
class _Link:
    """Hands the output gradient from ``_Affine.backward`` (which autograd runs first) to ``_Stats.backward``."""

    def __init__(self) -> None:
        self.g: Tensor | None = None
        self.a: Tensor | None = None


class _Stats(torch.autograd.Function):
    """Per-(n, c) (mean, biased var) of x: pass (a). Its backward is the only dx pass, (d)."""

    @staticmethod
    def forward(ctx, x: Tensor, cl: bool, ops, link: _Link) -> tuple[Tensor, Tensor]:
        mean, var = ops.stats(x, cl)
        ctx.save_for_backward(x, mean)
        ctx.cl, ctx.ops, ctx.link = cl, ops, link
        return mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mean: Tensor, g_var: Tensor):
        x, mean = ctx.saved_tensors
        link, hw = ctx.link, x.shape[2] * x.shape[3]
        g, a = link.g, link.a  # None when only the attention weights received a gradient
        link.g = link.a = None
        # mean is linear, var quadratic in x: dx = a * g + 2 dL/dvar (x - mean) / HW + dL/dmean / HW.
        dx = ctx.ops.affine(x, ctx.cl, mean, g_var * (2.0 / hw), g_mean / hw, g=g, a=a)
        return dx, None, None, None


class _Affine(torch.autograd.Function):
    """y = (x - mean) * a + b per (n, c): pass (b). Backward: pass (c), the gradients of mean, a and b; the
    ``a * g`` part of dx is left to ``_Stats.backward``, which runs later and writes all of dx in one pass."""

    @staticmethod
    def forward(ctx, x: Tensor, mean: Tensor, a: Tensor, b: Tensor, cl: bool, ops, link: _Link) -> Tensor:
        ctx.save_for_backward(x, mean, a)
        ctx.cl, ctx.ops, ctx.link = cl, ops, link
        return ops.affine(x, cl, mean, a, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor):
        x, mean, a = ctx.saved_tensors
        g = gy.contiguous(memory_format=torch.channels_last if ctx.cl else torch.contiguous_format)
        sum_g, sum_gu = ctx.ops.grad_sums(g, x, ctx.cl, mean)  # dL/db, dL/da
        if ctx.needs_input_grad[0]:
            ctx.link.g, ctx.link.a = g, a
        return None, -a * sum_g, sum_gu, sum_g, None, None, None


def _fused_forward(layer: AttentiveNorm2d, x: Tensor) -> Tensor:
    ops = _kernels_for(x, layer.kernels)
    with fp32_region(x):
        x, cl = _dense(x)
        link = _Link()
        mean, var = _Stats.apply(x, cl, ops, link)
        a, b = _mixture(layer, mean, var, x)  # small (N, C) math, recorded by autograd as usual
        return _Affine.apply(x, mean, a, b, cl, ops, link)


def _compile_forward(layer: AttentiveNorm2d, x: Tensor) -> Tensor:
    with fp32_region(x):
        xf = x.to(compute_dtype(x))
        var, mean = torch.var_mean(xf, dim=(2, 3), correction=0)
        a, b = _mixture(layer, mean, var, x)
        y = (xf - _col(mean)) * _col(a) + _col(b)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------- layers
class _FusedMixin:
    """Swaps the forward of an AN class for :class:`_FusedAN`; everything else (state) is the reference's."""

    kernels: str = "auto"  # 'auto' | 'triton' | 'torch' (instance attribute to override)

    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or not _fusable(self):
            return super().forward(x)
        return _fused_forward(self, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl='fused'"


class _CompileMixin:
    """Swaps the forward of an AN class for plain differentiable torch ops (for ``torch.compile``)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or not _fusable(self):
            return super().forward(x)
        return _compile_forward(self, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl='compile'"


class FusedAttentiveBatchNorm2d(_FusedMixin, AttentiveBatchNorm2d):
    """:class:`~an.AttentiveBatchNorm2d` with the fused forward/backward (``create_norm('an', impl='fused')``)."""


class FusedAttentiveGroupNorm2d(_FusedMixin, AttentiveGroupNorm2d):
    """:class:`~an.AttentiveGroupNorm2d` with the fused forward/backward (group statistics from the same pass)."""


class CompileAttentiveBatchNorm2d(_CompileMixin, AttentiveBatchNorm2d):
    """:class:`~an.AttentiveBatchNorm2d` in plain torch ops, for ``torch.compile`` (``impl='compile'``)."""


class CompileAttentiveGroupNorm2d(_CompileMixin, AttentiveGroupNorm2d):
    """:class:`~an.AttentiveGroupNorm2d` in plain torch ops, for ``torch.compile`` (``impl='compile'``)."""


FUSED_NORMS = {"an": FusedAttentiveBatchNorm2d, "an_gn": FusedAttentiveGroupNorm2d}
COMPILE_NORMS = {"an": CompileAttentiveBatchNorm2d, "an_gn": CompileAttentiveGroupNorm2d}
