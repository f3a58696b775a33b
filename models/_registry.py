"""The model registry: one dict from model name to builder, and each model's options read from its signature.

A builder is registered with :func:`register_model` and built with :func:`create_model`. A model's options are
the keyword-only parameters of its class (``ResNet``, ``DenseNet``, ...): their defaults there are the only
defaults, and :func:`model_options` exposes them (with their annotations) so that configuration checks derive
from the models instead of keeping a parallel table.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from an.checks import did_you_mean

__all__ = [
    "create_model",
    "is_model",
    "list_models",
    "model_class",
    "model_entrypoint",
    "model_options",
    "register_model",
]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_OPTIONS_FROM: dict[str, Callable[..., Any]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(fn: F | None = None, *, options: Callable[..., Any] | None = None):
    """Decorator: registers a builder under its function name.

    Args:
        fn: The builder, ``fn(**options) -> nn.Module``.
        options: The callable whose keyword-only parameters are the model's options (its class); default
            ``fn`` itself.

    Raises:
        ValueError: If the name is already registered by a different function.
    """

    def add(f: F) -> F:
        name = f.__name__
        if name in _MODELS and _MODELS[name] is not f:
            raise ValueError(f"Model '{name}' is already registered (by {_MODELS[name].__module__}).")
        _MODELS[name] = f
        _OPTIONS_FROM[name] = options or f
        return f

    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _MODELS


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name`` (ValueError with close matches for an unknown name)."""
    if name not in _MODELS:
        names = list_models()
        raise ValueError(f"Unknown model '{name}'.{did_you_mean(name, names)} Valid models: {', '.join(names)}.")
    return _MODELS[name]


def model_class(name: str) -> Callable[..., Any]:
    """The callable whose keyword-only parameters are the options of ``name``: its class (``ResNet``, ...) for
    the built-in models, the builder itself for a model registered without ``options=``."""
    model_entrypoint(name)
    return _OPTIONS_FROM[name]


def model_options(name: str) -> dict[str, tuple[Any, Any]]:
    """The options of model ``name``: ``{option: (default, annotation)}``, in signature order.

    The annotation is resolved to a type where possible (``typing.Any`` otherwise).
    """
    target = model_class(name)
    init = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # unresolvable annotations: no types, names and defaults still work
        hints = {}
    out = {}
    for p in inspect.signature(target).parameters.values():
        if p.kind is p.KEYWORD_ONLY:
            out[p.name] = (p.default, hints.get(p.name, Any))
    return out


def create_model(name: str, norm: str | None = None, **kwargs: Any) -> nn.Module:
    """Builds a registered model.

    Args:
        name: A name from :func:`list_models`, e.g. ``'resnet50'``.
        norm: A norm from ``an.list_norms()`` (None: the model's default, ``'bn'``).
        **kwargs: The model's options (:func:`model_options`; ``docs/MODELS.md``), e.g. ``num_classes``,
            ``norm_k``, ``norm_kwargs``, ``attn_layer``.

    Returns:
        The model, initialised, on the current default device (use ``with torch.device('meta'):`` to build
        without allocating memory).

    Raises:
        ValueError: For an unknown model, norm or option, or a bad option value.
    """
    fn = model_entrypoint(name)
    if norm is not None:
        kwargs["norm"] = norm
    valid = model_options(name)
    unknown = [k for k in kwargs if k not in valid]
    if unknown and valid:
        raise ValueError(
            f"{name} does not support option '{unknown[0]}'.{did_you_mean(unknown[0], valid)} "
            f"Supported: {', '.join(valid)}."
        )
    return fn(**kwargs)
