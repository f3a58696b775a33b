"""ResNet v1.5 (stride on the 3x3 conv) with pluggable norms, AN placement, deep stem and avg-pool downsampling.

References: K. He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (the architecture; "v1.5"
puts the stride on the bottleneck's 3x3 conv); X. Li, W. Sun and T. Wu, "Attentive Normalization", ECCV 2020
(AN at bn2 of every bottleneck with K = [10, 10, 20, 20] per stage, AN_SPEC 2.1); T. He et al., "Bag of
Tricks for Image Classification", CVPR 2019 (the deep stem and average-pool downsampling that AN's 200-epoch
configs switch on, AN_SPEC 3); J. Hu et al., "Squeeze-and-Excitation Networks" (the ``se`` variant).

What is ours: the code, the option names, the BasicBlock AN default (``bn1``, after the refactor's ResNet-34
ablation where it beat ``bn12``, AN_SPEC 4.3), and ``an_placement='all'`` using stage 1's K for the stem.
With ``norm='bn'`` the module names and shapes match torchvision's ResNets, so their weights load as is.

Init: convs Kaiming-normal (fan_out); norm layers their own init (BN/GN gamma 1, beta 0; AN Gamma~N(1, 0.1),
B~N(0, 0.1)); the FC PyTorch's default; then, with ``zero_init_last`` (default True, as in the official
configs), the last norm of every residual branch is zeroed with :func:`an.zero_init_` (AN: Gamma = B = 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import an

from ._layers import check_flag, check_int, check_rate, classifier, conv2d, family_options, norm_options
from ._norms import NormFn, NormLayers, make_norm_layers
from ._registry import register_model, resolve_options

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]

PLACEMENTS = {"basic": ("bn1", "bn2", "all"), "bottleneck": ("bn1", "bn2", "bn3", "all")}


class BasicBlock(nn.Module):
    """Two 3x3 convs; SE (``se`` type) after bn2 on the residual branch, before the addition.

    Args:
        inplanes: Input channels.
        planes: Output channels.
        stride: Stride of the first conv.
        norms: Constructors for the positions ``bn1`` and ``bn2``.
        se: SE-module constructor or None.
        downsample: Projection shortcut or None (identity).
    """

    expansion = 1
    positions = ("bn1", "bn2")

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        norms: Mapping[str, NormFn],
        se: NormFn | None = None,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = conv2d(inplanes, planes, 3, stride)
        self.bn1 = norms["bn1"](planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv2d(planes, planes, 3)
        self.bn2 = norms["bn2"](planes)
        self.se = se(planes) if se is not None else None
        self.downsample = downsample

    def zero_init_last(self) -> None:
        """Zero-inits the last norm so the block starts as the identity (its shortcut)."""
        an.zero_init_(self.bn2)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4); SE (``se`` type) after bn3, before the addition (SE-ResNet).

    Args:
        inplanes: Input channels.
        planes: Bottleneck width (output is ``4 * planes``).
        stride: Stride of the 3x3 conv (v1.5).
        norms: Constructors for the positions ``bn1``, ``bn2``, ``bn3``.
        se: SE-module constructor or None.
        downsample: Projection shortcut or None (identity).
    """

    expansion = 4
    positions = ("bn1", "bn2", "bn3")

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        norms: Mapping[str, NormFn],
        se: NormFn | None = None,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        width = planes
        self.conv1 = conv2d(inplanes, width, 1)
        self.bn1 = norms["bn1"](width)
        self.conv2 = conv2d(width, width, 3, stride)
        self.bn2 = norms["bn2"](width)
        self.conv3 = conv2d(width, planes * self.expansion, 1)
        self.bn3 = norms["bn3"](planes * self.expansion)
        self.se = se(planes * self.expansion) if se is not None else None
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        """Zero-inits the last norm so the block starts as the identity (its shortcut)."""
        an.zero_init_(self.bn3)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet v1.5 backbone with a classifier.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: Blocks per stage (4 stages).
        norm_layers: Norm constructors (plain / per-stage AN placement / shortcut / SE).
        num_classes: Classifier outputs (0 = return pooled features).
        an_placement: Which norms use ``norm_layers.stages``: ``'bn1'``, ``'bn2'``, ``'bn3'`` (bottleneck
            only) or ``'all'`` (every norm, including stem and shortcuts; the stem uses stage 1's). Only
            matters for AN types.
        in_chans: Input channels.
        base_width: Stem / first-stage width (64 for the standard nets; smaller for tests).
        deep_stem: Three 3x3 convs (width/2, width/2, width) with norm+ReLU each and a 2x2/2 max-pool,
            instead of the 7x7/2 conv and 3x3/2 max-pool.
        avg_down: Projection shortcuts as 2x2/2 average pool + 1x1 conv (stride 1) instead of a strided 1x1.
        drop_rate: Dropout before the classifier.
        zero_init_last: Zero-init the last norm of every block.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        norm_layers: NormLayers,
        num_classes: int = 1000,
        *,
        an_placement: str = "bn2",
        in_chans: int = 3,
        base_width: int = 64,
        deep_stem: bool = False,
        avg_down: bool = False,
        drop_rate: float = 0.0,
        zero_init_last: bool = True,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(norm_layers.stages) != 4:
            raise ValueError("ResNet needs 4 stages (layers and per-stage norms)")
        kind = "basic" if block is BasicBlock else "bottleneck"
        if an_placement not in PLACEMENTS[kind]:
            raise ValueError(
                f"an_placement {an_placement!r} is not valid for a {kind}-block ResNet; "
                f"valid: {', '.join(PLACEMENTS[kind])}"
            )
        self.an_placement = an_placement
        every = norm_layers.attentive and an_placement == "all"
        stem_norm = norm_layers.stages[0] if every else norm_layers.norm

        if deep_stem:
            half = base_width // 2
            self.conv1 = nn.Sequential(
                conv2d(in_chans, half, 3, 2), stem_norm(half), nn.ReLU(inplace=True),
                conv2d(half, half, 3), stem_norm(half), nn.ReLU(inplace=True),
                conv2d(half, base_width, 3),
            )  # fmt: skip
            self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        else:
            self.conv1 = conv2d(in_chans, base_width, 7, 2)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = stem_norm(base_width)
        self.relu = nn.ReLU(inplace=True)

        inplanes = base_width
        for i, (n, stride) in enumerate(zip(layers, (1, 2, 2, 2))):
            planes = base_width * 2**i
            stage, inplanes = self._make_stage(block, norm_layers, inplanes, planes, n, stride, i, avg_down)
            self.add_module(f"layer{i + 1}", stage)
        self.num_features = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = classifier(inplanes, num_classes)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

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
    ) -> tuple[nn.Sequential, int]:
        outplanes = planes * block.expansion
        placement = self.an_placement if norms.attentive else None
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
        mods = [block(inplanes, planes, stride, at, norms.se, downsample)]
        mods += [block(outplanes, planes, 1, at, norms.se) for _ in range(1, blocks)]
        return nn.Sequential(*mods), outplanes

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's feature map."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: Tensor) -> Tensor:
        """Pool, dropout, classifier."""
        return self.fc(self.drop(torch.flatten(self.avgpool(x), 1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


_OPTIONS = family_options(
    an_placement=None,  # None = 'bn2' (bottleneck) / 'bn1' (basic block)
    deep_stem=False,
    avg_down=False,
    base_width=64,
)


def _create(name: str, block: type, layers: Sequence[int], norm: str, num_classes: int, **kwargs: Any) -> ResNet:
    o = resolve_options(name, kwargs, _OPTIONS)
    norm_layers = make_norm_layers(
        name, norm, o["norm_k"] if o["norm_k"] is not None else (10, 10, 20, 20), num_stages=4, **norm_options(o)
    )
    default_placement = "bn1" if block is BasicBlock else "bn2"
    return ResNet(
        block,
        layers,
        norm_layers,
        num_classes,
        an_placement=o["an_placement"] if o["an_placement"] is not None else default_placement,
        in_chans=check_int(name, "in_chans", o["in_chans"]),
        base_width=check_int(name, "base_width", o["base_width"], 2),
        deep_stem=check_flag(name, "deep_stem", o["deep_stem"]),
        avg_down=check_flag(name, "avg_down", o["avg_down"]),
        drop_rate=check_rate(name, "drop_rate", o["drop_rate"] if o["drop_rate"] is not None else 0.0),
        zero_init_last=check_flag(name, "zero_init_last", True if o["zero_init_last"] is None else o["zero_init_last"]),
    )


@register_model
def resnet18(norm: str = "bn", num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-18 (basic blocks [2, 2, 2, 2]); AN at bn1 by default."""
    return _create("resnet18", BasicBlock, (2, 2, 2, 2), norm, num_classes, **kwargs)


@register_model
def resnet34(norm: str = "bn", num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-34 (basic blocks [3, 4, 6, 3]); AN at bn1 by default."""
    return _create("resnet34", BasicBlock, (3, 4, 6, 3), norm, num_classes, **kwargs)


@register_model
def resnet50(norm: str = "bn", num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-50 (bottlenecks [3, 4, 6, 3]); AN at bn2 by default."""
    return _create("resnet50", Bottleneck, (3, 4, 6, 3), norm, num_classes, **kwargs)


@register_model
def resnet101(norm: str = "bn", num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-101 (bottlenecks [3, 4, 23, 3]); AN at bn2 by default."""
    return _create("resnet101", Bottleneck, (3, 4, 23, 3), norm, num_classes, **kwargs)


@register_model
def resnet152(norm: str = "bn", num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-152 (bottlenecks [3, 8, 36, 3]); AN at bn2 by default."""
    return _create("resnet152", Bottleneck, (3, 8, 36, 3), norm, num_classes, **kwargs)
