"""The built-in norms and attention layers, registered in :mod:`an.registry`, and the AN ``impl`` dispatch.

Norms: ``bn``, ``gn``, ``sn`` (everywhere in a backbone), ``an`` (AN w/ BN at the placement positions, BN
elsewhere, K per stage), ``an_gn`` (AN w/ GN there, GN elsewhere), ``iebn`` (everywhere except projection
shortcuts, which keep BN, as in the IEBN paper's ResNets). Attention layers: ``se``. Where each goes in each
backbone: ``docs/AN.md`` section 2 and ``docs/MODELS.md``. Each builder's keyword parameters are that name's
options; their defaults are written once, here or in the layer class.
"""

from __future__ import annotations

from torch import nn

from an.attentive import (
    DEFAULT_ATTENTION,
    DEFAULT_GROUPS,
    DEFAULT_K,
    AttentiveBatchNorm2d,
    AttentiveGroupNorm2d,
    check_groups,
)
from an.checks import check_choice, check_number
from an.fused import COMPILE_NORMS, FUSED_NORMS
from an.iebn import IEBatchNorm2d
from an.registry import register_attn, register_norm
from an.se import SqueezeExcite
from an.switchable import SwitchableNorm2d

__all__ = ["AUTO_IMPL", "IMPLS"]

IMPLS = ("auto", "reference", "fused", "compile")

# What impl='auto' builds: THE one place to flip. 'reference' until `tools/bench_norm.py --an-impls reference
# fused compile` on the GPU (batch 256, bf16, channels_last) shows the fused layers faster; then set "fused":
# fused layers run their Triton kernels on CUDA tensors (and torch versions of the same passes elsewhere).
AUTO_IMPL = "reference"


def _resolve_impl(kind: str, impl: str) -> type[nn.Module]:
    """The AN class for ``impl``; the single place where implementations are chosen.

    ``'reference'``: :mod:`an.attentive`. ``'fused'``: :data:`an.fused.FUSED_NORMS` (the whole layer in 9 Triton
    launches per training step on CUDA; torch passes elsewhere). ``'compile'``: :data:`an.fused.COMPILE_NORMS`
    (plain torch ops for ``torch.compile``). ``'auto'``: :data:`AUTO_IMPL`. All share the reference's parameter
    and buffer names.
    """
    impl = check_choice(f"norm '{kind}'", "impl", impl, IMPLS)
    impl = AUTO_IMPL if impl == "auto" else impl
    if impl == "fused":
        return FUSED_NORMS[kind]
    if impl == "compile":
        return COMPILE_NORMS[kind]
    return {"an": AttentiveBatchNorm2d, "an_gn": AttentiveGroupNorm2d}[kind]


def _check_stats(owner: str, eps: float, momentum: float | None = None) -> None:
    """``eps`` > 0 and ``momentum`` None (a cumulative average) or in [0, 1]: torch builds a layer with other values
    and fails only at its first forward (or trains on with meaningless running statistics)."""
    check_number(owner, "eps", eps, 0.0, low_open=True)
    number = isinstance(momentum, (int, float)) and not isinstance(momentum, bool)
    if momentum is not None and not (number and 0.0 <= momentum <= 1.0):
        raise ValueError(f"{owner}: 'momentum' must be null (a cumulative average) or in [0, 1], got {momentum!r}")


@register_norm("bn", description="BatchNorm")
def _bn(num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1) -> nn.Module:
    _check_stats("norm 'bn'", eps, momentum)
    return nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)


@register_norm("gn", description="GroupNorm")
def _gn(num_features: int, *, groups: int = DEFAULT_GROUPS, eps: float = 1e-5) -> nn.Module:
    check_groups("GroupNorm", num_features, groups)
    _check_stats("norm 'gn'", eps)
    return nn.GroupNorm(groups, num_features, eps=eps)


@register_norm("sn", description="Switchable Normalization (IN, LN and BN statistics)")
def _sn(num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1) -> nn.Module:
    _check_stats("norm 'sn'", eps, momentum)
    return SwitchableNorm2d(num_features, eps=eps, momentum=momentum)


@register_norm("an", plain="bn", per_stage_k=True, description="Attentive Normalization with BN standardization")
def _an(
    num_features: int,
    *,
    k: int = DEFAULT_K,
    attention: str = DEFAULT_ATTENTION,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    impl: str = "auto",
) -> nn.Module:
    _check_stats("norm 'an'", eps, momentum)
    return _resolve_impl("an", impl)(num_features, k=k, attention=attention, eps=eps, momentum=momentum)


@register_norm("an_gn", plain="gn", per_stage_k=True, description="Attentive Normalization with GN standardization")
def _an_gn(
    num_features: int,
    *,
    k: int = DEFAULT_K,
    attention: str = DEFAULT_ATTENTION,
    groups: int = DEFAULT_GROUPS,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    impl: str = "auto",
) -> nn.Module:
    _check_stats("norm 'an_gn'", eps, momentum)
    cls = _resolve_impl("an_gn", impl)
    return cls(num_features, k=k, attention=attention, groups=groups, eps=eps, momentum=momentum)


@register_norm("iebn", shortcut="bn", description="Instance Enhancement BN (BN kept on projection shortcuts)")
def _iebn(num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1) -> nn.Module:
    _check_stats("norm 'iebn'", eps, momentum)
    return IEBatchNorm2d(num_features, eps=eps, momentum=momentum)


register_attn("se", SqueezeExcite, description="Squeeze-and-Excitation")
