"""AOGNet-12M / AOGNet-40M: the grammar (:mod:`.grammar`), the network (:mod:`.net`) and their registration.

References: X. Li, X. Song, T. Wu, "AOGNets", CVPR 2019; X. Li, W. Sun and T. Wu, "Attentive Normalization",
ECCV 2020 (the 12M/40M configurations and AN placement, ``docs/AN.md`` 2.4 and 3). The code is ours.
"""

from __future__ import annotations

from typing import Any

from .._registry import register_model
from .grammar import AOG, Node, build_aog
from .net import AOGNET_12M, AOGNET_40M, AOGBlock, AOGNet, AOGNetConfig, NodeOp

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


@register_model(options=AOGNet)
def aognet12m(**kwargs: Any) -> AOGNet:
    """AOGNet-12M (filters 32-128-256-512-824, blocks [2, 2, 2, 1]); AN at full-width nodes' 3x3 norms."""
    return AOGNet(AOGNET_12M, **kwargs)


@register_model(options=AOGNet)
def aognet40m(**kwargs: Any) -> AOGNet:
    """AOGNet-40M (filters 56-224-448-896-1400, blocks [2, 2, 3, 1]); AN at full-width nodes' 3x3 norms."""
    return AOGNet(AOGNET_40M, **kwargs)
