"""The norm factory: one registry from names to builders, validated keywords, and the AN ``impl`` dispatch (ours).

Names: ``bn``, ``gn``, ``sn``, ``an``, ``an_gn``, ``iebn`` (see :func:`list_norms`). Each builder's keyword-only
arguments are the keywords that name accepts; anything else is a TypeError that lists them.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable

from torch import nn

from an.attentive import ATTENTION_MODES, DEFAULT_K, AttentiveBatchNorm2d, AttentiveGroupNorm2d, check_groups
from an.fused import COMPILE_NORMS, FUSED_NORMS
from an.iebn import IEBatchNorm2d
from an.switchable import SwitchableNorm2d

__all__ = ["AUTO_IMPL", "IMPLS", "create_norm", "get_norm_layer", "list_norms"]

IMPLS = ("auto", "reference", "fused", "compile")

# What impl='auto' builds: THE one place to flip. 'reference' until `tools/bench_norm.py --an-impls reference
# fused compile` on the GPU (batch 256, bf16, channels_last) shows the fused layers faster; then set "fused":
# fused layers run their Triton kernels on CUDA tensors (and torch versions of the same passes elsewhere).
AUTO_IMPL = "reference"


def _resolve_impl(kind: str, impl: str) -> type[nn.Module]:
    """The AN class for ``impl``; the single place where implementations are chosen.

    ``'reference'``: :mod:`an.attentive`. ``'fused'``: :data:`an.fused.FUSED_NORMS` (Triton kernels, two passes
    over the activation each way). ``'compile'``: :data:`an.fused.COMPILE_NORMS` (plain torch ops for
    ``torch.compile``). ``'auto'``: :data:`AUTO_IMPL`. All share the reference's parameter and buffer names.
    """
    if impl not in IMPLS:
        raise ValueError(f"{kind}: unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    impl = AUTO_IMPL if impl == "auto" else impl
    if impl == "fused":
        return FUSED_NORMS[kind]
    if impl == "compile":
        return COMPILE_NORMS[kind]
    return {"an": AttentiveBatchNorm2d, "an_gn": AttentiveGroupNorm2d}[kind]


def _bn(num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1) -> nn.Module:
    return nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)


def _gn(num_features: int, *, groups: int = 32, eps: float = 1e-5) -> nn.Module:
    check_groups("GroupNorm", num_features, groups)
    return nn.GroupNorm(groups, num_features, eps=eps)


def _sn(num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1) -> nn.Module:
    return SwitchableNorm2d(num_features, eps=eps, momentum=momentum)


def _an(
    num_features: int,
    *,
    k: int = DEFAULT_K,
    attention: str = "hsigmoid",
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    impl: str = "auto",
) -> nn.Module:
    return _resolve_impl("an", impl)(num_features, k=k, attention=attention, eps=eps, momentum=momentum)


def _an_gn(
    num_features: int,
    *,
    k: int = DEFAULT_K,
    attention: str = "hsigmoid",
    groups: int = 32,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    impl: str = "auto",
) -> nn.Module:
    cls = _resolve_impl("an_gn", impl)
    return cls(num_features, k=k, attention=attention, groups=groups, eps=eps, momentum=momentum)


def _iebn(num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1) -> nn.Module:
    return IEBatchNorm2d(num_features, eps=eps, momentum=momentum)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "bn": _bn,
    "gn": _gn,
    "sn": _sn,
    "an": _an,
    "an_gn": _an_gn,
    "iebn": _iebn,
}


def list_norms() -> list[str]:
    """Names accepted by :func:`create_norm`."""
    return list(_REGISTRY)


def _close(word: str, options: list[str]) -> list[str]:
    return difflib.get_close_matches(word.lower(), options, n=1)


def _lookup(name: str) -> tuple[str, Callable[..., nn.Module]]:
    if not isinstance(name, str):
        raise TypeError(f"norm name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        close = _close(key, list(_REGISTRY))
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"Unknown norm '{name}'.{hint} Valid norms: {', '.join(_REGISTRY)}.")
    return key, _REGISTRY[key]


def _check_keywords(key: str, builder: Callable[..., nn.Module], kwargs: dict) -> None:
    valid = [p for p in inspect.signature(builder).parameters if p != "num_features"]
    bad = [kw for kw in kwargs if kw not in valid]
    if bad:
        hints = [f" (did you mean '{m[0]}'?)" if (m := _close(b, valid)) else "" for b in bad]
        listed = ", ".join(f"'{b}'{h}" for b, h in zip(bad, hints))
        raise TypeError(
            f"norm '{key}' got unexpected keyword(s) {listed}. Valid keywords for '{key}': {', '.join(valid)}."
        )


def create_norm(name: str, num_features: int, **kwargs) -> nn.Module:
    """Builds a normalization layer by name.

    Args:
        name: One of :func:`list_norms` (case-insensitive, '-' accepted for '_').
        num_features: Channels C.
        **kwargs: The name's keywords: ``bn``/``sn``/``iebn``: eps, momentum; ``gn``: groups (32), eps;
            ``an``: k (10), attention ('hsigmoid' | 'sigmoid' | 'softmax'), eps, momentum, impl ('auto' |
            'reference' | 'fused' | 'compile', see ``_resolve_impl``); ``an_gn``: those of ``an`` plus groups (32).

    Raises:
        ValueError: Unknown name (with a did-you-mean), bad channel count, K < 1, bad attention, groups
            that do not divide the channels, unknown impl.
        TypeError: A keyword the name does not accept (the valid ones are listed).
    """
    key, builder = _lookup(name)
    _check_keywords(key, builder, kwargs)
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"norm '{key}': num_features must be a positive integer, got {num_features!r}")
    if "attention" in kwargs and kwargs["attention"] not in ATTENTION_MODES:
        valid = ", ".join(ATTENTION_MODES)
        raise ValueError(f"norm '{key}': unknown attention {kwargs['attention']!r}; valid: {valid}")
    return builder(num_features, **kwargs)


def get_norm_layer(name: str | Callable[..., nn.Module], **bound_kwargs) -> Callable[[int], nn.Module]:
    """A constructor taking ``num_features``, with ``bound_kwargs`` bound (for backbones' ``norm_layer``).

    The name and keyword names are validated now; values that depend on the width (e.g. GN divisibility)
    when the layer is built. A callable ``name`` (a class or factory) is returned as a partial.

    Example:
        >>> norm_layer = get_norm_layer("an", k=20)
        >>> layer = norm_layer(256)
    """
    if callable(name):
        return functools.partial(name, **bound_kwargs) if bound_kwargs else name
    key, builder = _lookup(name)
    _check_keywords(key, builder, bound_kwargs)
    return functools.partial(create_norm, key, **bound_kwargs)
