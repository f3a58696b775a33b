"""From a norm name to the norm constructors one backbone needs, read from the norm registry (``an/registry.py``).

A backbone never reads a global config and never tests a norm's name: it receives a :class:`NormLayers`, a
bundle of constructors that take a channel count, and calls the right one at each of its positions: plain,
placement (per stage) and projection shortcut, plus the optional attention layer. What goes where is the norm
entry's data (``plain``, ``shortcut``, ``per_stage_k``; see :mod:`an.registry`), so a newly registered norm
works in every backbone. For the built-in norms:

========  ===============  ==============================  ===================
norm      plain positions  placement positions (per stage)  projection shortcut
========  ===============  ==============================  ===================
bn        BN               BN                              BN
gn        GN               GN                              GN
sn        SN               SN                              SN
an        BN               AN w/ BN, K of the stage        BN
an_gn     GN               AN w/ GN, K of the stage        GN
iebn      IEBN             IEBN                            BN
========  ===============  ==============================  ===================

A norm that takes ``groups`` uses, at a width it does not divide, the largest divisor of the width below it
(MobileNetV2's 16/24-channel layers, AOGNet's odd slice widths).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

import an
from an.checks import check_int

__all__ = ["NormFn", "NormLayers", "check_stage_k", "fit_groups", "make_norm_layers"]

NormFn = Callable[[int], nn.Module]


def fit_groups(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``groups``."""
    check_int("GroupNorm", "groups", groups)
    return next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0)


class _Norm:
    """A picklable, printable ``num_features -> nn.Module`` constructor around :func:`an.create_norm`."""

    def __init__(self, name: str, kwargs: Mapping[str, Any]) -> None:
        self.name, self.kwargs = name, dict(kwargs)
        self.groups = self.kwargs.get("groups", an.norm_entry(name).options.get("groups"))

    def __call__(self, num_features: int) -> nn.Module:
        kwargs = dict(self.kwargs)
        if self.groups is not None:
            kwargs["groups"] = fit_groups(num_features, self.groups)
        return an.create_norm(self.name, num_features, **kwargs)

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"Norm({self.name!r}{args})"


@dataclass(frozen=True)
class NormLayers:
    """The norm constructors of one model.

    Attributes:
        norm_type: The registry name these were made from.
        norm: Constructor for the plain positions.
        stages: One constructor per stage for the placement positions (equal to ``norm`` unless ``placed``).
        shortcut: Constructor for projection-shortcut norms.
        attn: Attention-layer constructor (``attn_layer``), else ``None``.
        placed: The norm goes only at the placement positions (its entry names a ``plain`` norm); only then
            does a backbone's placement option (e.g. ResNet's ``norm_placement``) change anything.
    """

    norm_type: str
    norm: NormFn
    stages: tuple[NormFn, ...]
    shortcut: NormFn
    attn: NormFn | None = None
    placed: bool = False


def check_stage_k(
    owner: str, norm_k: Sequence[int], num_stages: int | None = None, what: str = "stage"
) -> tuple[int, ...]:
    """Validates a K-per-stage list: integers >= 1, exactly ``num_stages`` of them (any number when None)."""
    is_list = isinstance(norm_k, Sequence) and not isinstance(norm_k, (str, bytes))
    if not is_list or (num_stages is not None and len(norm_k) != num_stages):
        want = "be a list of integers" if num_stages is None else f"have {num_stages} entries"
        raise ValueError(f"{owner}: 'norm_k' must {want} (one K per {what}), got {norm_k!r}")
    return tuple(check_int(owner, "norm_k", k) for k in norm_k)


def make_norm_layers(
    owner: str,
    norm: str,
    norm_k: Sequence[int],
    norm_kwargs: Mapping[str, Any] | None = None,
    attn_layer: str | None = None,
    attn_kwargs: Mapping[str, Any] | None = None,
    *,
    num_stages: int | None = None,
    stage_name: str = "stage",
) -> NormLayers:
    """Resolves a norm name and its options into the constructors a backbone calls.

    Args:
        owner: Model name (for error messages).
        norm: A name from ``an.list_norms()``.
        norm_k: K per stage for the placement positions (one per stage; used by norms whose entry has
            ``per_stage_k``).
        norm_kwargs: Options of the norm (e.g. ``{'attention': 'sigmoid', 'impl': 'fused'}`` for AN,
            ``{'groups': 16}`` for GN); the plain and shortcut norms get the subset their builders accept.
        attn_layer: A name from ``an.list_attns()`` (e.g. ``'se'``) or None.
        attn_kwargs: Options of the attention layer (e.g. ``{'reduction': 16}``).
        num_stages: How many entries ``norm_k`` must have (the backbone's stage count); None accepts any number.
        stage_name: What one entry of ``norm_k`` is called in error messages.

    Raises:
        ValueError: Unknown norm or attention name, bad ``norm_k``, or an option the norm does not accept.
    """
    entry = an.norm_entry(norm)
    kwargs = dict(norm_kwargs or {})
    try:
        entry.check_keywords(kwargs)
    except TypeError as e:
        raise ValueError(f"{owner}: 'norm_kwargs': {e}") from None
    ks = check_stage_k(owner, norm_k, num_stages, stage_name)
    if entry.per_stage_k and "k" in kwargs:
        raise ValueError(f"{owner}: set K with 'norm_k' (one per {stage_name}), not with norm_kwargs['k']")

    def other(name: str | None, fallback: NormFn) -> NormFn:
        if name is None:
            return fallback
        return _Norm(name, an.norm_entry(name).accepted(kwargs))

    own = _Norm(entry.name, kwargs)
    plain = other(entry.plain, own)
    if entry.per_stage_k:
        stages = tuple(_Norm(entry.name, {**kwargs, "k": k}) for k in ks)
    else:
        stages = (own,) * len(ks)
    attn = None
    if attn_layer is not None:
        try:
            attn = an.get_attn_layer(attn_layer, **dict(attn_kwargs or {}))
        except TypeError as e:
            raise ValueError(f"{owner}: 'attn_kwargs': {e}") from None
    elif attn_kwargs:
        raise ValueError(f"{owner}: 'attn_kwargs' given without 'attn_layer' (e.g. attn_layer='se')")
    return NormLayers(entry.name, plain, stages, other(entry.shortcut, plain), attn, entry.plain is not None)
