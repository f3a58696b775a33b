"""AOGNet: stages of AOG blocks whose nodes are bottleneck units, with pluggable norms and AN.

References: X. Li, X. Song, T. Wu, "AOGNets: Compositional Grammatical Architectures for Deep Learning",
CVPR 2019; X. Li, W. Sun and T. Wu, "Attentive Normalization", ECCV 2020 (AOGNet-12M/40M configurations; AN
on the norm after the 3x3 conv of every node that spans the full grid, K = [10, 10, 20, 20]; docs/AN.md 2.4).
The structure follows docs/AN.md 3.1-3.4: a 3-conv stem with a 2x2/2 max-pool; before stages 2-4 a transition
(1x1 conv, norm, ReLU, 2x2/2 average pool); per block the grammar's nodes (see :mod:`models.aognet.grammar`)
evaluated in a fixed order, each node op fed the op and residual inputs the grammar prescribes, then norm + ReLU
on the root's output; Dropout2d in the node ops of stages 3-4; GAP + FC.

What is ours: the code and module names; the ``se`` variant puts an SE module in every node op after its
last norm, before the addition (each node op is a bottleneck residual unit, so this is the SE-ResNet
placement); ``zero_init_last`` (default False, as in the official configs) zero-inits that last norm.

Init: convs Kaiming-normal (fan_out); norms their own init (AN: Gamma~N(1, 0.1), B~N(0, 0.1)); FC PyTorch's
default.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

import an
from an.checks import check_flag, check_int, check_rate

from .._backbone import Backbone
from .._layers import conv2d, drop_path_rates, make_drop_path
from .._norms import NormFn, NormLayers, make_norm_layers
from .grammar import AND, AOG, T, build_aog

__all__ = ["AOGBlock", "AOGNet", "AOGNetConfig", "NodeOp", "block_widths", "slice_bounds"]


@dataclass(frozen=True)
class AOGNetConfig:
    """Architecture of an AOGNet (docs/AN.md 3.1).

    Attributes:
        filter_list: Stem output width, then the output width of each of the 4 stages.
        blocks: AOG blocks per stage.
        dims: Primitives per block grid, per stage.
        remove_symmetric: Symmetric-split removal setting per stage (0, 1 or 2).
        drop_rates: Dropout2d probability in node ops, per stage.
        bottleneck_ratio: Node-op bottleneck width = ``max(4, cout * ratio)``, rounded half up.
        lateral: Lateral connections between same-size nodes.
        child_order: ``'official'`` or ``'natural'`` (grammar rule 3).
    """

    filter_list: tuple[int, ...]
    blocks: tuple[int, ...]
    dims: tuple[int, ...] = (2, 2, 4, 4)
    remove_symmetric: tuple[int, ...] = (1, 2, 1, 2)
    drop_rates: tuple[float, ...] = (0.0, 0.0, 0.1, 0.1)
    bottleneck_ratio: float = 0.25
    lateral: bool = True
    child_order: str = "official"

    def with_(self, **changes) -> AOGNetConfig:
        """A copy with some fields replaced."""
        return replace(self, **changes)


AOGNET_12M = AOGNetConfig(filter_list=(32, 128, 256, 512, 824), blocks=(2, 2, 2, 1))
AOGNET_40M = AOGNetConfig(filter_list=(56, 224, 448, 896, 1400), blocks=(2, 2, 3, 1))


def slice_bounds(channels: int, parts: int) -> list[int]:
    """Boundaries of ``parts`` contiguous, near-equal slices; the remainder goes to the first slices."""
    base, rem = divmod(channels, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (1 if i < rem else 0))
    return bounds


def block_widths(cin: int, cout: int, blocks: int, dims: int) -> list[int]:
    """Output width of each block of a stage: steps of ``(cout - cin) / blocks`` rounded to a multiple of dims."""
    step = math.floor((cout - cin) / blocks / dims + 0.5) * dims  # nearest multiple, half up
    return [cin + (j + 1) * step for j in range(blocks - 1)] + [cout]


def _scaled(t: Tensor, scale: float) -> Tensor:
    return t if scale == 1.0 else t * scale


def _concat(ts: list[Tensor]) -> Tensor:
    return torch.cat(ts, 1)


def _sum(ts: list[Tensor]) -> Tensor:
    out = ts[0]
    for t in ts[1:]:
        out = out + t
    return out


class _Step(NamedTuple):
    """What :meth:`AOGBlock.forward` needs of one node (plain data, so the block stays traceable)."""

    id: int
    key: str
    kind: str
    channels: tuple[int, int]  # T-nodes: the input channel slice
    children: tuple[int, ...]
    res_scales: tuple[float, ...]
    lateral: int | None
    res_lateral: bool


class NodeOp(nn.Module):
    """A node's bottleneck unit with separate op and residual inputs: ``ReLU(branch(u) + shortcut(r))``.

    branch = 1x1 conv -> norm -> ReLU -> 3x3 conv -> norm2 -> ReLU -> 1x1 conv -> norm [-> SE] [-> Dropout2d]
    [-> DropPath];
    shortcut = identity, or 1x1 conv -> shortcut norm when the widths differ (T-nodes).

    Args:
        cin: Op-input channels.
        cout: Output channels.
        norm: Constructor for the first and last norms.
        norm2: Constructor for the norm after the 3x3 conv (the AN placement).
        shortcut_norm: Constructor for the projection-shortcut norm.
        se: SE-module constructor or None.
        drop_rate: Dropout2d probability.
        bottleneck_ratio: Bottleneck width = ``max(4, cout * bottleneck_ratio)``, rounded half up (Python 2's
            ``round``, which the reference code ran on; Python 3's half-to-even would lose 12K/41K parameters).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        norm: NormFn,
        norm2: NormFn,
        shortcut_norm: NormFn,
        se: NormFn | None = None,
        drop_rate: float = 0.0,
        bottleneck_ratio: float = 0.25,
    ) -> None:
        super().__init__()
        mid = max(4, int(cout * bottleneck_ratio + 0.5))  # round half up (the reference code ran on Python 2)
        self.conv1 = conv2d(cin, mid, 1)
        self.bn1 = norm(mid)
        self.conv2 = conv2d(mid, mid, 3)
        self.bn2 = norm2(mid)
        self.conv3 = conv2d(mid, cout, 1)
        self.bn3 = norm(cout)
        self.se = se(cout) if se is not None else None
        self.drop = nn.Dropout2d(drop_rate) if drop_rate > 0 else None
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential(conv2d(cin, cout, 1), shortcut_norm(cout)) if cin != cout else None
        self.drop_path: nn.Module | None = None  # stochastic depth, set by AOGNet (drop_path_rate)

    def zero_init_last(self) -> None:
        """Zero-inits the last norm of the branch."""
        an.zero_init_(self.bn3)

    def forward(self, u: Tensor, r: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(u)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        if self.drop is not None:
            out = self.drop(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        return self.relu(out + (r if self.shortcut is None else self.shortcut(r)))


class AOGBlock(nn.Module):
    """One AOG block: a node op per grammar node, then norm + ReLU on the root's output.

    Args:
        cin: Input channels.
        cout: Output channels.
        aog: The block's grammar.
        norm_layers: Norm constructors (plain, shortcut, SE).
        full_norm: Constructor for the 3x3 norm of full-width nodes (the stage's AN).
        drop_rate: Dropout2d probability in the node ops.
        bottleneck_ratio: Node-op bottleneck ratio.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        aog: AOG,
        norm_layers: NormLayers,
        full_norm: NormFn,
        drop_rate: float = 0.0,
        bottleneck_ratio: float = 0.25,
    ) -> None:
        super().__init__()
        d = aog.dims
        if cout % d:
            raise ValueError(f"AOGBlock: {cout} output channels do not split into {d} equal primitives")
        in_b, out_b = slice_bounds(cin, d), slice_bounds(cout, d)
        self.aog = aog
        self.nodes = nn.ModuleDict()
        plan = []
        for i in aog.order:
            node = aog.nodes[i]
            width = out_b[node.end + 1] - out_b[node.start]
            op_in = in_b[node.end + 1] - in_b[node.start] if node.kind == T else width
            norm2 = full_norm if aog.is_full(node) else norm_layers.norm
            self.nodes[node.key] = NodeOp(
                op_in, width, norm_layers.norm, norm2, norm_layers.shortcut, norm_layers.attn, drop_rate,
                bottleneck_ratio,
            )  # fmt: skip
            plan.append(
                _Step(
                    node.id,
                    node.key,
                    node.kind,
                    (in_b[node.start], in_b[node.end + 1]),
                    node.children,
                    node.res_scales,
                    node.lateral,
                    node.res_lateral,
                )
            )
        self._plan = tuple(plan)
        self.norm = norm_layers.norm(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        outs: dict[int, Tensor] = {}
        for step in self._plan:
            if step.kind == T:
                u = r = x[:, step.channels[0] : step.channels[1]]
            else:  # AND: concat of the children; OR: their sum. The residual input scales double-counted children.
                combine = _concat if step.kind == AND else _sum
                u = combine([outs[c] for c in step.children])
                if any(s != 1.0 for s in step.res_scales):
                    r = combine([_scaled(outs[c], s) for c, s in zip(step.children, step.res_scales)])
                else:
                    r = u
                if step.lateral is not None:  # joins the op input; the residual input only if res_lateral
                    shared = r is u
                    u = u + outs[step.lateral]
                    if step.res_lateral:
                        r = u if shared else r + outs[step.lateral]
            outs[step.id] = self.nodes[step.key](u, r)
        return self.relu(self.norm(outs[self.aog.root]))


class AOGNet(Backbone):
    """AOGNet backbone with a classifier.

    Feature taps (``feature_info``): ``stem.8`` (the stem's last ReLU, stride 2) and the last block of each
    stage (``stage1.blockN``..``stage4.blockN``, strides 4-32).

    Args:
        config: Architecture (:data:`AOGNET_12M`, :data:`AOGNET_40M` or custom).
        norm: Norm name (``an.list_norms()``); a placed norm such as AN goes at full-width nodes' 3x3 norms.
        num_classes: Classifier outputs (0 = return pooled features).
        norm_k: K per stage for norms that take one (AN); the paper's [10, 10, 20, 20].
        norm_kwargs: Options of the norm.
        attn_layer: Attention layer in every node op after its last norm (``an.list_attns()``, e.g. ``'se'``).
        attn_kwargs: Its options.
        in_chans: Input channels.
        zero_init_last: Zero-init the last norm of every node op (the official configs do not).
        filter_list: Replaces ``config.filter_list`` (stem width, then each stage's output width).
        blocks: Replaces ``config.blocks`` (AOG blocks per stage).
        drop_rate: Dropout2d in the node ops: a number for the stages that use it (3-4), or one rate per stage;
            None keeps ``config.drop_rates``.
        child_order: Replaces ``config.child_order`` (``'official'`` or ``'natural'``, see :mod:`.grammar`).
        drop_path_rate: Stochastic depth on every node op's branch: the node ops of AOG block i of the n blocks
            are dropped per sample with probability ``drop_path_rate * i / (n - 1)`` during training.
        global_pool: ``'avg'``, ``'max'``, ``'avgmax'``, ``'catavgmax'`` or ``''`` (none; ``num_classes=0``).
    """

    first_conv = "stem.0"
    flatten_sequential = True  # the taps are children of `stem` and of the stages (timm FeatureListNet option)

    def __init__(
        self,
        config: AOGNetConfig,
        *,
        norm: str = "bn",
        num_classes: int = 1000,
        norm_k: Sequence[int] = (10, 10, 20, 20),
        norm_kwargs: Mapping[str, Any] | None = None,
        attn_layer: str | None = None,
        attn_kwargs: Mapping[str, Any] | None = None,
        in_chans: int = 3,
        zero_init_last: bool = False,
        filter_list: Sequence[int] | None = None,
        blocks: Sequence[int] | None = None,
        drop_rate: float | Sequence[float] | None = None,
        child_order: str | None = None,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        c = _override(config, filter_list, blocks, drop_rate, child_order)
        n = len(c.blocks)
        if not (len(c.filter_list) == n + 1 and len(c.dims) == len(c.remove_symmetric) == len(c.drop_rates) == n):
            raise ValueError(
                "AOGNetConfig: filter_list needs one more entry than blocks/dims/remove_symmetric/drop_rates"
            )
        norm_layers = make_norm_layers("AOGNet", norm, norm_k, norm_kwargs, attn_layer, attn_kwargs, num_stages=n)
        in_chans = check_int("AOGNet", "in_chans", in_chans)
        self.config = c
        norm_fn = norm_layers.norm
        f0, half = c.filter_list[0], c.filter_list[0] // 2
        self.stem = nn.Sequential(
            conv2d(in_chans, half, 3, 2), norm_fn(half), nn.ReLU(inplace=True),
            conv2d(half, half, 3), norm_fn(half), nn.ReLU(inplace=True),
            conv2d(half, f0, 3), norm_fn(f0), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )  # fmt: skip
        for s in range(n):
            cin, cout = c.filter_list[s], c.filter_list[s + 1]
            aog = build_aog(c.dims[s], c.remove_symmetric[s], c.lateral, c.child_order)
            mods: OrderedDict[str, nn.Module] = OrderedDict()
            if s > 0:
                mods["transition"] = nn.Sequential(
                    conv2d(cin, cin, 1), norm_fn(cin), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)
                )
            for j, w in enumerate(block_widths(cin, cout, c.blocks[s], c.dims[s])):
                mods[f"block{j + 1}"] = AOGBlock(
                    cin, w, aog, norm_layers, norm_layers.stages[s], c.drop_rates[s], c.bottleneck_ratio
                )
                cin = w
            self.add_module(f"stage{s + 1}", nn.Sequential(mods))
        self._init_head("AOGNet", c.filter_list[-1], num_classes, global_pool)
        self.fc = self._new_classifier(num_classes)
        if check_flag("AOGNet", "zero_init_last", zero_init_last):
            for m in self.modules():
                if isinstance(m, NodeOp):
                    m.zero_init_last()
        blocks_in_order = [m for m in self.modules() if isinstance(m, AOGBlock)]
        for block, rate in zip(blocks_in_order, drop_path_rates("AOGNet", drop_path_rate, len(blocks_in_order))):
            for node in block.modules():
                if isinstance(node, NodeOp):
                    node.drop_path = make_drop_path(rate)
        taps = [dict(num_chs=f0, reduction=2, module=f"stem.{len(self.stem) - 2}")]
        stages = [f"stage{s + 1}" for s in range(n)]
        for s, stage in enumerate(stages):
            last = list(getattr(self, stage).named_children())[-1][0]
            taps.append(dict(num_chs=c.filter_list[s + 1], reduction=2 ** (s + 2), module=f"{stage}.{last}"))
        self._init_features(["stem", *stages], taps, checkpointed=stages)


def _override(
    base: AOGNetConfig,
    filter_list: Sequence[int] | None,
    blocks: Sequence[int] | None,
    drop_rate: float | Sequence[float] | None,
    child_order: str | None,
) -> AOGNetConfig:
    """``base`` with the options that were given (not None) replaced, after checking them."""
    n = len(base.blocks)
    changes: dict = {}
    if filter_list is not None:
        changes["filter_list"] = _int_list("filter_list", filter_list, n + 1)
    if blocks is not None:
        changes["blocks"] = _int_list("blocks", blocks, n)
    if drop_rate is not None:
        changes["drop_rates"] = _drop_rates(drop_rate, base.drop_rates)
    if child_order is not None:
        changes["child_order"] = child_order
    return base.with_(**changes)


def _int_list(option: str, value: Any, length: int) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != length:
        raise ValueError(f"AOGNet: '{option}' must be a list of {length} integers, got {value!r}")
    return tuple(check_int("AOGNet", option, v) for v in value)


def _drop_rates(value: float | Sequence[float], base: tuple[float, ...]) -> tuple[float, ...]:
    """A number sets the Dropout2d of the stages that use it (3-4); a list of 4 sets each stage."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != len(base):
            raise ValueError(f"AOGNet: 'drop_rate' as a list needs {len(base)} entries (one per stage), got {value!r}")
        rates = tuple(value)
    else:
        rates = tuple(value if b > 0 else 0.0 for b in base)
    return tuple(check_rate("AOGNet", "drop_rate", r) for r in rates)
