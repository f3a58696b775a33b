"""Small building blocks shared by the backbone families (ours), and the timm layers they use."""

from __future__ import annotations

from timm.layers import DropPath, SelectAdaptivePool2d
from torch import nn

from an.checks import check_choice, check_int, check_rate

__all__ = [
    "GLOBAL_POOLS",
    "classifier",
    "conv2d",
    "drop_path_rates",
    "global_pool_layer",
    "make_drop_path",
]

# Global pooling types (timm's SelectAdaptivePool2d); '' = none (the head then returns the feature map).
GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax", "")


def conv2d(cin: int, cout: int, kernel_size: int = 1, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free 'same'-padded convolution with Kaiming-normal init (fan_out, ReLU gain).

    Every backbone convolution is created here, so the init happens at creation and never touches the
    convolutions inside norm layers (AN's attention conv, SE's FCs), which initialise themselves.
    """
    conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def classifier(in_features: int, num_classes: int) -> nn.Module:
    """``nn.Linear`` with PyTorch's default init, or ``nn.Identity`` when ``num_classes == 0``."""
    check_int("classifier", "num_classes", num_classes, minimum=0)
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


def global_pool_layer(owner: str, global_pool: str, num_classes: int) -> SelectAdaptivePool2d:
    """timm's selectable global pool, checked against the classifier it feeds; flattens to (N, C) unless
    ``global_pool == ''``."""
    check_choice(owner, "global_pool", global_pool, GLOBAL_POOLS)
    check_int(owner, "num_classes", num_classes, minimum=0)
    if global_pool == "" and num_classes > 0:
        raise ValueError(
            f"{owner}: global_pool='' (no pooling) leaves a feature map, which a linear classifier cannot take; "
            f"use it with num_classes=0, or keep a pool (one of {', '.join(map(repr, GLOBAL_POOLS[:-1]))})"
        )
    return SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))


def drop_path_rates(owner: str, rate: float, num_blocks: int) -> list[float]:
    """Stochastic-depth rate per residual block: linear from 0 (first block) to ``rate`` (last), timm's rule."""
    rate = check_rate(owner, "drop_path_rate", rate)
    return [rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


def make_drop_path(rate: float) -> nn.Module | None:
    """timm's ``DropPath`` (per-sample stochastic depth on a residual branch), or None at rate 0."""
    return DropPath(rate) if rate > 0 else None
