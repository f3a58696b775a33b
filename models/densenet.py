"""DenseNet-BC (121/169/201) with pluggable norms; AN on each dense layer's bottleneck norm.

References: G. Huang et al., "Densely Connected Convolutional Networks", CVPR 2017 (pre-activation dense
layers norm -> ReLU -> 1x1 conv (bn_size * growth) -> norm -> ReLU -> 3x3 conv (growth); transitions norm ->
ReLU -> 1x1 conv (halving) -> 2x2 average pool; final norm); X. Li, W. Sun and T. Wu, "Attentive
Normalization", ECCV 2020 (AN replaces the second norm of every dense layer, the one right before the 3x3
conv, K = [10, 10, 20, 20] per dense block; transitions and the final norm stay plain; ``docs/AN.md`` 2.3).

What is ours: the code; an attention layer (``attn_layer='se'``) goes on the same bottleneck (after norm2 +
ReLU, before the 3x3 conv: ``bn_size * growth`` = 128 channels), i.e. where AN recalibrates, since an SE on the
32 new channels of a layer would have a 2-unit hidden layer; DenseNet has no residual branch, so it has no
``zero_init_last`` option. ``drop_rate`` is dropout before the classifier.
With ``norm='bn'`` the module names and shapes match torchvision's DenseNets.

Init: convs Kaiming-normal (fan_out); norms their own init; the FC PyTorch's default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from an.checks import check_int, check_rate

from ._backbone import Backbone
from ._layers import conv2d
from ._norms import NormFn, make_norm_layers
from ._registry import register_model

__all__ = ["DenseLayer", "DenseNet", "densenet121", "densenet169", "densenet201"]


class DenseLayer(nn.Module):
    """norm1 -> ReLU -> 1x1 conv -> norm2 (AN placement) -> ReLU [-> SE] -> 3x3 conv; returns the new features.

    Args:
        cin: Input channels (all previous features).
        growth_rate: New channels.
        bn_size: Bottleneck width factor (bottleneck = ``bn_size * growth_rate``).
        norm: Constructor for norm1.
        norm2: Constructor for norm2.
        se: Attention-layer constructor or None.
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


class DenseNet(Backbone):
    """DenseNet-BC backbone with a classifier.

    ``features`` ends with ``norm5`` and ``relu5`` (torchvision applies that ReLU functionally; as a module it
    has no parameters, so the state_dict is torchvision's). Feature taps (``feature_info``): ``features.relu0``
    (stride 2), ``features.denseblock1``..``3`` (strides 4-16, before each transition) and ``features.relu5``
    (stride 32).

    Args:
        block_config: Dense layers per block (4 blocks).
        norm: Norm name (``an.list_norms()``); a placed norm such as AN goes at every dense layer's norm2.
        num_classes: Classifier outputs (0 = return pooled features).
        norm_k: K per dense block for norms that take one (AN); [10, 10, 20, 20] as in the authors' refactor.
        norm_kwargs: Options of the norm.
        attn_layer: Attention layer on every dense layer's bottleneck (``an.list_attns()``, e.g. ``'se'``).
        attn_kwargs: Its options.
        growth_rate: New channels per dense layer.
        bn_size: Bottleneck width factor.
        num_init_features: Stem width.
        in_chans: Input channels.
        drop_rate: Dropout before the classifier.
        global_pool: ``'avg'``, ``'max'``, ``'avgmax'``, ``'catavgmax'`` or ``''`` (none; ``num_classes=0``).
    """

    first_conv = "features.conv0"
    classifier_name = "classifier"
    flatten_sequential = True  # the taps are children of `features` (timm FeatureListNet option)

    def __init__(
        self,
        block_config: Sequence[int],
        *,
        norm: str = "bn",
        num_classes: int = 1000,
        norm_k: Sequence[int] = (10, 10, 20, 20),
        norm_kwargs: Mapping[str, Any] | None = None,
        attn_layer: str | None = None,
        attn_kwargs: Mapping[str, Any] | None = None,
        growth_rate: int = 32,
        bn_size: int = 4,
        num_init_features: int = 64,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        owner = "DenseNet"
        norm_layers = make_norm_layers(
            owner, norm, norm_k, norm_kwargs, attn_layer, attn_kwargs, num_stages=len(block_config),
            stage_name="dense block",
        )  # fmt: skip
        growth_rate = check_int(owner, "growth_rate", growth_rate)
        bn_size = check_int(owner, "bn_size", bn_size)
        num_init_features = check_int(owner, "num_init_features", num_init_features)
        drop_rate = check_rate(owner, "drop_rate", drop_rate)
        norm = norm_layers.norm
        self.features = nn.Sequential()
        self.features.add_module("conv0", conv2d(check_int(owner, "in_chans", in_chans), num_init_features, 7, 2))
        self.features.add_module("norm0", norm(num_init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        c = num_init_features
        taps = [dict(num_chs=c, reduction=2, module="features.relu0")]
        for i, (n, norm2) in enumerate(zip(block_config, norm_layers.stages)):
            self.features.add_module(
                f"denseblock{i + 1}", DenseBlock(n, c, growth_rate, bn_size, norm, norm2, norm_layers.attn)
            )
            c += n * growth_rate
            if i < len(block_config) - 1:
                taps.append(dict(num_chs=c, reduction=2 ** (i + 2), module=f"features.denseblock{i + 1}"))
                self.features.add_module(f"transition{i + 1}", Transition(c, c // 2, norm))
                c //= 2
        self.features.add_module("norm5", norm(c))
        self.features.add_module("relu5", nn.ReLU(inplace=True))
        taps.append(dict(num_chs=c, reduction=2 ** (len(block_config) + 1), module="features.relu5"))
        self._init_head(owner, c, num_classes, global_pool, drop_rate)
        self.classifier = self._new_classifier(num_classes)
        self._init_features(["features"], taps, checkpointed=["features"])

    def _new_classifier(self, num_classes: int) -> nn.Module:
        fc = super()._new_classifier(num_classes)
        if isinstance(fc, nn.Linear):
            nn.init.zeros_(fc.bias)
        return fc


@register_model(options=DenseNet)
def densenet121(**kwargs: Any) -> DenseNet:
    """DenseNet-121 (blocks [6, 12, 24, 16], growth 32); AN at every dense layer's norm2."""
    return DenseNet((6, 12, 24, 16), **kwargs)


@register_model(options=DenseNet)
def densenet169(**kwargs: Any) -> DenseNet:
    """DenseNet-169 (blocks [6, 12, 32, 32], growth 32); AN at every dense layer's norm2."""
    return DenseNet((6, 12, 32, 32), **kwargs)


@register_model(options=DenseNet)
def densenet201(**kwargs: Any) -> DenseNet:
    """DenseNet-201 (blocks [6, 12, 48, 32], growth 32); AN at every dense layer's norm2."""
    return DenseNet((6, 12, 48, 32), **kwargs)
