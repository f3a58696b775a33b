"""Registers every (model, norm) pair with timm as ``anorm_<model>_<norm>`` (ours), with a full ``pretrained_cfg``.

``timm.create_model('anorm_resnet50_an', num_classes=10)`` builds ``models.create_model('resnet50', norm='an',
num_classes=10)`` through timm's ``build_model_with_cfg``, so timm's machinery applies unchanged:
``features_only=True`` / ``out_indices`` / ``feature_cls`` (``FeatureListNet`` over the model's
``feature_info``), ``pretrained_cfg`` / ``pretrained_cfg_overlay`` (e.g. ``dict(file='best.pth')`` loads your
own weights with ``pretrained=True``), ``drop_rate``, ``drop_path_rate``, ``global_pool``, ``in_chans`` and
every model option (``norm_k``, ``norm_kwargs``, ``base_width``, ...). ``norm=`` still overrides the norm that
the name says. There is no bare ``anorm_<model>``: the name always says the norm.

Each name has one registered configuration, tagged ``untrained`` (timm's tag for an architecture without
published weights): ``timm.models.get_pretrained_cfg('anorm_resnet50_an')`` returns it. The data settings
are the training recipe's (224 crop at 0.875, bilinear, ImageNet mean/std; ``docs/AN.md`` 4).

Names are registered for the norms registered when :func:`register_timm_models` runs (importing
:mod:`models` runs it for the built-in ones); call it again after ``an.register_norm`` to add a new norm's
names. Registration is best effort: if timm's registry API differs, nothing is registered and the reason is
logged, never raised.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import an

from ._registry import create_model, list_models, model_class, model_entrypoint

__all__ = ["TIMM_PREFIX", "register_timm_models", "timm_name"]

TIMM_PREFIX = "anorm_"
TAG = "untrained"
# The licence of the code these entries build (no weights are published). The repository declares none yet;
# "other" is the Hugging Face Hub's value for "not one of the listed licences". Change it here once it does.
LICENSE = "other"

_log = logging.getLogger(__name__)

# Keywords older timm versions pass that neither build_model_with_cfg nor the models take.
_DROPPED = ("scriptable", "exportable", "no_jit")
# pretrained_cfg keys that name a weight source.
_SOURCES = ("url", "file", "state_dict", "hf_hub_id")

_DATA_CFG = {
    "input_size": (3, 224, 224),
    "pool_size": (7, 7),  # every backbone has stride 32
    "crop_pct": 0.875,
    "interpolation": "bilinear",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "num_classes": 1000,
}

# timm's register_model reads the configurations of a module's models from its `default_cfgs`.
default_cfgs: dict[str, Any] = {}


def timm_name(model: str, norm: str) -> str:
    """The timm name of ``model`` with ``norm`` (``timm_name('resnet50', 'an') == 'anorm_resnet50_an'``)."""
    return f"{TIMM_PREFIX}{model}_{an.norm_entry(norm).name}"


def _pretrained_cfg(model: str, norm: str) -> dict[str, Any]:
    cls = model_class(model)
    doc = inspect.getdoc(model_entrypoint(model)) or model
    entry = an.norm_entry(norm)
    return dict(
        url="",
        **_DATA_CFG,
        first_conv=getattr(cls, "first_conv", None),
        classifier=getattr(cls, "classifier_name", None),
        license=LICENSE,
        description=f"{doc.splitlines()[0].split(';')[0]} with norm='{entry.name}' "
        f"({entry.description or entry.name}); no pretrained weights are published.",
        paper_name="Attentive Normalization (ECCV 2020)",
        paper_ids="arXiv:1908.01259",
    )


def _builder(model: str) -> Callable[..., nn.Module]:
    """``models.create_model(model, **kwargs)``, honouring timm's ``device``/``dtype`` keywords."""

    def build(**kwargs: Any) -> nn.Module:
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if device is not None:
            with torch.device(device):
                net = create_model(model, **kwargs)
        else:
            net = create_model(model, **kwargs)
        return net if dtype is None else net.to(dtype)

    return build


def _entrypoint(model: str, norm: str, full: str) -> Callable[..., nn.Module]:
    from timm.models import build_model_with_cfg

    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        for key in _DROPPED:
            kwargs.pop(key, None)
        kwargs.setdefault("norm", norm)
        cfg, overlay = kwargs.pop("pretrained_cfg", None), dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        given = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg if isinstance(cfg, dict) else {}
        if pretrained and not any(src.get(k) for src in (overlay, given) for k in _SOURCES):
            raise ValueError(
                f"{full}: no pretrained weights are published. To load your own, pass their file: "
                f"timm.create_model('{full}', pretrained=True, pretrained_cfg_overlay=dict(file='best.pth'))"
            )
        cls = model_class(model)
        if hasattr(cls, "first_conv_for"):
            options = {k: v for k, v in kwargs.items() if k not in ("device", "dtype")}
            overlay.setdefault("first_conv", cls.first_conv_for(**options))
        feature_cfg = {"flatten_sequential": True} if getattr(cls, "flatten_sequential", False) else {}
        return build_model_with_cfg(
            _builder(model),
            full,
            pretrained,
            pretrained_cfg=cfg,
            pretrained_cfg_overlay=overlay,
            feature_cfg=feature_cfg,
            **kwargs,
        )

    entry.__name__ = entry.__qualname__ = full
    entry.__module__ = __name__
    entry.__doc__ = f"``models.create_model('{model}', norm='{norm}', **kwargs)`` for timm (no pretrained weights)."
    return entry


def _timm_api() -> tuple[Callable, Callable[[str], bool], Callable[[str], Callable], Callable] | None:
    try:
        import timm.models as tm
    except Exception as e:  # timm missing or broken: the framework works without it
        _log.debug("timm not importable (%s); anorm_* models not registered", e)
        return None
    names = ("register_model", "is_model", "model_entrypoint", "generate_default_cfgs")
    api = tuple(getattr(tm, n, None) for n in names)
    if any(f is None for f in api):
        _log.warning("timm's model registry API was not found (timm %s); anorm_* models not registered", tm)
        return None
    return api  # type: ignore[return-value]


def register_timm_models() -> list[str]:
    """Registers ``anorm_<model>_<norm>`` for every registered model and norm; returns the names available.

    Safe to call repeatedly (after registering a norm, to add its names); a name already taken by another
    package is skipped with a warning.
    """
    api = _timm_api()
    if api is None:
        return []
    register, is_model, entrypoint, generate_default_cfgs = api
    names = []
    for model in list_models():
        for norm in an.list_norms():
            full = timm_name(model, norm)
            try:
                if is_model(full):
                    if getattr(entrypoint(full), "__module__", None) != __name__:
                        _log.warning("timm already has a model named %s (not ours); skipped", full)
                        continue
                else:
                    default_cfgs.update(generate_default_cfgs({f"{full}.{TAG}": _pretrained_cfg(model, norm)}))
                    fn = _entrypoint(model, norm, full)
                    globals()[full] = fn  # timm lists the name in this module's __all__; make it resolvable
                    register(fn)
                names.append(full)
            except Exception as e:  # a registry API change must not break importing models
                _log.warning("could not register %s with timm: %s", full, e)
    return names
