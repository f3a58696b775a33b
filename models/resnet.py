"""ResNet v1.5 (stride on the 3x3 conv) with pluggable norms, AN placement, deep stem and avg-pool downsampling.

References: K. He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (the architecture; "v1.5"
puts the stride on the bottleneck's 3x3 conv); X. Li, W. Sun and T. Wu, "Attentive Normalization", ECCV 2020
(AN at bn2 of every bottleneck with K = [10, 10, 20, 20] per stage, ``docs/AN.md`` 2.1); T. He et al., "Bag
of Tricks for Image Classification", CVPR 2019 (the deep stem and average-pool downsampling that AN's
200-epoch configs switch on, ``docs/AN.md`` 4.2); J. Hu et al., "Squeeze-and-Excitation Networks" (the
``attn_layer='se'`` variant).

What is ours: the code, the option names, the BasicBlock AN default (``bn1``, after the authors' ResNet-34
ablation where it beat ``bn12``, ``docs/AN.md`` 5.3), and ``norm_placement='all'`` using stage 1's K for the
stem.
With ``norm='bn'`` the module names and shapes match torchvision's ResNets, so their weights load as is.

Init: convs Kaiming-normal (fan_out); norm layers their own init (BN/GN gamma 1, beta 0; AN Gamma~N(1, 0.1),
B~N(0, 0.1)); the FC PyTorch's default; then, with ``zero_init_last`` (default True, as in the official
configs), the last norm of every residual branch is zeroed with :func:`an.zero_init_` (AN: Gamma = B = 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

import an
from an.checks import check_choice, check_flag, check_int, check_rate

from ._backbone import Backbone
from ._layers import conv2d, drop_path_rates, make_drop_path
from ._norms import NormFn, NormLayers, make_norm_layers
from ._registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


class _ResidualBlock(nn.Module):
    """What both ResNet blocks share: the constructor's arguments (see the subclasses), the end of the residual
    branch (attention layer, stochastic depth, the ReLU after the addition), the shortcut, and the zero-init of the
    branch's last norm (named by ``last_norm``). A subclass builds the branch's convs and norms in ``_init_branch``.
    """

    expansion: ClassVar[int]
    last_norm: ClassVar[str]

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        norms: Mapping[str, NormFn],
        se: NormFn | None = None,
        downsample: nn.Module | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self._init_branch(inplanes, planes, stride, norms)
        self.se = se(planes * self.expansion) if se is not None else None
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = make_drop_path(drop_path)

    def zero_init_last(self) -> None:
        """Zero-inits the last norm so the block starts as the identity (its shortcut)."""
        an.zero_init_(getattr(self, self.last_norm))

    def _merge(self, out: Tensor, shortcut: Tensor) -> Tensor:
        """``ReLU(drop_path(se(out)) + shortcut)`` for the branch output ``out``."""
        if self.se is not None:
            out = self.se(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        return self.relu(out + shortcut)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs; attention layer (``attn_layer``, e.g. SE) after bn2 on the residual branch, before the addition.

    Args:
        inplanes: Input channels.
        planes: Output channels.
        stride: Stride of the first conv.
        norms: Constructors for the positions ``bn1`` and ``bn2``.
        se: Attention-layer constructor or None (the attribute keeps timm's name ``se``).
        downsample: Projection shortcut or None (identity).
        drop_path: Stochastic-depth rate of the residual branch.
    """

    expansion = 1
    positions = ("bn1", "bn2")
    last_norm = "bn2"
    default_placement = "bn1"  # after the ResNet-34 ablation of the authors' model zoo (docs/AN.md 5.3)

    def _init_branch(self, inplanes: int, planes: int, stride: int, norms: Mapping[str, NormFn]) -> None:
        self.conv1 = conv2d(inplanes, planes, 3, stride)
        self.bn1 = norms["bn1"](planes)
        self.conv2 = conv2d(planes, planes, 3)
        self.bn2 = norms["bn2"](planes)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self._merge(self.bn2(self.conv2(out)), shortcut)


class Bottleneck(_ResidualBlock):
    """1x1 -> 3x3 (stride) -> 1x1 (x4); an attention layer (``attn_layer``, e.g. SE) after bn3, before the addition.

    Args:
        inplanes: Input channels.
        planes: Bottleneck width (output is ``4 * planes``).
        stride: Stride of the 3x3 conv (v1.5).
        norms: Constructors for the positions ``bn1``, ``bn2``, ``bn3``.
        se: Attention-layer constructor or None (the attribute keeps timm's name ``se``).
        downsample: Projection shortcut or None (identity).
        drop_path: Stochastic-depth rate of the residual branch.
    """

    expansion = 4
    positions = ("bn1", "bn2", "bn3")
    last_norm = "bn3"
    default_placement = "bn2"  # the paper's: the norm after the 3x3 conv (docs/AN.md 2.1)

    def _init_branch(self, inplanes: int, planes: int, stride: int, norms: Mapping[str, NormFn]) -> None:
        width = planes
        self.conv1 = conv2d(inplanes, width, 1)
        self.bn1 = norms["bn1"](width)
        self.conv2 = conv2d(width, width, 3, stride)
        self.bn2 = norms["bn2"](width)
        self.conv3 = conv2d(width, planes * self.expansion, 1)
        self.bn3 = norms["bn3"](planes * self.expansion)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._merge(self.bn3(self.conv3(out)), shortcut)


class ResNet(Backbone):
    """ResNet v1.5 backbone with a classifier.

    Children are registered in the order they run, as torchvision's ResNet (``conv1, bn1, relu, maxpool,
    layer1..4, avgpool, fc``), so torchvision's ``IntermediateLayerGetter``/``BackboneWithFPN`` and timm's
    ``FeatureListNet`` see the real computation. Feature taps (``feature_info``): ``relu`` (stride 2),
    ``layer1``..``layer4`` (strides 4-32).

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: Blocks per stage (4 stages).
        norm: Norm name (``an.list_norms()``); where it goes follows its registry entry (``docs/AN.md`` 2.1).
        num_classes: Classifier outputs (0 = return pooled features).
        norm_k: K per stage for norms that take one (AN); the paper's [10, 10, 20, 20].
        norm_kwargs: Options of the norm (e.g. ``{'attention': 'sigmoid', 'impl': 'fused'}``, ``{'groups': 16}``).
        norm_placement: Which block norms get a placed norm such as AN: ``'bn1'``, ``'bn2'``, ``'bn3'``
            (bottleneck only) or ``'all'`` (every norm, including stem and shortcuts; the stem uses stage 1's).
            None: the block's default (``bn2`` for bottlenecks as in the paper, ``bn1`` for basic blocks).
        attn_layer: Attention layer after the last norm of every block (``an.list_attns()``, e.g. ``'se'``).
        attn_kwargs: Its options (e.g. ``{'reduction': 16, 'bias': False}``).
        in_chans: Input channels.
        base_width: Stem / first-stage width (64 for the standard nets; smaller for tests).
        deep_stem: Three 3x3 convs (width/2, width/2, width) with norm+ReLU each and a 2x2/2 max-pool,
            instead of the 7x7/2 conv and 3x3/2 max-pool.
        avg_down: Projection shortcuts as 2x2/2 average pool + 1x1 conv (stride 1) instead of a strided 1x1.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth: the residual branch of block i of n is dropped per sample with
            probability ``drop_path_rate * i / (n - 1)`` during training (timm's rule).
        global_pool: Global pooling before the classifier: ``'avg'``, ``'max'``, ``'avgmax'``, ``'catavgmax'``
            (twice the features) or ``''`` (none; only with ``num_classes=0``).
        zero_init_last: Zero-init the last norm of every block (the official configs do).
    """

    pool_name = "avgpool"  # torchvision's name

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        norm: str = "bn",
        num_classes: int = 1000,
        norm_k: Sequence[int] = (10, 10, 20, 20),
        norm_kwargs: Mapping[str, Any] | None = None,
        norm_placement: str | None = None,
        attn_layer: str | None = None,
        attn_kwargs: Mapping[str, Any] | None = None,
        in_chans: int = 3,
        base_width: int = 64,
        deep_stem: bool = False,
        avg_down: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        zero_init_last: bool = True,
    ) -> None:
        super().__init__()
        owner = "ResNet"
        if len(layers) != 4:
            raise ValueError(f"{owner} needs 4 stages, got layers={list(layers)}")
        norm_layers = make_norm_layers(owner, norm, norm_k, norm_kwargs, attn_layer, attn_kwargs, num_stages=4)
        placement = block.default_placement if norm_placement is None else norm_placement
        self.norm_placement = check_choice(owner, "norm_placement", placement, (*block.positions, "all"))
        in_chans = check_int(owner, "in_chans", in_chans)
        base_width = check_int(owner, "base_width", base_width, 2)
        drop_rate = check_rate(owner, "drop_rate", drop_rate)
        dpr = iter(drop_path_rates(owner, drop_path_rate, sum(layers)))
        every = norm_layers.placed and placement == "all"
        stem_norm = norm_layers.stages[0] if every else norm_layers.norm

        deep_stem = check_flag(owner, "deep_stem", deep_stem)
        if deep_stem:
            half = base_width // 2
            self.conv1 = nn.Sequential(
                conv2d(in_chans, half, 3, 2), stem_norm(half), nn.ReLU(inplace=True),
                conv2d(half, half, 3), stem_norm(half), nn.ReLU(inplace=True),
                conv2d(half, base_width, 3),
            )  # fmt: skip
        else:
            self.conv1 = conv2d(in_chans, base_width, 7, 2)
        self.bn1 = stem_norm(base_width)
        self.relu = nn.ReLU(inplace=True)
        if deep_stem:
            self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        else:
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        inplanes = base_width
        avg_down = check_flag(owner, "avg_down", avg_down)
        taps = [dict(num_chs=base_width, reduction=2, module="relu")]
        trunk = ["conv1", "bn1", "relu", "maxpool"]
        for i, (n, stride) in enumerate(zip(layers, (1, 2, 2, 2))):
            planes = base_width * 2**i
            rates = [next(dpr) for _ in range(n)]
            stage, inplanes = self._make_stage(block, norm_layers, inplanes, planes, n, stride, i, avg_down, rates)
            self.add_module(f"layer{i + 1}", stage)
            taps.append(dict(num_chs=inplanes, reduction=2 ** (i + 2), module=f"layer{i + 1}"))
            trunk.append(f"layer{i + 1}")
        self._init_head(owner, inplanes, num_classes, global_pool, drop_rate)
        self.fc = self._new_classifier(num_classes)
        self._init_features(trunk, taps, checkpointed=trunk[4:])
        if check_flag(owner, "zero_init_last", zero_init_last):
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    @classmethod
    def first_conv_for(cls, **options: Any) -> str:
        return "conv1.0" if options.get("deep_stem") else "conv1"

    def _make_stage(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        norms: NormLayers,
        inplanes: int,
        planes: int,
        blocks: int,
        stride: int,
        stage: int,
        avg_down: bool,
        drop_paths: Sequence[float],
    ) -> tuple[nn.Sequential, int]:
        outplanes = planes * block.expansion
        placement = self.norm_placement if norms.placed else None
        downsample = None
        if stride != 1 or inplanes != outplanes:
            norm = norms.stages[stage] if placement == "all" else norms.shortcut
            if avg_down:
                pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else None
                layers = [pool] if pool is not None else []
                downsample = nn.Sequential(*layers, conv2d(inplanes, outplanes, 1), norm(outplanes))
            else:
                downsample = nn.Sequential(conv2d(inplanes, outplanes, 1, stride), norm(outplanes))
        at = {p: norms.stages[stage] if placement in ("all", p) else norms.norm for p in block.positions}
        mods = [block(inplanes, planes, stride, at, norms.attn, downsample, drop_paths[0])]
        mods += [block(outplanes, planes, 1, at, norms.attn, drop_path=drop_paths[j]) for j in range(1, blocks)]
        return nn.Sequential(*mods), outplanes


@register_model(options=ResNet)
def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18 (basic blocks [2, 2, 2, 2]); a placed norm such as AN at bn1 by default."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model(options=ResNet)
def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34 (basic blocks [3, 4, 6, 3]); a placed norm such as AN at bn1 by default."""
    return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model(options=ResNet)
def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50 (bottlenecks [3, 4, 6, 3]); a placed norm such as AN at bn2 by default."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model(options=ResNet)
def resnet101(**kwargs: Any) -> ResNet:
    """ResNet-101 (bottlenecks [3, 4, 23, 3]); a placed norm such as AN at bn2 by default."""
    return ResNet(Bottleneck, (3, 4, 23, 3), **kwargs)


@register_model(options=ResNet)
def resnet152(**kwargs: Any) -> ResNet:
    """ResNet-152 (bottlenecks [3, 8, 36, 3]); a placed norm such as AN at bn2 by default."""
    return ResNet(Bottleneck, (3, 8, 36, 3), **kwargs)
