"""DenseNet-BC (121/169/201) with pluggable norms; AN on each dense layer's bottleneck norm.

References: G. Huang et al., "Densely Connected Convolutional Networks", CVPR 2017 (pre-activation dense
layers norm -> ReLU -> 1x1 conv (bn_size * growth) -> norm -> ReLU -> 3x3 conv (growth); transitions norm ->
ReLU -> 1x1 conv (halving) -> 2x2 average pool; final norm); X. Li, W. Sun and T. Wu, "Attentive
Normalization", ECCV 2020 (AN replaces the second norm of every dense layer, the one right before the 3x3
conv, K = [10, 10, 20, 20] per dense block; transitions and the final norm stay plain; AN_SPEC 2.3).

What is ours: the code; the ``se`` variant puts an SE module on the same bottleneck (after norm2 + ReLU,
before the 3x3 conv: ``bn_size * growth`` = 128 channels, reduction ``se_reduction``), i.e. where AN
recalibrates, since an SE on the 32 new channels of a layer would have a 2-unit hidden layer; DenseNet has no
residual branch, so ``zero_init_last=True`` is an error. ``drop_rate`` is dropout before the classifier.
With ``norm='bn'`` the module names and shapes match torchvision's DenseNets.

Init: convs Kaiming-normal (fan_out); norms their own init; the FC PyTorch's default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layers import check_flag, check_int, check_rate, classifier, conv2d, family_options, norm_options
from ._norms import NormFn, NormLayers, make_norm_layers
from ._registry import register_model, resolve_options

__all__ = ["DenseLayer", "DenseNet"]


class DenseLayer(nn.Module):
    """norm1 -> ReLU -> 1x1 conv -> norm2 (AN placement) -> ReLU [-> SE] -> 3x3 conv; returns the new features.

    Args:
        cin: Input channels (all previous features).
        growth_rate: New channels.
        bn_size: Bottleneck width factor (bottleneck = ``bn_size * growth_rate``).
        norm: Constructor for norm1.
        norm2: Constructor for norm2.
        se: SE-module constructor or None.
    """

    def __init__(
        self, cin: int, growth_rate: int, bn_size: int, norm: NormFn, norm2: NormFn, se: NormFn | None
    ) -> None:
        super().__init__()
        width = bn_size * growth_rate
        self.norm1 = norm(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv2d(cin, width, 1)
        self.norm2 = norm2(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.se = se(width) if se is not None else None
        self.conv2 = conv2d(width, growth_rate, 3)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = torch.cat(features, 1) if len(features) > 1 else features[0]
        x = self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x)))))
        if self.se is not None:
            x = self.se(x)
        return self.conv2(x)


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; the output concatenates the input and every layer's new features."""

    def __init__(
        self, num_layers: int, cin: int, growth_rate: int, bn_size: int, norm: NormFn, norm2: NormFn, se: NormFn | None
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(cin + i * growth_rate, growth_rate, bn_size, norm, norm2, se)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """norm -> ReLU -> 1x1 conv -> 2x2/2 average pool."""

    def __init__(self, cin: int, cout: int, norm: NormFn) -> None:
        super().__init__()
        self.norm = norm(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = conv2d(cin, cout, 1)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet-BC backbone with a classifier.

    Args:
        block_config: Dense layers per block (4 blocks).
        norm_layers: Norm constructors; ``stages`` has one entry per dense block (for norm2).
        num_classes: Classifier outputs (0 = return pooled features).
        growth_rate: New channels per dense layer.
        bn_size: Bottleneck width factor.
        num_init_features: Stem width.
        in_chans: Input channels.
        drop_rate: Dropout before the classifier.
    """

    def __init__(
        self,
        block_config: Sequence[int],
        norm_layers: NormLayers,
        num_classes: int = 1000,
        *,
        growth_rate: int = 32,
        bn_size: int = 4,
        num_init_features: int = 64,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(norm_layers.stages) != len(block_config):
            raise ValueError(f"DenseNet needs one norm per dense block ({len(block_config)})")
        norm = norm_layers.norm
        self.features = nn.Sequential()
        self.features.add_module("conv0", conv2d(in_chans, num_init_features, 7, 2))
        self.features.add_module("norm0", norm(num_init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        c = num_init_features
        for i, (n, norm2) in enumerate(zip(block_config, norm_layers.stages)):
            self.features.add_module(
                f"denseblock{i + 1}", DenseBlock(n, c, growth_rate, bn_size, norm, norm2, norm_layers.se)
            )
            c += n * growth_rate
            if i < len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(c, c // 2, norm))
                c //= 2
        self.features.add_module("norm5", norm(c))
        self.num_features = c
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.classifier = classifier(c, num_classes)
        if isinstance(self.classifier, nn.Linear):
            nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """The final feature map (after the last norm and ReLU)."""
        return F.relu(self.features(x))

    def forward_head(self, x: Tensor) -> Tensor:
        """Pool, dropout, classifier."""
        return self.classifier(self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


_OPTIONS = family_options(growth_rate=32, bn_size=4, num_init_features=64)


def _create(name: str, block_config: Sequence[int], norm: str, num_classes: int, **kwargs: Any) -> DenseNet:
    o = resolve_options(name, kwargs, _OPTIONS)
    if o["zero_init_last"] is not None and check_flag(name, "zero_init_last", o["zero_init_last"]):
        raise ValueError(f"{name}: zero_init_last=True is not applicable (DenseNet has no residual branches)")
    norm_layers = make_norm_layers(
        name,
        norm,
        o["norm_k"] if o["norm_k"] is not None else (10, 10, 20, 20),
        num_stages=4,
        stage_name="dense block",
        **norm_options(o),
    )
    return DenseNet(
        block_config,
        norm_layers,
        num_classes,
        growth_rate=check_int(name, "growth_rate", o["growth_rate"]),
        bn_size=check_int(name, "bn_size", o["bn_size"]),
        num_init_features=check_int(name, "num_init_features", o["num_init_features"]),
        in_chans=check_int(name, "in_chans", o["in_chans"]),
        drop_rate=check_rate(name, "drop_rate", o["drop_rate"] if o["drop_rate"] is not None else 0.0),
    )


@register_model
def densenet121(norm: str = "bn", num_classes: int = 1000, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (blocks [6, 12, 24, 16], growth 32); AN at every dense layer's norm2."""
    return _create("densenet121", (6, 12, 24, 16), norm, num_classes, **kwargs)


@register_model
def densenet169(norm: str = "bn", num_classes: int = 1000, **kwargs: Any) -> DenseNet:
    """DenseNet-169 (blocks [6, 12, 32, 32], growth 32); AN at every dense layer's norm2."""
    return _create("densenet169", (6, 12, 32, 32), norm, num_classes, **kwargs)


@register_model
def densenet201(norm: str = "bn", num_classes: int = 1000, **kwargs: Any) -> DenseNet:
    """DenseNet-201 (blocks [6, 12, 48, 32], growth 32); AN at every dense layer's norm2."""
    return _create("densenet201", (6, 12, 48, 32), norm, num_classes, **kwargs)
