"""The model registry: one dict from model name to builder function, plus option checking (ours).

Every backbone builder is registered with :func:`register_model` and built with :func:`create_model`, which
drops keyword arguments whose value is ``None`` (so a config default of ``None`` never overrides a model's own
default, the trick timm's ``create_model`` uses). Each family declares its options and defaults as a plain
dict; :func:`resolve_options` rejects anything else with a message that lists what is supported.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

__all__ = [
    "NORM_TYPES",
    "check_norm_type",
    "create_model",
    "is_model",
    "list_models",
    "list_norm_types",
    "model_entrypoint",
    "register_model",
    "resolve_options",
]

NORM_TYPES = ("bn", "gn", "sn", "se", "an", "an_gn", "iebn")

_MODELS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(fn: F) -> F:
    """Decorator: registers a builder under its function name (``fn(norm=..., num_classes=..., **options)``).

    Raises:
        ValueError: If the name is already registered by a different function.
    """
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        raise ValueError(f"Model '{name}' is already registered (by {_MODELS[name].__module__}).")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def list_norm_types() -> list[str]:
    """The norm types every model accepts: ``['bn', 'gn', 'sn', 'se', 'an', 'an_gn', 'iebn']``."""
    return list(NORM_TYPES)


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _MODELS


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``.

    Raises:
        ValueError: For an unknown name, with close matches and the list of valid names.
    """
    if name not in _MODELS:
        names = list_models()
        raise ValueError(f"Unknown model '{name}'.{_did_you_mean(name, names)} Valid models: {', '.join(names)}.")
    return _MODELS[name]


def check_norm_type(norm: str) -> str:
    """Returns ``norm`` if it is one of :data:`NORM_TYPES`, else raises ValueError naming the valid types."""
    if norm not in NORM_TYPES:
        raise ValueError(
            f"Unknown norm type {norm!r}.{_did_you_mean(str(norm), list(NORM_TYPES))} "
            f"Valid norm types: {', '.join(NORM_TYPES)}."
        )
    return norm


def resolve_options(model: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Merges user ``options`` into a family's ``defaults``; ``None`` values keep the default.

    Args:
        model: Model name, for the error message.
        options: Keyword arguments given by the caller.
        defaults: Every option the family supports, with its default.

    Returns:
        A new dict holding every supported option.

    Raises:
        ValueError: If an option is not supported, e.g. ``"mobilenetv2 does not support option 'deep_stem';
            supported: ..."``.
    """
    unknown = [k for k in options if k not in defaults]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(defaults), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"{model} does not support option '{k}'{hint}; supported: {', '.join(sorted(defaults))}.")
    out = dict(defaults)
    out.update({k: v for k, v in options.items() if v is not None})
    return out


def create_model(name: str, norm: str = "bn", num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """Builds a registered model.

    Args:
        name: A name from :func:`list_models`, e.g. ``'resnet50'``.
        norm: A norm type from :func:`list_norm_types`.
        num_classes: Classifier outputs (0 = no classifier; the model returns pooled features).
        **kwargs: Model options (see ``docs/MODELS.md``); options whose value is ``None`` are dropped so
            that the model's default applies.

    Returns:
        The model, initialised, on the current default device (use ``with torch.device('meta'):`` to build
        without allocating memory).

    Raises:
        ValueError: For an unknown model, norm type or option, or a bad option value.
    """
    fn = model_entrypoint(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return fn(norm=check_norm_type(norm), num_classes=num_classes, **kwargs)
