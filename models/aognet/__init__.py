"""AOGNet-12M / AOGNet-40M: the grammar (:mod:`.grammar`), the network (:mod:`.net`) and their registration.

References: X. Li, X. Song, T. Wu, "AOGNets", CVPR 2019; X. Li, W. Sun and T. Wu, "Attentive Normalization",
ECCV 2020 (the 12M/40M configurations and AN placement, AN_SPEC 5). The code is ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._layers import check_flag, check_int, family_options, norm_options
from .._norms import make_norm_layers
from .._registry import register_model, resolve_options
from .grammar import AOG, Node, build_aog
from .net import AOGNET_12M, AOGNET_40M, AOGBlock, AOGNet, AOGNetConfig, NodeOp, aognet_config

__all__ = [
    "AOG",
    "AOGNET_12M",
    "AOGNET_40M",
    "AOGBlock",
    "AOGNet",
    "AOGNetConfig",
    "Node",
    "NodeOp",
    "aognet12m",
    "aognet40m",
    "build_aog",
]

_OPTIONS = family_options(filter_list=None, blocks=None, child_order="official")


def _int_list(name: str, option: str, value: Any, length: int) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != length:
        raise ValueError(f"{name}: option '{option}' must be a list of {length} integers, got {value!r}")
    return tuple(check_int(name, option, v) for v in value)


def _drop_rates(name: str, value: Any, base: tuple[float, ...]) -> tuple[float, ...]:
    """``drop_rate``: a number sets the Dropout2d of the stages that use it (3-4), a list of 4 sets each stage."""
    if value is None:
        return base
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        rates = tuple(value)
        if len(rates) != len(base):
            raise ValueError(f"{name}: drop_rate as a list needs {len(base)} entries (one per stage), got {rates}")
    else:
        rates = tuple(value if b > 0 else 0.0 for b in base)
    for r in rates:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
            raise ValueError(f"{name}: drop_rate values must be numbers in [0, 1), got {value!r}")
    return tuple(float(r) for r in rates)


def _create(name: str, base: AOGNetConfig, norm: str, num_classes: int, **kwargs: Any) -> AOGNet:
    o = resolve_options(name, kwargs, _OPTIONS)
    n = len(base.blocks)
    config = aognet_config(
        base,
        filter_list=_int_list(name, "filter_list", o["filter_list"], n + 1) if o["filter_list"] is not None else None,
        blocks=_int_list(name, "blocks", o["blocks"], n) if o["blocks"] is not None else None,
        drop_rates=_drop_rates(name, o["drop_rate"], base.drop_rates),
        child_order=o["child_order"],
    )
    norm_layers = make_norm_layers(
        name, norm, o["norm_k"] if o["norm_k"] is not None else (10, 10, 20, 20), num_stages=n, **norm_options(o)
    )
    return AOGNet(
        config,
        norm_layers,
        num_classes,
        in_chans=check_int(name, "in_chans", o["in_chans"]),
        zero_init_last=check_flag(name, "zero_init_last", o["zero_init_last"] or False),
    )


@register_model
def aognet12m(norm: str = "bn", num_classes: int = 1000, **kwargs: Any) -> AOGNet:
    """AOGNet-12M (filters 32-128-256-512-824, blocks [2, 2, 2, 1]); AN at full-width nodes' 3x3 norms."""
    return _create("aognet12m", AOGNET_12M, norm, num_classes, **kwargs)


@register_model
def aognet40m(norm: str = "bn", num_classes: int = 1000, **kwargs: Any) -> AOGNet:
    """AOGNet-40M (filters 56-224-448-896-1400, blocks [2, 2, 3, 1]); AN at full-width nodes' 3x3 norms."""
    return _create("aognet40m", AOGNET_40M, norm, num_classes, **kwargs)
