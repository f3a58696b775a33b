"""Small building blocks and option handling shared by the backbone families (ours)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = [
    "COMMON_OPTIONS",
    "check_flag",
    "check_int",
    "check_rate",
    "classifier",
    "conv2d",
    "family_options",
    "norm_options",
]

# Options every model accepts, with their defaults (None = the family's own default, filled in by the family).
COMMON_OPTIONS: dict[str, Any] = {
    "norm_k": None,  # K per stage at the AN placement; None = the paper's values for the family
    "an_attention": "hsigmoid",
    "an_impl": "auto",
    "gn_groups": 32,
    "zero_init_last": None,
    "drop_rate": None,
    "in_chans": 3,
    "se_reduction": 16,
    "se_bias": True,  # biased SE FCs, as in the SE paper (SE-ResNet-50: 28.09M); False gives 28.07M
}


def family_options(**family: Any) -> dict[str, Any]:
    """The common options updated with a family's own options and defaults."""
    out = dict(COMMON_OPTIONS)
    out.update(family)
    return out


def check_flag(model: str, name: str, value: Any) -> bool:
    """Returns ``value`` if it is a bool, else raises ValueError."""
    if not isinstance(value, bool):
        raise ValueError(f"{model}: option '{name}' must be True or False, got {value!r}")
    return value


def check_rate(model: str, name: str, value: Any) -> float:
    """Returns ``value`` as a float if it is a probability in [0, 1), else raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{model}: option '{name}' must be a number in [0, 1), got {value!r}")
    return float(value)


def check_int(model: str, name: str, value: Any, minimum: int = 1) -> int:
    """Returns ``value`` if it is an int >= ``minimum``, else raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{model}: option '{name}' must be an integer >= {minimum}, got {value!r}")
    return value


def norm_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of resolved options that :func:`models._norms.make_norm_layers` takes."""
    keys = ("an_attention", "an_impl", "gn_groups", "se_reduction", "se_bias")
    return {k: opts[k] for k in keys}


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
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()
