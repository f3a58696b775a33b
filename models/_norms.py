"""From a norm *type* to the norm constructors one backbone needs (ours).

A backbone does not read any global config: it receives a :class:`NormLayers`, a bundle of constructors that
take a channel count, and calls the right one at each position. What each norm type means (the placement
rules are the same for every family; the positions are the family's business):

========  ==========================  =================================  ===================  ==========
type      plain positions             the AN placement (per stage K)     projection shortcut  SE module
========  ==========================  =================================  ===================  ==========
bn        BN                          BN                                 BN                   --
gn        GN                          GN                                 GN                   --
sn        SN                          SN                                 SN                   --
se        BN                          BN                                 BN                   yes
an        BN                          AN w/ BN, K of the stage           BN                   --
an_gn     GN                          AN w/ GN, K of the stage           GN                   --
iebn      IEBN                        IEBN                               BN                   --
========  ==========================  =================================  ===================  ==========

IEBN replaces every BN except the projection-shortcut BNs, as in the IEBN paper's ResNets (AN_SPEC 8).
GroupNorm (``gn``, ``an_gn``) uses ``gn_groups`` groups, or the largest divisor of the channel count below it
when ``gn_groups`` does not divide it (MobileNetV2's 16/24-channel layers, AOGNet's odd slice widths).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

import an
from an.factory import IMPLS

from ._registry import check_norm_type

__all__ = ["NormFn", "NormLayers", "check_stage_k", "gn_groups_for", "make_norm_layers"]

NormFn = Callable[[int], nn.Module]

ATTENTIVE_TYPES = ("an", "an_gn")


def gn_groups_for(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``groups``."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"gn_groups must be a positive integer, got {groups!r}")
    return next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0)


class _Norm:
    """A picklable, printable ``num_features -> nn.Module`` constructor around :func:`an.create_norm`."""

    def __init__(self, name: str, **kwargs) -> None:
        self.name, self.kwargs = name, kwargs

    def __call__(self, num_features: int) -> nn.Module:
        kwargs = dict(self.kwargs)
        if "groups" in kwargs:
            kwargs["groups"] = gn_groups_for(num_features, kwargs["groups"])
        return an.create_norm(self.name, num_features, **kwargs)

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"Norm({self.name!r}{args})"


class _SE:
    """``channels -> an.SqueezeExcite`` with a fixed reduction and bias setting."""

    def __init__(self, reduction: int, bias: bool) -> None:
        self.reduction, self.bias = reduction, bias

    def __call__(self, channels: int) -> nn.Module:
        return an.SqueezeExcite(channels, reduction=self.reduction, bias=self.bias)

    def __repr__(self) -> str:
        return f"SE(reduction={self.reduction}, bias={self.bias})"


@dataclass(frozen=True)
class NormLayers:
    """The norm constructors of one model.

    Attributes:
        norm_type: The norm type these were made from (one of ``models.list_norm_types()``).
        norm: Constructor for the plain norm positions.
        stages: One constructor per stage for the AN placement (equal to ``norm`` unless the type is AN).
        shortcut: Constructor for projection-shortcut norms.
        se: SE-module constructor (``se`` type only), else ``None``.
    """

    norm_type: str
    norm: NormFn
    stages: tuple[NormFn, ...]
    shortcut: NormFn
    se: NormFn | None = None

    @property
    def attentive(self) -> bool:
        """Whether the AN placement holds AN layers (``an`` / ``an_gn``)."""
        return self.norm_type in ATTENTIVE_TYPES


def check_stage_k(model: str, norm_k: Sequence[int], num_stages: int, what: str = "stage") -> tuple[int, ...]:
    """Validates a K-per-stage list.

    Raises:
        ValueError: If it does not have ``num_stages`` positive integers; the message names the expected length.
    """
    if isinstance(norm_k, (str, bytes)) or not isinstance(norm_k, Sequence):
        raise ValueError(f"{model}: norm_k must be a list of {num_stages} integers (one K per {what}), got {norm_k!r}")
    ks = tuple(norm_k)
    if len(ks) != num_stages:
        raise ValueError(
            f"{model}: norm_k must have {num_stages} entries (one K per {what}), got {len(ks)}: {list(ks)}"
        )
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{model}: every K in norm_k must be an integer >= 1, got {list(ks)}")
    return ks


def make_norm_layers(
    model: str,
    norm_type: str,
    norm_k: Sequence[int],
    *,
    num_stages: int | None = None,
    stage_name: str = "stage",
    an_attention: str = "hsigmoid",
    an_impl: str = "auto",
    gn_groups: int = 32,
    se_reduction: int = 16,
    se_bias: bool = True,
) -> NormLayers:
    """Resolves a norm type and its options into the constructors a backbone calls.

    Args:
        model: Model name (for error messages).
        norm_type: One of ``models.list_norm_types()``.
        norm_k: K per stage for the AN placement (validated for every norm type, used by ``an``/``an_gn``).
        num_stages: Expected length of ``norm_k`` (default: its default's length, i.e. ``len(norm_k)``).
        stage_name: What one entry of ``norm_k`` is called in error messages.
        an_attention: AN attention activation: ``'hsigmoid'`` | ``'sigmoid'`` | ``'softmax'``.
        an_impl: AN implementation: ``'auto'`` | ``'reference'`` | ``'fused'`` (Triton kernels) | ``'compile'``
            (plain torch ops for torch.compile to fuse); see ``an/factory.py``.
        gn_groups: Groups of GN and AN w/ GN.
        se_reduction: SE reduction ratio (``se`` type).
        se_bias: Whether the SE FCs have biases (``se`` type).
    """
    check_norm_type(norm_type)
    ks = check_stage_k(model, norm_k, num_stages if num_stages is not None else len(norm_k), stage_name)
    gn_groups_for(1, gn_groups)  # validates the value early
    if an_attention not in an.ATTENTION_MODES:
        raise ValueError(f"{model}: an_attention must be one of {', '.join(an.ATTENTION_MODES)}, got {an_attention!r}")
    if an_impl not in IMPLS:
        raise ValueError(f"{model}: an_impl must be one of {', '.join(IMPLS)}, got {an_impl!r}")
    if norm_type in ("bn", "se", "an"):
        plain: NormFn = _Norm("bn")
    elif norm_type in ("gn", "an_gn"):
        plain = _Norm("gn", groups=gn_groups)
    else:
        plain = _Norm(norm_type)  # sn, iebn
    if norm_type == "an":
        stages = tuple(_Norm("an", k=k, attention=an_attention, impl=an_impl) for k in ks)
    elif norm_type == "an_gn":
        stages = tuple(_Norm("an_gn", k=k, attention=an_attention, impl=an_impl, groups=gn_groups) for k in ks)
    else:
        stages = (plain,) * len(ks)
    shortcut = _Norm("bn") if norm_type == "iebn" else plain
    se = _SE(se_reduction, se_bias) if norm_type == "se" else None
    return NormLayers(norm_type, plain, stages, shortcut, se)
