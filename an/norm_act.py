"""A norm followed by an activation, as one layer: timm's ``BatchNormAct2d`` convention for any norm (ours).

timm's EfficientNet, MobileNetV3 and other builders call a *norm+act* layer
``norm_act_layer(num_features, apply_act=..., act_layer=..., act_kwargs=..., inplace=..., drop_layer=...)`` and
expect it to normalize, drop (e.g. DropBlock) and activate. :class:`NormAct2d` composes any norm module with
those two; :func:`an.get_norm_act_layer` returns a constructor in that convention for every registered norm, and
:func:`an.convert_norms` uses :class:`NormAct2d` to replace timm's ``BatchNormAct2d`` while keeping its
activation and drop modules. Child names follow timm's: ``drop`` and ``act`` (the norm is ``norm``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.nn.modules import activation as _activation

__all__ = ["NormAct2d", "create_act"]

# Activation names accepted as strings: torch.nn's activation classes, lower case, '_' ignored ('hard_swish').
_ACTIVATIONS = {
    name.lower(): cls
    for name, cls in vars(_activation).items()
    if isinstance(cls, type) and issubclass(cls, nn.Module) and name in _activation.__all__
}
_ACTIVATIONS["swish"] = nn.SiLU


def _act_class(name: str) -> Callable[..., nn.Module]:
    key = name.replace("_", "").replace("-", "").lower()
    if key not in _ACTIVATIONS:
        raise ValueError(
            f"Unknown activation '{name}': pass a class (e.g. torch.nn.SiLU) or one of the torch.nn activation "
            f"names: {', '.join(sorted(_ACTIVATIONS))}"
        )
    return _ACTIVATIONS[key]


def create_act(
    act_layer: str | Callable[..., nn.Module] | None, act_kwargs: Mapping[str, Any] | None = None, inplace: bool = True
) -> nn.Module:
    """An activation module: ``act_layer(**act_kwargs, inplace=inplace)`` (``inplace`` dropped for activations
    that do not take it, e.g. ``nn.GELU``), ``nn.Identity()`` for None.

    Args:
        act_layer: A class or factory returning a module, a torch.nn activation name (``'silu'``, ``'relu'``,
            ``'hard_swish'``...), or None.
        act_kwargs: Keyword arguments of the activation.
        inplace: In-place activation where supported (overridden by ``act_kwargs['inplace']``).
    """
    if act_layer is None:
        return nn.Identity()
    if isinstance(act_layer, str):
        act_layer = _act_class(act_layer)
    kwargs = {"inplace": inplace, **dict(act_kwargs or {})}
    try:
        return act_layer(**kwargs)
    except TypeError as e:
        if "inplace" not in str(e):
            raise
        kwargs.pop("inplace")
        return act_layer(**kwargs)


class NormAct2d(nn.Module):
    """``act(drop(norm(x)))``: a norm layer with timm's norm+act interface.

    Args:
        norm: The normalization module.
        act: The activation module (None: identity).
        drop: A drop module applied between norm and activation, as timm does (None: identity).
    """

    __jit_unused_properties__ = ["num_features"]  # noqa: RUF012  (TorchScript's name)

    def __init__(self, norm: nn.Module, act: nn.Module | None = None, drop: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = norm
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    @property
    def num_features(self) -> int:
        """Channels of the norm."""
        return getattr(self.norm, "num_features", None) or self.norm.num_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(self.norm(x)))
