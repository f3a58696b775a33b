"""Registers every model with timm's registry as ``anorm_<name>`` (ours).

``timm.create_model('anorm_resnet50', norm='an', num_classes=10)`` then builds ``models.create_model(
'resnet50', norm='an', num_classes=10)``. timm passes its own keywords (``pretrained``, ``pretrained_cfg``,
``pretrained_cfg_overlay``, ``cache_dir``, sometimes ``device``/``dtype``); the entry points absorb them. The
registration is best effort: if timm is missing or its registry API differs, nothing is registered and the
reason is logged, never raised, so importing :mod:`models` cannot break because of timm.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._registry import create_model, list_models

__all__ = ["TIMM_PREFIX", "register_timm_models"]

TIMM_PREFIX = "anorm_"

_log = logging.getLogger(__name__)

# Keywords timm adds that our builders do not take (dropped; 'pretrained' is checked).
_TIMM_KEYWORDS = (
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "cache_dir",
    "pretrained_strict",
    "scriptable",
    "exportable",
    "no_jit",
)

_DATA_CFG = {
    "input_size": (3, 224, 224),
    "crop_pct": 0.875,
    "interpolation": "bilinear",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ValueError(f"{TIMM_PREFIX}{name}: no pretrained weights are published; use pretrained=False")
        for k in _TIMM_KEYWORDS:
            kwargs.pop(k, None)
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if device is not None:
            with torch.device(device):
                model = create_model(name, **kwargs)
        else:
            model = create_model(name, **kwargs)
        if dtype is not None:
            model = model.to(dtype)
        classes = getattr(getattr(model, "fc", None), "out_features", kwargs.get("num_classes", 1000))
        model.pretrained_cfg = dict(_DATA_CFG, architecture=TIMM_PREFIX + name, num_classes=classes)
        model.default_cfg = model.pretrained_cfg
        return model

    entry.__name__ = entry.__qualname__ = TIMM_PREFIX + name
    entry.__module__ = __name__
    entry.__doc__ = f"``models.create_model('{name}', **kwargs)`` for timm (no pretrained weights)."
    return entry


def _timm_api() -> tuple[Callable, Callable[[str], bool], Callable[[str], Callable]] | None:
    try:
        import timm.models as tm
    except Exception as e:  # timm missing or broken: the framework works without it
        _log.debug("timm not importable (%s); anorm_* models not registered", e)
        return None
    register = getattr(tm, "register_model", None)
    is_model = getattr(tm, "is_model", None)
    entrypoint = getattr(tm, "model_entrypoint", None)
    if register is None or is_model is None or entrypoint is None:
        try:  # older layouts
            from timm.models import registry as reg  # type: ignore[attr-defined]

            register, is_model, entrypoint = reg.register_model, reg.is_model, reg.model_entrypoint
        except Exception as e:
            _log.warning("timm's model registry API was not found (%s); anorm_* models not registered", e)
            return None
    return register, is_model, entrypoint


def register_timm_models() -> list[str]:
    """Registers ``anorm_<name>`` for every model not yet registered; returns the names now available.

    Safe to call repeatedly; a name already taken by another package is skipped with a warning.
    """
    api = _timm_api()
    if api is None:
        return []
    register, is_model, entrypoint = api
    names = []
    for name in list_models():
        full = TIMM_PREFIX + name
        try:
            if is_model(full):
                if getattr(entrypoint(full), "__module__", None) != __name__:
                    _log.warning("timm already has a model named %s (not ours); skipped", full)
                    continue
            else:
                fn = _entrypoint(name)
                globals()[full] = fn  # timm lists the name in this module's __all__; make it resolvable
                register(fn)
            names.append(full)
        except Exception as e:  # a registry API change must not break importing models
            _log.warning("could not register %s with timm: %s", full, e)
    return names
