"""MobileNetV2 with pluggable norms; AN on the depthwise norm of every inverted-residual block.

References: M. Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018 (width 1.0,
last channel 1280, dropout 0.2 before the FC); X. Li, W. Sun and T. Wu, "Attentive Normalization", ECCV 2020
(AN replaces the BN after each 3x3 depthwise conv, K = [5, 5, 5, 5, 10, 10, 10] per (t, c, n, s) row; the
expansion, projection, stem and last-conv norms stay plain; ``docs/AN.md`` 2.2).

What is ours: the code; an attention layer (``attn_layer='se'``) goes after the depthwise conv block (norm +
ReLU6), on the expanded channels, as MnasNet/MobileNetV3 place theirs;
``zero_init_last`` (default False) zero-inits the projection norm of blocks with an identity shortcut.
With ``norm='bn'`` the module names and shapes match torchvision's ``mobilenet_v2``.

Init: convs Kaiming-normal (fan_out); norms their own init; the FC N(0, 0.01) with zero bias (the usual
MobileNetV2 init).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

import an
from an.checks import check_flag, check_int, check_number, check_rate

from ._backbone import Backbone
from ._layers import conv2d, drop_path_rates, make_drop_path
from ._norms import NormFn, make_norm_layers
from ._registry import register_model

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenetv2"]

# (expansion t, output channels c, repeats n, first stride s): one row per AN stage (K per row).
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds a width to the nearest multiple of ``divisor``, never going more than 10% below ``value``."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def conv_norm_act(cin: int, cout: int, kernel_size: int, stride: int, norm: NormFn, groups: int = 1) -> nn.Sequential:
    """conv -> norm -> ReLU6 (indices 0, 1, 2)."""
    return nn.Sequential(conv2d(cin, cout, kernel_size, stride, groups), norm(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """[1x1 expand -> norm -> ReLU6] -> 3x3 depthwise -> dw_norm -> ReLU6 [-> SE] -> 1x1 project -> norm.

    Args:
        cin: Input channels.
        cout: Output channels.
        stride: Depthwise stride.
        expand_ratio: Expansion t (no expansion conv when 1).
        norm: Constructor for the plain norms.
        dw_norm: Constructor for the depthwise norm (the AN placement).
        se: Attention-layer constructor or None.
        drop_path: Stochastic-depth rate of the residual branch (blocks with an identity shortcut only).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        expand_ratio: int,
        norm: NormFn,
        dw_norm: NormFn,
        se: NormFn | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = round(cin * expand_ratio)
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_norm_act(cin, hidden, 1, 1, norm))
        layers.append(conv_norm_act(hidden, hidden, 3, stride, dw_norm, groups=hidden))
        if se is not None:
            layers.append(se(hidden))
        layers += [conv2d(hidden, cout, 1), norm(cout)]
        self.conv = nn.Sequential(*layers)
        self.drop_path = make_drop_path(drop_path) if self.use_res_connect else None

    def zero_init_last(self) -> None:
        """Zero-inits the projection norm (only meaningful with an identity shortcut)."""
        an.zero_init_(self.conv[-1])

    def forward(self, x: Tensor) -> Tensor:
        if not self.use_res_connect:
            return self.conv(x)
        out = self.conv(x)
        return x + (out if self.drop_path is None else self.drop_path(out))


class MobileNetV2(Backbone):
    """MobileNetV2 backbone with a classifier.

    Feature taps (``feature_info``): the last block before each stride-2 row (``features.1``, ``.3``, ``.6``,
    ``.13`` at strides 2-16) and the last 1x1 conv (``features.18``, ``num_features`` channels, stride 32).

    Args:
        norm: Norm name (``an.list_norms()``); a placed norm such as AN goes at every depthwise norm.
        num_classes: Classifier outputs (0 = return pooled features).
        norm_k: K per row of :data:`SETTINGS` for norms that take one (AN); the paper's [5, 5, 5, 5, 10, 10, 10].
        norm_kwargs: Options of the norm.
        attn_layer: Attention layer after every depthwise block (``an.list_attns()``, e.g. ``'se'``).
        attn_kwargs: Its options.
        width_mult: Width multiplier (channels rounded to multiples of 8; the last conv keeps 1280 below 1.0).
        in_chans: Input channels.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth on the blocks with an identity shortcut: block i of the n blocks is
            dropped per sample with probability ``drop_path_rate * i / (n - 1)`` during training.
        global_pool: ``'avg'``, ``'max'``, ``'avgmax'``, ``'catavgmax'`` or ``''`` (none; ``num_classes=0``).
        zero_init_last: Zero-init the projection norm of blocks with an identity shortcut.
    """

    first_conv = "features.0.0"
    classifier_name = "classifier.1"  # torchvision's layout: classifier = (Dropout, Linear)
    flatten_sequential = True  # the taps are children of `features` (timm FeatureListNet option)

    def __init__(
        self,
        *,
        norm: str = "bn",
        num_classes: int = 1000,
        norm_k: Sequence[int] = (5, 5, 5, 5, 10, 10, 10),
        norm_kwargs: Mapping[str, Any] | None = None,
        attn_layer: str | None = None,
        attn_kwargs: Mapping[str, Any] | None = None,
        width_mult: float = 1.0,
        in_chans: int = 3,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        owner = "MobileNetV2"
        norm_layers = make_norm_layers(
            owner, norm, norm_k, norm_kwargs, attn_layer, attn_kwargs, num_stages=len(SETTINGS),
            stage_name="inverted-residual row (t, c, n, s)",
        )  # fmt: skip
        width_mult = check_number(owner, "width_mult", width_mult, 0.0, low_open=True)
        drop_rate = check_rate(owner, "drop_rate", drop_rate)
        cin = make_divisible(32 * width_mult)
        num_features = make_divisible(1280 * max(1.0, width_mult))
        dpr = iter(drop_path_rates(owner, drop_path_rate, sum(n for _, _, n, _ in SETTINGS)))
        features: list[nn.Module] = [conv_norm_act(check_int(owner, "in_chans", in_chans), cin, 3, 2, norm_layers.norm)]
        taps, reduction = [], 2
        for (t, c, n, s), dw_norm in zip(SETTINGS, norm_layers.stages):
            if s > 1:  # the previous block ends a resolution stage
                taps.append(dict(num_chs=cin, reduction=reduction, module=f"features.{len(features) - 1}"))
                reduction *= s
            cout = make_divisible(c * width_mult)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(
                    InvertedResidual(cin, cout, stride, t, norm_layers.norm, dw_norm, norm_layers.attn, next(dpr))
                )
                cin = cout
        features.append(conv_norm_act(cin, num_features, 1, 1, norm_layers.norm))
        taps.append(dict(num_chs=num_features, reduction=reduction, module=f"features.{len(features) - 1}"))
        self.features = nn.Sequential(*features)
        self._init_head(owner, num_features, num_classes, global_pool)  # the dropout is classifier.0
        self.classifier = nn.Sequential(nn.Dropout(drop_rate), self._new_classifier(num_classes))
        self._init_features(["features"], taps, checkpointed=["features"])
        if check_flag(owner, "zero_init_last", zero_init_last):
            for m in self.modules():
                if isinstance(m, InvertedResidual) and m.use_res_connect:
                    m.zero_init_last()

    def _new_classifier(self, num_classes: int) -> nn.Module:
        fc = super()._new_classifier(num_classes)
        if isinstance(fc, nn.Linear):  # the usual MobileNetV2 init
            nn.init.normal_(fc.weight, 0.0, 0.01)
            nn.init.zeros_(fc.bias)
        return fc

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global pool, dropout (``classifier.0``), then the classifier (skipped with ``pre_logits=True``)."""
        x = self.classifier[0](self.global_pool(x))
        return x if pre_logits else self.classifier[1](x)


@register_model(options=MobileNetV2)
def mobilenetv2(**kwargs: Any) -> MobileNetV2:
    """MobileNetV2 1.0 (3.5M parameters); AN at every depthwise norm, K = [5, 5, 5, 5, 10, 10, 10] per row."""
    return MobileNetV2(**kwargs)
