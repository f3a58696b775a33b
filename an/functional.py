"""Shared numerics for the normalization layers of this package (ours; no paper-specific content).

Every layer here (AN, SN, IEBN) needs the same two passes over a 4-D activation:

1. per-(n, c) statistics over (H, W): :func:`channel_stats`;
2. a per-(n, c) affine ``y = x * scale + shift``: :func:`channel_affine`.

Batch statistics (BN) and group statistics (GN) are derived from the per-(n, c) ones with the law of total
variance (numerically stable: both terms are non-negative), so a layer makes one statistics pass and one
output pass over its input, instead of one for its attention/gate statistics, two inside ``F.batch_norm``
and two more for the per-sample affine. Both passes are ``torch.autograd.Function`` objects whose
backward is written with ordinary differentiable torch ops (so double backward works), which on CPU is about
twice as fast as letting autograd differentiate ``var_mean`` and a broadcast ``addcmul``. On CPU the kernels
are split further (see ``SPLIT_KERNEL_DEVICES``).

:func:`standardize_affine` is the composition point: given the layer's standardizer submodule, it either
takes the fast path (an exact :class:`~an.standardize.BatchStandardize2d` / :class:`~an.standardize.GroupStandardize2d`,
or an affine-free ``nn.BatchNorm2d`` / ``nn.GroupNorm``: statistics folded into ``scale``/``shift``, running
statistics updated exactly as ``nn.BatchNorm2d`` would) or calls the submodule (anything else, e.g. the
``nn.SyncBatchNorm`` that :func:`an.convert_sync_norm` puts there) and applies the affine to its output. Note that
forward hooks on the standardizer only fire on the second path.

:func:`plain_ops` says when a layer must use its plain-op formulation instead (TorchScript, ``torch.jit.trace``,
``torch.fx`` symbolic tracing, ``torch.export``): custom autograd Functions cannot be saved by TorchScript, and
symbolic tracers cannot follow Python-side shape checks.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from an.standardize import BatchStandardize2d, GroupStandardize2d

try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_tracing
except ImportError:  # pragma: no cover  (older torch: the flag is also set by torch.export, which is checked first)
    from torch.fx._symbolic_trace import is_fx_tracing as _fx_tracing

__all__ = [
    "BN_STANDARDIZERS",
    "GN_STANDARDIZERS",
    "ChannelStatsForward",
    "centered_affine",
    "channel_affine",
    "channel_stats",
    "compute_dtype",
    "fp32_region",
    "hw_unbiased",
    "mixture_affine",
    "plain_ops",
    "standardize_affine",
    "standardizer_stats",
    "unbias_factor",
]

# Standardizer types the fast paths handle (when affine-free): ours, and torch's for hand-built layers.
BN_STANDARDIZERS = (BatchStandardize2d, nn.BatchNorm2d)
GN_STANDARDIZERS = (GroupStandardize2d, nn.GroupNorm)


def plain_ops() -> bool:
    """Whether the caller is being traced or exported (``torch.jit.trace``, ``torch.fx``, ``torch.export``), so a
    layer must run its plain-op formulation. False in eager mode and under ``torch.compile`` (which follows the
    eager formulation). TorchScript is detected by the layers themselves (``torch.jit.is_scripting()``)."""
    if torch.compiler.is_compiling():
        return torch.compiler.is_exporting()
    return torch.jit.is_tracing() or _fx_tracing()


def unbias_factor(x: Tensor) -> Tensor:
    """``H*W / (H*W - 1)`` of a 4-D tensor as a 0-d tensor (1 when H*W == 1), computed from x by tensor ops, so
    that a traced or exported graph computes it for the size it is given rather than the size it was traced at."""
    hw = torch.ones_like(x[:1, :1]).sum()
    return hw / (hw - 1).clamp(min=1)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the statistics and mixture math run in: float32 for low-precision inputs, else x's own."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


# Device types with an autocast mode. A fixed tuple rather than torch.amp.is_autocast_available(), which
# torch.compile cannot trace in torch 2.11 (a graph break inside every AN layer).
AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")


def fp32_region(x: Tensor) -> contextlib.AbstractContextManager:
    """A context that turns autocast off for x's device (a no-op when autocast is not active there)."""
    dev = x.device.type
    if dev in AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


# Devices where single torch kernels (var_mean's Welford loop, a broadcast addcmul) are slower than simple
# passes: on CPU (torch 2.14, AMD EPYC) var_mean over (H, W) is ~20x slower than mean + centred squares and
# addcmul 2-3x slower than mul + add_. Elsewhere (CUDA) the single kernels win.
SPLIT_KERNEL_DEVICES = ("cpu",)


def _split(x: Tensor) -> bool:
    return x.device.type in SPLIT_KERNEL_DEVICES


def _fma(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` with (N, C) ``scale``/``shift`` broadcast over (H, W)."""
    scale, shift = scale[:, :, None, None], shift[:, :, None, None]
    return torch.mul(x, scale).add_(shift) if _split(x) else torch.addcmul(shift, x, scale)


class _ChannelStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:
        if _split(x):  # two passes with exact centring: as accurate as var_mean
            mean = x.mean((2, 3))
            var = (x - mean[:, :, None, None]).square_().mean((2, 3))
        else:
            var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx, g_mean: Tensor, g_var: Tensor) -> Tensor:
        x, mean = ctx.saved_tensors
        hw = x.shape[2] * x.shape[3]
        # d mean / dx = 1/HW; d var / dx = 2 (x - mean) / HW  ->  grad_x = x * p + q, one pass.
        p = g_var * (2.0 / hw)
        q = g_mean / hw - p * mean
        return _fma(x, p, q)


class _ChannelAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        ctx.save_for_backward(x, scale)
        return _fma(x, scale, shift)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, scale = ctx.saved_tensors
        gx = g * scale[:, :, None, None] if ctx.needs_input_grad[0] else None
        gs = (g * x).sum((2, 3)) if ctx.needs_input_grad[1] else None
        gb = g.sum((2, 3)) if ctx.needs_input_grad[2] else None
        return gx, gs, gb


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) mean and biased variance over (H, W) of a 4-D tensor (one kernel; two exact passes on CPU).

    Args:
        x: Input of shape (N, C, H, W).

    Returns:
        ``(mean, var)``, each of shape (N, C); ``var`` uses the divisor H*W.
    """
    return _ChannelStats.apply(x)


def channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale[:, :, None, None] + shift[:, :, None, None]`` with a single-pass backward.

    Args:
        x: Input of shape (N, C, H, W).
        scale: Per-(n, c) scale, shape (N, C).
        shift: Per-(n, c) shift, shape (N, C).
    """
    return _ChannelAffine.apply(x, scale, shift)


class ChannelStatsForward:
    """Mixin with the ``forward`` the layers of this package share (AN, IEBN, SN; listed before ``nn.Module``).

    Under TorchScript and in plain-op mode (:func:`plain_ops`) it runs the layer's ``forward_plain``. Otherwise it
    checks for a 4-D input and, with autocast off (:func:`fp32_region`), makes the one statistics pass
    (:func:`channel_stats` of the input in :func:`compute_dtype`) and hands the input in that dtype and its
    per-(n, c) ``mean``/biased ``var`` to the layer's ``_forward_stats(xf, mean, var)``; the result is cast back to
    the input's dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self.forward_plain(x)
        if plain_ops():
            return self.forward_plain(x)
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        with fp32_region(x):
            xf = x.to(compute_dtype(x))
            mean, var = channel_stats(xf)
            y = self._forward_stats(xf, mean, var)
        return y.to(x.dtype)


def hw_unbiased(var: Tensor, hw: int) -> Tensor:
    """The unbiased per-(n, c) variance over H*W positions from the biased one (0 stays 0 when H*W == 1)."""
    return var * (hw / (hw - 1)) if hw > 1 else var


def mixture_affine(lam: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) ``(scale, shift) = (lam @ weight, lam @ bias)``: the attention-weighted mixture of K affines.

    Args:
        lam: Attention weights (N, K).
        weight: Gamma (K, C), cast to lam's dtype.
        bias: B (K, C), cast to lam's dtype.
    """
    return lam @ weight.to(lam.dtype), lam @ bias.to(lam.dtype)


def _bn_stats(bn: nn.Module, x: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased var) that ``bn`` would normalize with; updates its buffers as BN does."""
    factor = 0.0
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    if not use_batch:
        return bn.running_mean.to(mean.dtype), bn.running_var.to(mean.dtype)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    mu = mean.mean(0)
    sigma2 = var.mean(0) + (mean - mu).square().mean(0)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.running_mean.lerp_(mu.to(bn.running_mean.dtype), factor)
            bn.running_var.lerp_((sigma2 * (count / (count - 1))).to(bn.running_var.dtype), factor)
    return mu, sigma2


def _gn_stats(gn: nn.Module, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) (mean, biased var) of the group each channel belongs to."""
    n, c = mean.shape
    m = mean.view(n, gn.num_groups, c // gn.num_groups)
    mu = m.mean(2, keepdim=True)
    sigma2 = var.view_as(m).mean(2, keepdim=True) + (m - mu).square().mean(2, keepdim=True)
    return mu.expand_as(m).reshape(n, c), sigma2.expand_as(m).reshape(n, c)


def standardizer_stats(norm: nn.Module, x: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, biased variance) that an affine-free BN / GN standardizer (``BN_STANDARDIZERS``, ``GN_STANDARDIZERS``)
    normalizes with.

    BatchNorm: per channel (C,), batch or running statistics as ``norm.training`` says, updating the running
    statistics exactly as ``nn.BatchNorm2d`` does. GroupNorm: per (n, c), each channel's group statistics.

    Args:
        norm: The standardizer.
        x: Its input (N, C, H, W) (supplies the shape).
        mean: ``channel_stats(x)[0]``.
        var: ``channel_stats(x)[1]``.
    """
    if isinstance(norm, GN_STANDARDIZERS):
        return _gn_stats(norm, mean, var)
    return _bn_stats(norm, x, mean, var)


def centered_affine(
    norm: nn.Module, x: Tensor, mean: Tensor, var: Tensor, scale: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-(n, c) ``(a, b)`` with ``norm(x) * scale + shift == (x - mean) * a + b`` (see :func:`standardizer_stats`).

    Centring on the per-(n, c) mean avoids the cancellation of the folded ``x * a + (shift - mu * a)`` when
    ``|mean| >> std``.
    """
    mu, sigma2 = standardizer_stats(norm, x, mean, var)
    a = scale * torch.rsqrt(sigma2 + norm.eps)
    return a, shift + a * (mean - mu)


def standardize_affine(norm: nn.Module, x: Tensor, mean: Tensor, var: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``norm(x) * scale + shift`` with per-(n, c) ``scale``/``shift``, reusing x's per-(n, c) statistics.

    Args:
        norm: The standardizer (normally a :class:`~an.standardize.BatchStandardize2d` or
            :class:`~an.standardize.GroupStandardize2d`).
        x: Input (N, C, H, W) in the compute dtype.
        mean: ``channel_stats(x)[0]``.
        var: ``channel_stats(x)[1]``.
        scale: Per-(n, c) scale, shape (N, C).
        shift: Per-(n, c) shift, shape (N, C).
    """
    kind = type(norm)
    if kind in BN_STANDARDIZERS and not norm.affine:
        mu, sigma2 = _bn_stats(norm, x, mean, var)
        a = scale * torch.rsqrt(sigma2 + norm.eps)
    elif kind in GN_STANDARDIZERS and not norm.affine:
        mu, sigma2 = _gn_stats(norm, mean, var)
        a = scale * torch.rsqrt(sigma2 + norm.eps)
    else:  # generic composition: e.g. nn.SyncBatchNorm after convert_sync_norm
        return channel_affine(norm(x), scale, shift)
    # Folded affine, as BN inference kernels do: the rounding error of x * a is relative to |x|, harmless
    # unless |mean| >> std (1e3 x std costs ~1e-4 relative error in float32).
    return channel_affine(x, a, shift - mu * a)
