"""Fused Attentive Normalization: AN in 9 kernel launches per training step, forward and backward (ours).

Selected by ``create_norm('an' | 'an_gn', C, impl='fused')`` (:data:`FUSED_NORMS`). The layer computes what the
reference (:mod:`an.attentive`, ``docs/AN.md`` section 1.1) computes; with ``m``, ``v`` the per-(n, c) mean and
biased variance of ``x`` over (H, W):

    lam        = act(BN_K(W_att s)),  s = m / sqrt(v * HW / (HW - 1) + 1e-3)
    mu, sigma2 = batch (BN) or group (GN) statistics from (m, v) by the law of total variance
    a          = (lam @ Gamma) / sqrt(sigma2 + eps),  b = lam @ B + a * (m - mu)
    y          = (x - m) * a + b                      # = the reference's gamma~ * x_hat + beta~

**Whole path** (Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``): one autograd Function
whose forward is 4 launches and backward 5, the small (N, C) / (N, K) math and its hand-written derivative
included (no torch op launches a kernel on the way; allocations only):

- forward: (1) per-(n, c) sums of ``x - pivot`` and its square over (H, W) (``pivot = x[n, c, 0, 0]``: robust
  when |mean| >> std; H*W may be split over programs); (2) per channel block, all samples: ``m``, ``v``, BN/GN
  statistics, the standardizer's running statistics, the descriptor ``s`` and its partial attention logits;
  (3) one program: the logits' BatchNorm over the batch (and its running statistics, both ``num_batches_tracked``)
  and ``t = BN_K(z)``; (4) ``y``, with ``lam = act(t)``, ``a`` and ``b`` computed per program from ``t``.
- backward: (5) per-(n, c) sums of ``g`` and ``g * (x - m)`` (= dL/db, dL/da); (6) per channel block: dGamma, dB,
  the partial dL/dlam, dL/dsigma2 and dL/dmu; (7) one program: through the activation and the logits' BN
  (dL/dgamma_K, dL/dbeta_K, dL/dz); (8) per channel block: dW_att and the per-(n, c) coefficients of dx;
  (9) ``dx = a * g + p * (x - m) + q``.

The kernels take the batch size as a runtime argument (``do_not_specialize``; the workspace regions are
128-byte aligned): one compilation per layer shape family (C, K, H*W, dtype, layout, mode), whatever the batch.

**Composed path** (anything else: ``layer.kernels == 'torch'``, CPU tensors without the interpreter, float64,
hooks on the attention branch, GroupNorm with a group size that is not a power of two, or a standardizer / buffer
set the whole path does not cover): two autograd Functions bracket the two passes over ``x`` each way (Triton or
torch versions of them) and the small math is ordinary torch autograd through the layer's own ``attention``
module and :mod:`an.functional` (its hooks fire; ``lam`` is differentiable; double backward is not supported).

``layer.kernels``: ``'auto'`` (the rule above), ``'triton'`` (raise if Triton cannot run here) or ``'torch'``.
Inputs: NCHW or channels_last (the output keeps the format), float32 / bfloat16 / float16 (statistics and
accumulation in float32, output in the input dtype, as the reference under autocast). The forward is hidden from
``torch.compile`` (``torch.compiler.disable``): a compiled model runs these layers eagerly; :data:`COMPILE_NORMS`
(``impl='compile'``) is the formulation meant for ``torch.compile`` instead (plain differentiable torch ops).

Both kinds fall back to the reference forward when the standardizer or the attention BN is not an exact
affine-free BN / GN standardizer (``an.functional.BN_STANDARDIZERS`` / ``GN_STANDARDIZERS``; e.g. the
``nn.SyncBatchNorm`` put there by :func:`an.convert_sync_norm`,
whose statistics span ranks). Parameters, buffers and the state_dict are the reference classes' (subclasses).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from an.attentive import ATTENTION_MODES, AttentiveBatchNorm2d, AttentiveGroupNorm2d, AttentiveNorm2d
from an.functional import (
    BN_STANDARDIZERS,
    GN_STANDARDIZERS,
    centered_affine,
    compute_dtype,
    fp32_region,
    plain_ops,
)

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
# Launch shape of the passes over x (to be tuned on the GPU): ~TILE elements per loop step; the H*W range is split
# until there are PROGRAMS_PER_SM programs per multiprocessor (CPU_PROGRAMS in Triton's interpreter).
TILE, NUM_WARPS, PROGRAMS_PER_SM, CPU_PROGRAMS = 2048, 4, 8, 1
# Small-math kernels: channel block, and the largest [samples x K x channels] tile held at once.
CHANNEL_BLOCK, SMALL_TILE = 32, 8192
ALIGN = 32  # workspace regions start at multiples of 32 floats (128 bytes): pointer alignment never depends on N
EPS_ATTENTION = 1e-3  # the descriptor's epsilon (MixtureAttention.eps; checked per layer)


def _col(t: Tensor) -> Tensor:
    return t[:, :, None, None]


def _dense(x: Tensor) -> tuple[Tensor, bool]:
    """``x`` as a dense NCHW or channels_last tensor (copying only if it is neither), and whether it is the latter.

    When both hold (H*W == 1 or C == 1, where the two layouts address alike) the one with wider tiles is chosen.
    """
    nchw, cl = x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last)
    if nchw and cl:
        return x, x.shape[2] * x.shape[3] == 1
    return (x, cl) if nchw or cl else (x.contiguous(), False)


def _fusable(layer: AttentiveNorm2d) -> bool:
    """Exact affine-free BN/GN standardizer and a plain BN in the attention (not, e.g., SyncBatchNorm)."""
    return (
        type(layer.norm) in (*BN_STANDARDIZERS, *GN_STANDARDIZERS)
        and not layer.norm.affine
        and type(layer.attention.bn) is nn.BatchNorm2d
    )


# ---------------------------------------------------------------------------------------------- torch passes
class _TorchKernels:
    """The four passes over x of the composed path in torch ops (any device and dtype)."""

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
try:  # optional: without Triton the torch passes run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

# triton.jit reads TRITON_INTERPRET when the kernels below are defined, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")
ACT_CODES = {mode: i for i, mode in enumerate(ATTENTION_MODES)}  # hsigmoid 0, sigmoid 1, softmax 2


def triton_available() -> bool:
    """Whether Triton is installed (the kernels still need CUDA tensors unless ``TRITON_INTERPRET`` was set)."""
    return triton is not None


if triton is not None:
    # Batch-dependent integer arguments: never specialized on (value 1, divisibility by 16), so one compilation
    # serves every batch size.
    _BATCH_ARGS = ["N", "NC", "S", "T"]

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
    def _first(n, c, C, HW, CL: tl.constexpr):
        # Offsets of x[n, c, 0, 0] (n and c broadcast against each other).
        if CL:
            off = n.to(tl.int64) * C * HW + c
        else:
            off = n.to(tl.int64) * C * HW + c * HW
        return off

    @triton.jit
    def _act(t, km, ACT: tl.constexpr):
        # lam = act(t) over the last axis (K) of a 2-D tile; padded components (km False) get 0.
        if ACT == 0:  # hard sigmoid, relu6(t + 3) / 6
            lam = tl.minimum(tl.maximum(t + 3.0, 0.0), 6.0) / 6.0
        elif ACT == 1:
            lam = 1.0 / (1.0 + tl.exp(-t))
        else:
            tt = tl.where(km, t, float("-inf"))
            e = tl.exp(tt - tl.max(tt, axis=1)[:, None])
            lam = e / tl.sum(e, axis=1)[:, None]
        return tl.where(km, lam, 0.0)

    @triton.jit
    def _act_grad(dlam, t, lam, km, ACT: tl.constexpr):
        if ACT == 0:
            u = t + 3.0
            dt = tl.where((u > 0.0) & (u < 6.0), dlam / 6.0, 0.0)
        elif ACT == 1:
            dt = dlam * lam * (1.0 - lam)
        else:
            dt = lam * (dlam - tl.sum(dlam * lam, axis=1)[:, None])
        return tl.where(km, dt, 0.0)

    @triton.jit
    def _group_sum(val, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, GS: tl.constexpr):
        # Sum over each group of GS consecutive channels, broadcast back to [BLOCK_N, BLOCK_C].
        s = tl.sum(tl.reshape(val, [BLOCK_N, BLOCK_C // GS, GS]), axis=2)
        return tl.reshape(tl.broadcast_to(s[:, :, None], [BLOCK_N, BLOCK_C // GS, GS]), [BLOCK_N, BLOCK_C])

    @triton.jit
    def _channel_block(cb, C, K, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
        # Channels c of block cb and the K components (with their masks); offsets and mask of the [BLOCK_K, BLOCK_C]
        # tile of a row-major (K, C) matrix.
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        k = tl.arange(0, BLOCK_K)
        cm, km = c < C, k < K
        return c, cm, k, km, k[:, None] * C + c[None, :], km[:, None] & cm[None, :]

    @triton.jit
    def _split_sums(part_ptr, nc, mask, S, NC, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        # The two per-(n, c) sums of _sums_kernel, added over its S splits of H*W.
        s1 = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for sp in range(0, S):
            s1 += tl.load(part_ptr + sp * NC + nc, mask=mask, other=0.0)
            s2 += tl.load(part_ptr + (S + sp) * NC + nc, mask=mask, other=0.0)
        return s1, s2

    @triton.jit
    def _block_sum(part_ptr, idx, mask, CB, NK, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Per-(n, k) sum of the CB channel blocks' partial values (the attention logits or dL/dlam).
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for cb in range(0, CB):
            acc += tl.load(part_ptr + cb * NK + idx, mask=mask, other=0.0)
        return acc

    @triton.jit
    def _update_running(rm_ptr, rv_ptr, idx, mask, mean, var, f):
        # Running statistics as nn.BatchNorm2d updates them: r += f * (batch value - r); var is the unbiased one.
        rm = tl.load(rm_ptr + idx, mask=mask, other=0.0)
        rv = tl.load(rv_ptr + idx, mask=mask, other=0.0)
        tl.store(rm_ptr + idx, rm + f * (mean - rm), mask=mask)
        tl.store(rv_ptr + idx, rv + f * (var - rv), mask=mask)

    @triton.jit(do_not_specialize=_BATCH_ARGS)
    def _sums_kernel(
        x_ptr, g_ptr, m_ptr, part_ptr, C, HW, NC, T,
        GRAD: tl.constexpr, CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    ):  # fmt: skip
        # part[0|1, split, n, c] = sums over this program's T tiles of H*W of w and w * u, u = x - center, with
        # center = x[n, c, 0, 0] and w = u (statistics), or center = m and w = g (GRAD: dL/db and dL/da).
        n, split = tl.program_id(0), tl.program_id(2)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        nc = n * C + c
        if GRAD:
            center = tl.load(m_ptr + nc, mask=c < C, other=0.0)
        else:
            center = tl.load(x_ptr + _first(n, c, C, HW, CL), mask=c < C, other=0.0).to(tl.float32)
        acc_w = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
        acc_wu = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
        for i in range(0, T):
            offs, mask = _tile(n, c, (split * T + i) * BLOCK_HW, C, HW, CL, BLOCK_HW)
            u = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - center[:, None], 0.0)
            if GRAD:
                w = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                w = u
            acc_w += w
            acc_wu += w * u
        out = split * NC + nc
        tl.store(part_ptr + out, tl.sum(acc_w, axis=1), mask=c < C)
        tl.store(part_ptr + tl.num_programs(2) * NC + out, tl.sum(acc_wu, axis=1), mask=c < C)

    @triton.jit(do_not_specialize=_BATCH_ARGS)
    def _affine_kernel(
        x_ptr, g_ptr, out_ptr, center_ptr, s1_ptr, s0_ptr, a_ptr, C, HW, T,
        GRAD: tl.constexpr, CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
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
        for i in range(0, T):
            offs, mask = _tile(n, c, (tl.program_id(2) * T + i) * BLOCK_HW, C, HW, CL, BLOCK_HW)
            out = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - center) * s1 + s0
            if GRAD:
                out += tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * a
            tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=_BATCH_ARGS)
    def _fwd_channels_kernel(
        x_ptr, part_ptr, w_ptr, m_ptr, v_ptr, mu_ptr, rs_ptr, zpart_ptr, rm_ptr, rv_ptr, nbt_ptr,
        N, NC, S, C, HW, K, inv_hw, inv_n, unb_hw, unb_run, eps, eps_att, momentum,
        BATCH: tl.constexpr, GS: tl.constexpr, CUMULATIVE: tl.constexpr, CL: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # One channel block, every sample: m, v; the standardizer's statistics (BN over the batch, or GN over
        # groups of GS channels; BN running statistics updated); the attention logits' partial sums over the block.
        cb = tl.program_id(0)
        c, cm, k, km, kc, kcm = _channel_block(cb, C, K, BLOCK_C, BLOCK_K)
        w = tl.load(w_ptr + kc, mask=kcm, other=0.0)
        sum_m = tl.zeros([BLOCK_C], dtype=tl.float32)
        sum_v = tl.zeros([BLOCK_C], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            mask = (n < N)[:, None] & cm[None, :]
            nc = n[:, None] * C + c[None, :]
            s1, s2 = _split_sums(part_ptr, nc, mask, S, NC, BLOCK_N, BLOCK_C)
            pivot = tl.load(x_ptr + _first(n[:, None], c[None, :], C, HW, CL), mask=mask, other=0.0).to(tl.float32)
            d = s1 * inv_hw
            m = pivot + d
            v = tl.maximum(s2 * inv_hw - d * d, 0.0)
            tl.store(m_ptr + nc, m, mask=mask)
            tl.store(v_ptr + nc, v, mask=mask)
            if GS == 0:
                sum_m += tl.sum(m, axis=0)
                sum_v += tl.sum(v, axis=0)
            else:
                mu = _group_sum(m, BLOCK_N, BLOCK_C, GS) / GS
                dm = m - mu
                sigma2 = (_group_sum(v, BLOCK_N, BLOCK_C, GS) + _group_sum(dm * dm, BLOCK_N, BLOCK_C, GS)) / GS
                tl.store(mu_ptr + nc, mu, mask=mask)
                tl.store(rs_ptr + nc, 1.0 / tl.sqrt(sigma2 + eps), mask=mask)
            s = m / tl.sqrt(v * unb_hw + eps_att)
            z = tl.sum(s[:, None, :] * w[None, :, :], axis=2)  # [BLOCK_N, BLOCK_K]
            tl.store(zpart_ptr + cb * N * K + n[:, None] * K + k[None, :], z, mask=(n < N)[:, None] & km[None, :])
        if GS == 0:
            if BATCH:
                mu = sum_m * inv_n
                tl.debug_barrier()  # the m stored above, read back by other threads of this program
                sum_d = tl.zeros([BLOCK_C], dtype=tl.float32)
                for n0 in range(0, N, BLOCK_N):
                    n = n0 + tl.arange(0, BLOCK_N)
                    mask = (n < N)[:, None] & cm[None, :]
                    dm = tl.where(mask, tl.load(m_ptr + n[:, None] * C + c[None, :], mask=mask, other=0.0) - mu, 0.0)
                    sum_d += tl.sum(dm * dm, axis=0)
                sigma2 = (sum_v + sum_d) * inv_n
                if CUMULATIVE:
                    f = 1.0 / (tl.load(nbt_ptr) + 1).to(tl.float32)
                else:
                    f = momentum
                _update_running(rm_ptr, rv_ptr, c, cm, mu, sigma2 * unb_run, f)
            else:
                mu = tl.load(rm_ptr + c, mask=cm, other=0.0)
                sigma2 = tl.load(rv_ptr + c, mask=cm, other=1.0)
            tl.store(mu_ptr + c, mu, mask=cm)
            tl.store(rs_ptr + c, 1.0 / tl.sqrt(sigma2 + eps), mask=cm)

    @triton.jit(do_not_specialize=_BATCH_ARGS)
    def _fwd_attention_kernel(
        zpart_ptr, zh_ptr, t_ptr, zr_ptr, gk_ptr, bk_ptr, arm_ptr, arv_ptr, anbt_ptr, nbt_ptr,
        N, K, CB, inv_n, unb_n, eps, momentum,
        BATCH: tl.constexpr, CUMULATIVE: tl.constexpr, COUNT_STD: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # One program: z = sum of the channel blocks' partial logits; BatchNorm over the batch (BATCH) or with the
        # running statistics; zh = normalized z, t = zh * gamma_K + beta_K. Counts the batch in num_batches_tracked
        # of the attention BN (BATCH) and of the standardizer BN (COUNT_STD).
        k = tl.arange(0, BLOCK_K)
        km = k < K
        NK = N * K
        if BATCH:
            sum_z = tl.zeros([BLOCK_K], dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                mask = (n < N)[:, None] & km[None, :]
                idx = n[:, None] * K + k[None, :]
                z = _block_sum(zpart_ptr, idx, mask, CB, NK, BLOCK_N, BLOCK_K)
                tl.store(zh_ptr + idx, z, mask=mask)
                sum_z += tl.sum(z, axis=0)
            zm = sum_z * inv_n
            tl.debug_barrier()
            sum_d = tl.zeros([BLOCK_K], dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                mask = (n < N)[:, None] & km[None, :]
                d = tl.where(mask, tl.load(zh_ptr + n[:, None] * K + k[None, :], mask=mask, other=0.0) - zm, 0.0)
                sum_d += tl.sum(d * d, axis=0)
            zv = sum_d * inv_n
            nbt = tl.load(anbt_ptr) + 1
            if CUMULATIVE:
                f = 1.0 / nbt.to(tl.float32)
            else:
                f = momentum
            _update_running(arm_ptr, arv_ptr, k, km, zm, zv * unb_n, f)
            tl.store(anbt_ptr, nbt)
        else:
            zm = tl.load(arm_ptr + k, mask=km, other=0.0)
            zv = tl.load(arv_ptr + k, mask=km, other=1.0)
        if COUNT_STD:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
        zr = 1.0 / tl.sqrt(zv + eps)
        tl.store(zr_ptr + k, zr, mask=km)
        gk = tl.load(gk_ptr + k, mask=km, other=0.0)
        bk = tl.load(bk_ptr + k, mask=km, other=0.0)
        tl.debug_barrier()
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            mask = (n < N)[:, None] & km[None, :]
            idx = n[:, None] * K + k[None, :]
            if BATCH:
                z = tl.load(zh_ptr + idx, mask=mask, other=0.0)
            else:
                z = _block_sum(zpart_ptr, idx, mask, CB, NK, BLOCK_N, BLOCK_K)
            zh = (z - zm[None, :]) * zr[None, :]
            tl.store(zh_ptr + idx, zh, mask=mask)
            tl.store(t_ptr + idx, zh * gk[None, :] + bk[None, :], mask=mask)

    @triton.jit(do_not_specialize=_BATCH_ARGS)
    def _fwd_output_kernel(
        x_ptr, y_ptr, m_ptr, mu_ptr, rs_ptr, t_ptr, gamma_ptr, beta_ptr, C, HW, K, T, STAT_N,
        ACT: tl.constexpr, CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # y = (x - m) * a + b with lam = act(t[n]), a = (lam @ Gamma) * rs, b = lam @ B + a * (m - mu).
        n = tl.program_id(0)
        c, cm, k, km, kc, kcm = _channel_block(tl.program_id(1), C, K, BLOCK_C, BLOCK_K)
        lam = _act(tl.load(t_ptr + n * K + k[None, :], mask=km[None, :], other=0.0), km[None, :], ACT)  # [1, BK]
        scale = tl.sum(tl.sum(lam[:, :, None] * tl.load(gamma_ptr + kc, mask=kcm, other=0.0)[None, :, :], 1), 0)
        shift = tl.sum(tl.sum(lam[:, :, None] * tl.load(beta_ptr + kc, mask=kcm, other=0.0)[None, :, :], 1), 0)
        m = tl.load(m_ptr + n * C + c, mask=cm, other=0.0)
        mu = tl.load(mu_ptr + n * STAT_N + c, mask=cm, other=0.0)
        a = scale * tl.load(rs_ptr + n * STAT_N + c, mask=cm, other=0.0)
        b = shift + a * (m - mu)
        for i in range(0, T):
            offs, mask = _tile(n, c, (tl.program_id(2) * T + i) * BLOCK_HW, C, HW, CL, BLOCK_HW)
            out = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - m[:, None]) * a[:, None] + b[:, None]
            tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=_BATCH_ARGS)
    def _bwd_channels_kernel(
        part_ptr, m_ptr, mu_ptr, rs_ptr, t_ptr, gamma_ptr, beta_ptr,
        a_ptr, dgamma_ptr, dbeta_ptr, dlam_ptr, dsig_ptr, dmu_ptr,
        N, NC, S, C, K, STAT_N,
        BATCH: tl.constexpr, GS: tl.constexpr, ACT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # One channel block, every sample: a (for dx), dGamma, dB, partial dL/dlam over the block, and (BATCH)
        # dL/dsigma2 and dL/dmu of the standardizer statistics. sg = dL/db, sgu = sum(g * (x - m)) = dL/da.
        cb = tl.program_id(0)
        c, cm, k, km, kc, kcm = _channel_block(cb, C, K, BLOCK_C, BLOCK_K)
        gamma = tl.load(gamma_ptr + kc, mask=kcm, other=0.0)
        beta = tl.load(beta_ptr + kc, mask=kcm, other=0.0)
        acc_dgamma = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
        acc_dbeta = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
        acc_drs = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_dmu = tl.zeros([BLOCK_C], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nm = n < N
            mask = nm[:, None] & cm[None, :]
            nc = n[:, None] * C + c[None, :]
            sg, sgu = _split_sums(part_ptr, nc, mask, S, NC, BLOCK_N, BLOCK_C)
            nk_mask = nm[:, None] & km[None, :]
            t = tl.load(t_ptr + n[:, None] * K + k[None, :], mask=nk_mask, other=0.0)
            lam = tl.where(nk_mask, _act(t, km[None, :], ACT), 0.0)  # [BN, BK]
            scale = tl.sum(lam[:, :, None] * gamma[None, :, :], axis=1)  # [BN, BC]
            m = tl.load(m_ptr + nc, mask=mask, other=0.0)
            sidx = n[:, None] * STAT_N + c[None, :]
            mu = tl.load(mu_ptr + sidx, mask=mask, other=0.0)
            rs = tl.load(rs_ptr + sidx, mask=mask, other=0.0)
            a = scale * rs
            tl.store(a_ptr + nc, a, mask=mask)
            da = sgu + sg * (m - mu)
            dscale = da * rs
            acc_dgamma += tl.sum(lam[:, :, None] * dscale[:, None, :], axis=0)
            acc_dbeta += tl.sum(lam[:, :, None] * sg[:, None, :], axis=0)
            dlam = tl.sum(dscale[:, None, :] * gamma[None, :, :] + sg[:, None, :] * beta[None, :, :], axis=2)
            tl.store(dlam_ptr + cb * N * K + n[:, None] * K + k[None, :], dlam, mask=nk_mask)
            if BATCH:
                if GS == 0:
                    acc_drs += tl.sum(da * scale, axis=0)
                    acc_dmu -= tl.sum(a * sg, axis=0)
                else:
                    dsig = _group_sum(da * scale, BLOCK_N, BLOCK_C, GS) * (-0.5 * rs * rs * rs)
                    tl.store(dsig_ptr + nc, dsig, mask=mask)
                    tl.store(dmu_ptr + nc, -_group_sum(a * sg, BLOCK_N, BLOCK_C, GS), mask=mask)
        tl.store(dgamma_ptr + kc, acc_dgamma, mask=kcm)
        tl.store(dbeta_ptr + kc, acc_dbeta, mask=kcm)
        if BATCH and GS == 0:
            rs = tl.load(rs_ptr + c, mask=cm, other=0.0)
            tl.store(dsig_ptr + c, acc_drs * (-0.5 * rs * rs * rs), mask=cm)
            tl.store(dmu_ptr + c, acc_dmu, mask=cm)

    @triton.jit(do_not_specialize=_BATCH_ARGS)
    def _bwd_attention_kernel(
        dlam_ptr, t_ptr, zh_ptr, zr_ptr, gk_ptr, dz_ptr, dgk_ptr, dbk_ptr, N, K, CB, inv_n,
        BATCH: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # One program: dL/dlam (sum of the blocks') -> dt through the activation -> dgamma_K, dbeta_K, and dz
        # through the logits' BatchNorm (batch statistics when BATCH, else the running ones: a plain scale).
        k = tl.arange(0, BLOCK_K)
        km = k < K
        NK = N * K
        gk = tl.load(gk_ptr + k, mask=km, other=0.0)
        acc_dgk = tl.zeros([BLOCK_K], dtype=tl.float32)
        acc_dbk = tl.zeros([BLOCK_K], dtype=tl.float32)
        acc_d = tl.zeros([BLOCK_K], dtype=tl.float32)
        acc_dzh = tl.zeros([BLOCK_K], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            mask = (n < N)[:, None] & km[None, :]
            idx = n[:, None] * K + k[None, :]
            dlam = _block_sum(dlam_ptr, idx, mask, CB, NK, BLOCK_N, BLOCK_K)
            t = tl.load(t_ptr + idx, mask=mask, other=0.0)
            lam = _act(t, km[None, :], ACT)
            dt = tl.where(mask, _act_grad(dlam, t, lam, km[None, :], ACT), 0.0)
            zh = tl.load(zh_ptr + idx, mask=mask, other=0.0)
            acc_dgk += tl.sum(dt * zh, axis=0)
            acc_dbk += tl.sum(dt, axis=0)
            d = dt * gk[None, :]
            acc_d += tl.sum(d, axis=0)
            acc_dzh += tl.sum(d * zh, axis=0)
            tl.store(dz_ptr + idx, d, mask=mask)
        tl.store(dgk_ptr + k, acc_dgk, mask=km)
        tl.store(dbk_ptr + k, acc_dbk, mask=km)
        zr = tl.load(zr_ptr + k, mask=km, other=0.0)
        tl.debug_barrier()
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            mask = (n < N)[:, None] & km[None, :]
            idx = n[:, None] * K + k[None, :]
            d = tl.load(dz_ptr + idx, mask=mask, other=0.0)
            if BATCH:
                zh = tl.load(zh_ptr + idx, mask=mask, other=0.0)
                d = d - (acc_d * inv_n)[None, :] - zh * (acc_dzh * inv_n)[None, :]
            tl.store(dz_ptr + idx, d * zr[None, :], mask=mask)

    @triton.jit(do_not_specialize=_BATCH_ARGS)
    def _bwd_coefficients_kernel(
        dz_ptr, m_ptr, v_ptr, mu_ptr, dsig_ptr, dmu_ptr, w_ptr, dw_ptr, p_ptr, q_ptr,
        N, C, K, STAT_N, inv_cnt, inv_hw, unb_hw, eps_att,
        BATCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # One channel block, every sample: dW_att, and dx's coefficients p = 2 dL/dv / HW, q = dL/dm / HW
        # (from the descriptor s = m / sqrt(v * unb_hw + eps_att) and, when BATCH, the standardizer statistics).
        c, cm, k, km, kc, kcm = _channel_block(tl.program_id(0), C, K, BLOCK_C, BLOCK_K)
        w = tl.load(w_ptr + kc, mask=kcm, other=0.0)
        acc_dw = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nm = n < N
            mask = nm[:, None] & cm[None, :]
            nc = n[:, None] * C + c[None, :]
            dz = tl.load(dz_ptr + n[:, None] * K + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            m = tl.load(m_ptr + nc, mask=mask, other=0.0)
            v = tl.load(v_ptr + nc, mask=mask, other=0.0)
            r = 1.0 / tl.sqrt(v * unb_hw + eps_att)
            acc_dw += tl.sum(dz[:, :, None] * (m * r)[:, None, :], axis=0)
            ds = tl.sum(dz[:, :, None] * w[None, :, :], axis=1)  # [BN, BC]
            dm = ds * r
            dv = ds * m * (-0.5 * r * r * r) * unb_hw
            if BATCH:
                sidx = n[:, None] * STAT_N + c[None, :]
                dsig = tl.load(dsig_ptr + sidx, mask=mask, other=0.0)
                mu = tl.load(mu_ptr + sidx, mask=mask, other=0.0)
                dv += dsig * inv_cnt
                dm += (2.0 * dsig * (m - mu) + tl.load(dmu_ptr + sidx, mask=mask, other=0.0)) * inv_cnt
            tl.store(p_ptr + nc, 2.0 * dv * inv_hw, mask=mask)
            tl.store(q_ptr + nc, dm * inv_hw, mask=mask)
        tl.store(dw_ptr + kc, acc_dw, mask=kcm)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _p2(v: int) -> int:
    """The next power of two >= v (>= 1)."""
    return 1 << (max(v, 1) - 1).bit_length()


def _launch_shape(x: Tensor, cl: bool) -> tuple[tuple[int, int, int], int, dict]:
    """Grid (N, channel blocks, H*W splits), tiles per split T (runtime) and the CL/BLOCK_* constants.

    The constants depend on (C, H*W, layout) only; the batch changes the grid and T, which are runtime values.
    """
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
    return (n, c_blocks, -(-tiles // per_split)), per_split, dict(CL=cl, BLOCK_C=block_c, BLOCK_HW=block_hw)


def _device_ctx(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class _TritonKernels:
    """The four passes over x of the composed path as Triton kernels (float32 accumulation)."""

    name = "triton"

    @staticmethod
    def _sums(x: Tensor, cl: bool, center: Tensor | None, g: Tensor | None) -> tuple[Tensor, Tensor]:
        grid, t, meta = _launch_shape(x, cl)
        n, c = x.shape[:2]
        part = torch.empty((2, grid[2], n, c), dtype=torch.float32, device=x.device)
        with _device_ctx(x):
            _sums_kernel[grid](
                x, x if g is None else g, part if center is None else center, part, c, x.shape[2] * x.shape[3],
                n * c, t, GRAD=g is not None, num_warps=NUM_WARPS, **meta,
            )  # fmt: skip
        s = part.sum(1)
        return s[0], s[1]

    @staticmethod
    def stats(x: Tensor, cl: bool) -> tuple[Tensor, Tensor]:
        s1, s2 = _TritonKernels._sums(x, cl, None, None)
        hw = x.shape[2] * x.shape[3]
        d = s1 / hw
        return x[:, :, 0, 0].float() + d, (s2 / hw - d * d).clamp_min_(0.0)

    @staticmethod
    def grad_sums(g: Tensor, x: Tensor, cl: bool, mean: Tensor) -> tuple[Tensor, Tensor]:
        return _TritonKernels._sums(x, cl, mean.float().contiguous(), g)

    @staticmethod
    def affine(x, cl, mean, s1, s0, g=None, a=None) -> Tensor:
        grid, t, meta = _launch_shape(x, cl)
        out = torch.empty_like(x)  # same dense memory format
        vecs = [v.float().contiguous() for v in (mean, s1, s0, s1 if a is None else a)]
        with _device_ctx(x):
            _affine_kernel[grid](
                x, x if g is None else g, out, *vecs, x.shape[1], x.shape[2] * x.shape[3], t,
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


# ---------------------------------------------------------------------------------------------- composed path
class _Link:
    """Hands the output gradient from ``_Affine.backward`` (which autograd runs first) to ``_Stats.backward``."""

    def __init__(self) -> None:
        self.g: Tensor | None = None
        self.a: Tensor | None = None


class _Stats(torch.autograd.Function):
    """Per-(n, c) (mean, biased var) of x: one pass. Its backward is the only dx pass."""

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
    """y = (x - mean) * a + b per (n, c): one pass. Backward: one pass for the gradients of mean, a and b; the
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


def _composed_forward(layer: AttentiveNorm2d, x: Tensor, ops) -> Tensor:
    x, cl = _dense(x)
    link = _Link()
    mean, var = _Stats.apply(x, cl, ops, link)
    scale, shift = layer.attentive_affine(mean, var, x.shape[2] * x.shape[3])
    a, b = centered_affine(layer.norm, x, mean, var, scale, shift)
    return _Affine.apply(x, mean, a, b, cl, ops, link)


# ---------------------------------------------------------------------------------------------- whole path
def _has_hooks(module: nn.Module) -> bool:
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _group_size(layer: AttentiveNorm2d) -> int | None:
    """0 for a BN standardizer, the group size for GN; None where the whole path does not apply."""
    norm, att = layer.norm, layer.attention
    tensors = [*layer.parameters(), att.bn.running_mean, att.bn.running_var]
    if not (att.bn.affine and att.bn.track_running_stats and att.eps == EPS_ATTENTION):
        return None
    if type(norm) in BN_STANDARDIZERS:
        if not norm.track_running_stats or norm.running_mean is None:
            return None
        tensors += [norm.running_mean, norm.running_var]
        size = 0
    else:
        size = norm.num_channels // norm.num_groups
        if size & (size - 1):  # not a power of two: the kernels' group reduction reshapes by it
            return None
    if any(t is None or t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return None
    return size


@dataclass
class _Plan:
    """Launch geometry of the whole path for one input (constants depend on C, K, H*W, layout; N is runtime)."""

    n: int
    c: int
    hw: int
    k: int
    gs: int  # group size (GN) or 0 (BN)
    cl: bool
    grid: tuple[int, int, int]  # passes over x
    t: int  # tiles per split
    meta: dict
    cb: int  # channel blocks of the small-math kernels
    small: dict  # their BLOCK_N / BLOCK_C / BLOCK_K
    attn: dict  # BLOCK_N / BLOCK_K of the one-program kernels
    stat_n: int  # stride over n of the standardizer statistics (0: per channel, BN; C: per (n, c), GN)

    @property
    def stat_size(self) -> int:
        return self.c if self.stat_n == 0 else self.n * self.c


def _plan(x: Tensor, cl: bool, k: int, gs: int) -> _Plan:
    n, c, h, w = x.shape
    grid, t, meta = _launch_shape(x, cl)
    block_k = max(2, _p2(k))
    block_c = max(min(CHANNEL_BLOCK, max(2, _p2(c))), gs)
    block_n = max(2, min(32, _p2(SMALL_TILE // (block_k * block_c) + 1) // 2))
    attn_n = max(2, min(64, 4096 // block_k))
    small = dict(BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_K=block_k)
    return _Plan(n, c, h * w, k, gs, cl, grid, t, meta, -(-c // block_c), small, dict(BLOCK_N=attn_n, BLOCK_K=block_k),
                 0 if gs == 0 else c)  # fmt: skip


def _workspace(x: Tensor, sizes: list[int]) -> list[Tensor]:
    """One float32 allocation cut into regions of ``sizes`` elements, each starting at a multiple of ALIGN."""
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += -(-size // ALIGN) * ALIGN
    buf = torch.empty(total, dtype=torch.float32, device=x.device)
    return [buf[s : s + size] for s, size in zip(starts, sizes)]


class _WholeAN(torch.autograd.Function):
    """The whole layer, forward and backward, in Triton kernels (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, w_att: Tensor, gk: Tensor, bk: Tensor, gamma: Tensor, beta: Tensor, layer, plan):
        p, norm, bn_k = plan, layer.norm, layer.attention.bn
        n, c, hw, k = p.n, p.c, p.hw, p.k
        batch_std = p.gs > 0 or norm.training  # standardizer statistics from this batch
        ws = _workspace(x, [2 * p.grid[2] * n * c, n * c, n * c, p.stat_size, p.stat_size, p.cb * n * k, n * k, n * k,
                            k])  # fmt: skip
        part, m, v, mu, rs, zpart, zh, t, zr = ws
        y = torch.empty_like(x)
        if p.gs == 0:
            rm, rv, nbt, eps, mom = (
                norm.running_mean,
                norm.running_var,
                norm.num_batches_tracked,
                norm.eps,
                norm.momentum,
            )
        else:
            rm, rv, nbt, eps, mom = m, m, bn_k.num_batches_tracked, norm.eps, 0.0  # unused placeholders
        count_std = p.gs == 0 and norm.training
        with _device_ctx(x):
            _sums_kernel[p.grid](x, x, m, part, c, hw, n * c, p.t, GRAD=False, num_warps=NUM_WARPS, **p.meta)
            _fwd_channels_kernel[(p.cb,)](
                x, part, w_att, m, v, mu, rs, zpart, rm, rv, nbt,
                n, n * c, p.grid[2], c, hw, k, 1.0 / hw, 1.0 / n, hw / (hw - 1) if hw > 1 else 1.0,
                n * hw / max(n * hw - 1, 1), eps, EPS_ATTENTION, mom or 0.0,
                BATCH=batch_std, GS=p.gs, CUMULATIVE=mom is None, CL=p.cl, num_warps=NUM_WARPS, **p.small,
            )  # fmt: skip
            _fwd_attention_kernel[(1,)](
                zpart, zh, t, zr, gk, bk, bn_k.running_mean, bn_k.running_var, bn_k.num_batches_tracked, nbt,
                n, k, p.cb, 1.0 / n, n / max(n - 1, 1), bn_k.eps, bn_k.momentum or 0.0,
                BATCH=bn_k.training, CUMULATIVE=bn_k.momentum is None, COUNT_STD=count_std, num_warps=NUM_WARPS,
                **p.attn,
            )  # fmt: skip
            _fwd_output_kernel[p.grid](
                x, y, m, mu, rs, t, gamma, beta, c, hw, k, p.t, p.stat_n, ACT=ACT_CODES[layer.attention.mode],
                num_warps=NUM_WARPS, BLOCK_K=p.small["BLOCK_K"], **p.meta,
            )  # fmt: skip
        ctx.save_for_backward(x, w_att, gk, gamma, beta, part, m, v, mu, rs, zh, t, zr)
        ctx.plan, ctx.batch_std, ctx.batch_att = p, batch_std, bn_k.training
        ctx.act = ACT_CODES[layer.attention.mode]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor):
        x, w_att, gk, gamma, beta, part, m, v, mu, rs, zh, t, zr = ctx.saved_tensors
        p = ctx.plan
        n, c, hw, k = p.n, p.c, p.hw, p.k
        g = gy.contiguous(memory_format=torch.channels_last if p.cl else torch.contiguous_format)
        a, pc, qc, dlam, dsig, dmu, dz = _workspace(
            x, [n * c, n * c, n * c, p.cb * n * k, p.stat_size, p.stat_size, n * k]
        )
        grads = [torch.empty_like(t_) for t_ in (w_att, gk, gk, gamma, gamma)]
        dw, dgk, dbk, dgamma, dbeta = grads
        with _device_ctx(x):
            _sums_kernel[p.grid](x, g, m, part, c, hw, n * c, p.t, GRAD=True, num_warps=NUM_WARPS, **p.meta)
            _bwd_channels_kernel[(p.cb,)](
                part, m, mu, rs, t, gamma, beta, a, dgamma, dbeta, dlam, dsig, dmu, n, n * c, p.grid[2], c, k,
                p.stat_n, BATCH=ctx.batch_std, GS=p.gs, ACT=ctx.act, num_warps=NUM_WARPS, **p.small,
            )  # fmt: skip
            _bwd_attention_kernel[(1,)](
                dlam, t, zh, zr, gk, dz, dgk, dbk, n, k, p.cb, 1.0 / n, BATCH=ctx.batch_att, ACT=ctx.act,
                num_warps=NUM_WARPS, **p.attn,
            )  # fmt: skip
            _bwd_coefficients_kernel[(p.cb,)](
                dz, m, v, mu, dsig, dmu, w_att, dw, pc, qc, n, c, k, p.stat_n,
                1.0 / (n if p.gs == 0 else p.gs), 1.0 / hw, hw / (hw - 1) if hw > 1 else 1.0, EPS_ATTENTION,
                BATCH=ctx.batch_std, num_warps=NUM_WARPS, **p.small,
            )  # fmt: skip
            dx = None
            if ctx.needs_input_grad[0]:
                dx = torch.empty_like(x)
                _affine_kernel[p.grid](
                    x, g, dx, m, pc, qc, a, c, hw, p.t, GRAD=True, num_warps=NUM_WARPS, **p.meta
                )  # fmt: skip
        need = ctx.needs_input_grad
        return dx, *(gr if need[i + 1] else None for i, gr in enumerate(grads)), None, None


def _whole_forward(layer: AttentiveNorm2d, x: Tensor, gs: int) -> Tensor:
    x, cl = _dense(x)
    n, _, h, w = x.shape
    bn_k = layer.attention.bn
    # The errors nn.BatchNorm2d raises for a batch it cannot normalize (checked on shapes: no device sync).
    if gs == 0 and layer.norm.training and n * h * w <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    if bn_k.training and n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {(n, layer.k, 1, 1)}")
    plan = _plan(x, cl, layer.k, gs)
    att = layer.attention
    return _WholeAN.apply(
        x, att.conv.weight, bn_k.weight, bn_k.bias, layer.mixture_weight, layer.mixture_bias, layer, plan
    )


def _fused_forward(layer: AttentiveNorm2d, x: Tensor) -> Tensor:
    ops = _kernels_for(x, layer.kernels)
    with fp32_region(x):
        if ops is _TritonKernels and not _has_hooks(layer.attention):
            gs = _group_size(layer)
            if gs is not None:
                return _whole_forward(layer, x, gs)
        return _composed_forward(layer, x, ops)


def _compile_forward(layer: AttentiveNorm2d, x: Tensor) -> Tensor:
    with fp32_region(x):
        xf = x.to(compute_dtype(x))
        var, mean = torch.var_mean(xf, dim=(2, 3), correction=0)
        scale, shift = layer.attentive_affine(mean, var, x.shape[2] * x.shape[3])
        a, b = centered_affine(layer.norm, x, mean, var, scale, shift)
        y = (xf - _col(mean)) * _col(a) + _col(b)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------- layers
_fused_forward_hidden: Callable[[AttentiveNorm2d, Tensor], Tensor] | None = None  # see _hide_fused_forward


def _hide_fused_forward() -> Callable[[AttentiveNorm2d, Tensor], Tensor]:
    """``_fused_forward`` wrapped by ``torch.compiler.disable``, made once, when the first fused layer is built.

    The wrapper imports ``torch._dynamo`` (about 2 s), which a process that never builds a fused layer should not
    pay at import. It is made at construction rather than in ``forward`` so that torch.compile, tracing a model,
    finds it ready (a plain global) instead of tracing its creation."""
    global _fused_forward_hidden
    if _fused_forward_hidden is None:
        _fused_forward_hidden = torch.compiler.disable(_fused_forward)
    return _fused_forward_hidden


def _fused_forward_eager(layer: AttentiveNorm2d, x: Tensor) -> Tensor:
    """The fused forward, hidden from torch.compile (a compiled model runs it eagerly)."""
    return (_fused_forward_hidden or _hide_fused_forward())(layer, x)


class _ImplMixin:
    """Swaps the forward of an AN class for ``_impl_forward`` (where it applies: 4-D input, :func:`_fusable`
    standardizer, not traced; else the reference's forward); everything else (state) is the reference's.

    TorchScript, tracing and export get the reference's plain-op formulation (``forward_plain``)."""

    impl: str  # the create_norm impl name, shown in the repr

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self.forward_plain(x)
        if plain_ops() or x.dim() != 4 or not _fusable(self):
            return super().forward(x)
        return self._impl_forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl!r}"


class _FusedMixin(_ImplMixin):
    """The fused forward/backward (see the module docstring)."""

    impl = "fused"
    kernels: str = "auto"  # 'auto' | 'triton' | 'torch' (instance attribute to override)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _hide_fused_forward()

    def _impl_forward(self, x: Tensor) -> Tensor:
        return _fused_forward_eager(self, x)


class _CompileMixin(_ImplMixin):
    """Plain differentiable torch ops (for ``torch.compile``)."""

    impl = "compile"

    def _impl_forward(self, x: Tensor) -> Tensor:
        return _compile_forward(self, x)


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
