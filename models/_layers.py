"""Small building blocks shared by the backbone families (ours)."""

from __future__ import annotations

from torch import nn

from an.checks import check_int

__all__ = ["classifier", "conv2d"]


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
