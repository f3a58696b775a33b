"""The norm registry and the attention-layer registry: the one place every part looks names up.

A **norm** entry says how to build the layer and, as data, how a backbone places it. Backbones have three kinds
of norm positions: the *placement* positions (where the paper puts AN: ResNet's bn2, MobileNetV2's depthwise
norm, DenseNet's norm2, AOGNet's full-width 3x3 norm), the *plain* positions (every other norm) and the
*projection shortcuts*. An entry with ``plain=None`` goes everywhere (BN, GN, SN); one with ``plain='bn'`` goes
only at the placement positions and leaves BN elsewhere (AN); ``shortcut`` overrides the shortcut norm (IEBN
keeps BN there); ``per_stage_k`` gives the placement layers the stage's K (``k=...``). The plain and shortcut
norms receive the subset of the user's norm keywords their own builder accepts (``groups`` reaches the GN
positions of ``an_gn``, ``impl`` does not reach BN).

An **attention** entry (``se``) builds a channel-attention module that backbones insert at their attention
positions (timm's ``create_attn`` convention: the channel count is the first argument).

Adding a norm::

    def instance_norm(num_features, *, eps=1e-5):
        return nn.InstanceNorm2d(num_features, eps=eps, affine=True)

    an.register_norm("in", instance_norm, plain="bn")      # then model.norm: in works everywhere

Names are case-insensitive and ``-`` equals ``_``. The keywords a name accepts are its builder's keyword
parameters; anything else is a ``TypeError`` that lists them.

**Other frameworks' builders.** :func:`get_norm_layer` returns a ``functools.partial`` of the plain function
:func:`build_norm_layer` with keywords only, which is what timm's ``get_norm_layer`` / ``create_norm_layer``
accept (timm unbinds a partial's keywords and rebinds them; positional arguments would be lost) and what
torchvision's ``norm_layer`` calls. It takes the ``device`` / ``dtype`` keywords timm passes, and timm's
norm+act keywords (``apply_act``, ``act_layer``, ``act_kwargs``, ``inplace``, ``drop_layer``): given any of those
it returns an :class:`~an.norm_act.NormAct2d`. :func:`get_norm_act_layer` binds the activation, which timm's
EfficientNet-style builders need (timm passes no activation to a function-type norm+act layer).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from an.checks import check_int, did_you_mean
from an.norm_act import NormAct2d, create_act

__all__ = [
    "AttnEntry",
    "NormEntry",
    "attn_entry",
    "build_norm_layer",
    "create_attn",
    "create_norm",
    "get_attn_layer",
    "get_norm_act_layer",
    "get_norm_layer",
    "list_attns",
    "list_norms",
    "norm_entry",
    "register_attn",
    "register_norm",
    "registered_norm",
    "unregister_attn",
    "unregister_norm",
]

Builder = Callable[..., nn.Module]


def _keywords(builder: Builder) -> tuple[dict[str, Any], bool]:
    """The builder's keyword options with their defaults (all parameters after the first), and whether it
    takes ``**kwargs``."""
    params = list(inspect.signature(builder).parameters.values())[1:]
    options = {
        p.name: p.default
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not inspect.Parameter.empty
    }
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    return options, open_ended


@dataclass(frozen=True)
class _Entry:
    """A registered builder: ``builder(channels, **options) -> nn.Module``."""

    kind: ClassVar[str] = "layer"
    name: str
    builder: Builder
    description: str = ""

    @property
    def options(self) -> dict[str, Any]:
        """Keyword options and their defaults (the builder's signature: the only place they are written)."""
        return _keywords(self.builder)[0]

    def check_keywords(self, kwargs: dict[str, Any]) -> None:
        """Raises TypeError for a keyword the builder does not accept (listing the valid ones)."""
        valid, open_ended = _keywords(self.builder)
        bad = [k for k in kwargs if k not in valid]
        if bad and not open_ended:
            raise TypeError(
                f"{self.kind} '{self.name}' got unexpected keyword(s) {', '.join(map(repr, bad))}."
                f"{did_you_mean(bad[0], valid)} Valid keywords for '{self.name}': {', '.join(valid) or '(none)'}."
            )

    def accepted(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The subset of ``kwargs`` this builder accepts."""
        valid, open_ended = _keywords(self.builder)
        return dict(kwargs) if open_ended else {k: v for k, v in kwargs.items() if k in valid}


@dataclass(frozen=True)
class NormEntry(_Entry):
    """One registered norm.

    Attributes:
        name: Registry name.
        builder: ``builder(num_features, **options) -> nn.Module``.
        description: One line for listings.
        plain: Norm of a backbone's plain positions when this norm is chosen; None = this norm everywhere.
        shortcut: Norm of projection shortcuts; None = the plain norm.
        per_stage_k: Placement layers take ``k`` (the stage's K from the backbone's ``norm_k``).
    """

    kind: ClassVar[str] = "norm"
    plain: str | None = None
    shortcut: str | None = None
    per_stage_k: bool = False


@dataclass(frozen=True)
class AttnEntry(_Entry):
    """One registered channel-attention layer: ``builder(channels, **options) -> nn.Module``."""

    kind: ClassVar[str] = "attention layer"


E = TypeVar("E", bound=_Entry)


class _Registry(Generic[E]):
    """Name -> entry with normalised names and did-you-mean lookup."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # for messages
        self.entries: dict[str, E] = {}

    @staticmethod
    def key(name: str) -> str:
        if not isinstance(name, str):
            raise TypeError(f"a registry name must be a string, got {type(name).__name__}")
        return name.strip().lower().replace("-", "_")

    def add(self, entry: E, replace: bool) -> E:
        if entry.name in self.entries and not replace:
            raise ValueError(f"{self.kind} '{entry.name}' is already registered; pass replace=True to override it.")
        self.entries[entry.name] = entry
        return entry

    def remove(self, name: str) -> E:
        return self.entries.pop(self.get(name).name)

    def get(self, name: str) -> E:
        key = self.key(name)
        if key not in self.entries:
            valid = list(self.entries)
            raise ValueError(
                f"Unknown {self.kind} '{name}'.{did_you_mean(key, valid)} Valid {self.kind}s: {', '.join(valid)}."
            )
        return self.entries[key]


_NORMS: _Registry[NormEntry] = _Registry("norm")
_ATTNS: _Registry[AttnEntry] = _Registry("attention layer")


# ----------------------------------------------------------------------------------------------------- norms
def register_norm(
    name: str,
    builder: Builder | None = None,
    *,
    plain: str | None = None,
    shortcut: str | None = None,
    per_stage_k: bool = False,
    description: str = "",
    replace: bool = False,
):
    """Registers a norm; usable as a call or, without ``builder``, as a decorator.

    Args:
        name: Registry name (lower case; ``-`` is read as ``_``).
        builder: ``builder(num_features, **options)``; its keyword parameters are the norm's options.
        plain: Norm of a backbone's plain positions (None: this norm goes everywhere).
        shortcut: Norm of projection shortcuts (None: the plain norm).
        per_stage_k: The placement layers take ``k`` per stage.
        description: One line for listings.
        replace: Allow replacing an existing entry.
    """

    def add(fn: Builder) -> Builder:
        entry = NormEntry(_NORMS.key(name), fn, description, plain=plain, shortcut=shortcut, per_stage_k=per_stage_k)
        _NORMS.add(entry, replace)
        return fn

    return add(builder) if builder is not None else add


def unregister_norm(name: str) -> NormEntry:
    """Removes a norm and returns its entry (plugins and tests)."""
    return _NORMS.remove(name)


@contextmanager
def registered_norm(name: str, builder: Builder, **kwargs) -> Iterator[NormEntry]:
    """Registers a norm for the duration of a ``with`` block (tests, notebooks)."""
    register_norm(name, builder, **kwargs)
    try:
        yield norm_entry(name)
    finally:
        unregister_norm(name)


def list_norms() -> list[str]:
    """Registered norm names, in registration order."""
    return list(_NORMS.entries)


def norm_entry(name: str) -> NormEntry:
    """The entry of ``name``; ValueError with a did-you-mean for an unknown name."""
    return _NORMS.get(name)


def create_norm(
    name: str,
    num_features: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs,
) -> nn.Module:
    """Builds a normalization layer by name.

    Args:
        name: One of :func:`list_norms` (case-insensitive, ``-`` accepted for ``_``).
        num_features: Channels C.
        device: Device to build the layer on (e.g. ``'meta'``); default: the current default device.
        dtype: Floating-point dtype of its parameters and buffers; default: the current default dtype.
        **kwargs: The name's options (see ``norm_entry(name).options``).

    Raises:
        ValueError: Unknown name (with a did-you-mean) or a bad value (raised by the layer).
        TypeError: A keyword the name does not accept (the valid ones are listed).
    """
    entry = norm_entry(name)
    entry.check_keywords(kwargs)
    check_int(f"norm '{entry.name}'", "num_features", num_features)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        layer = entry.builder(num_features, **kwargs)
    return layer.to(dtype=dtype) if dtype is not None else layer


# timm's norm+act keywords (its BatchNormAct2d signature); any of them makes build_norm_layer return a NormAct2d.
NORM_ACT_KEYWORDS = ("apply_act", "act_layer", "act_kwargs", "inplace", "drop_layer")
_UNSET: Any = object()


def build_norm_layer(
    num_features: int,
    *,
    norm: str | Builder,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    apply_act: bool = _UNSET,
    act_layer: Any = _UNSET,
    act_kwargs: dict[str, Any] | None = None,
    inplace: bool = _UNSET,
    drop_layer: Callable[[], nn.Module] | None = None,
    **kwargs,
) -> nn.Module:
    """The function behind :func:`get_norm_layer` / :func:`get_norm_act_layer`: one norm layer, or a norm+act.

    Args:
        num_features: Channels C.
        norm: A registered norm name, or a callable ``norm(num_features, **kwargs)``.
        device: Device to build on.
        dtype: Floating-point dtype.
        apply_act: timm's norm+act flag: False gives no activation (default True when norm+act).
        act_layer: Activation class, factory or torch.nn activation name; None for none.
        act_kwargs: Keyword arguments of the activation.
        inplace: In-place activation (default True).
        drop_layer: A drop-module constructor applied between norm and activation (timm's DropBlock).
        **kwargs: Options of the norm.

    Returns:
        The norm layer; a :class:`~an.norm_act.NormAct2d` when any norm+act keyword is given.

    Raises:
        TypeError: Called as a norm+act layer (as timm's EfficientNet-style builders do) without an activation
            bound; use :func:`get_norm_act_layer`.
    """
    if callable(norm):
        dd = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        layer = norm(num_features, **dd, **kwargs)
    else:
        layer = create_norm(norm, num_features, device=device, dtype=dtype, **kwargs)
    given = {"apply_act": apply_act, "act_layer": act_layer, "inplace": inplace}
    if all(v is _UNSET for v in given.values()) and act_kwargs is None and drop_layer is None:
        return layer
    apply_act = True if apply_act is _UNSET else apply_act
    if apply_act and act_layer is _UNSET:
        what = norm if isinstance(norm, str) else getattr(norm, "__name__", repr(norm))
        passed = ", ".join(k for k, v in given.items() if v is not _UNSET) or "drop_layer"
        raise TypeError(
            f"norm '{what}' was called as a norm+act layer (with {passed}), "
            "as timm's EfficientNet/MobileNetV3 builders do, but no activation is bound and timm passes none to a "
            f"function. Pass norm_layer=an.get_norm_act_layer('{what}', act_layer=torch.nn.SiLU) (the model's "
            "activation), or build the model with BatchNorm and convert it with an.convert_norms, which keeps "
            "each layer's own activation."
        )
    act = create_act(act_layer if apply_act else None, act_kwargs, True if inplace is _UNSET else inplace)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        drop = drop_layer() if drop_layer is not None else None
    return NormAct2d(layer, act, drop)


def _check_bound(name: str | Builder, bound: dict[str, Any]) -> str | Builder:
    """The registry name of ``name`` (callables pass), after checking the norm options among ``bound``."""
    if callable(name):
        return name
    entry = norm_entry(name)
    entry.check_keywords({k: v for k, v in bound.items() if k not in (*NORM_ACT_KEYWORDS, "device", "dtype")})
    return entry.name


def get_norm_layer(name: str | Builder, **bound_kwargs) -> Callable[..., nn.Module]:
    """A constructor taking ``num_features``, with ``bound_kwargs`` bound: a backbone's ``norm_layer``.

    Works as ``norm_layer=`` of our backbones, torchvision's (``resnet50(norm_layer=...)``) and timm's
    (``timm.create_model('resnet50', norm_layer=...)``, ``timm.layers.create_norm_layer``): it is a keywords-only
    ``functools.partial`` of :func:`build_norm_layer`, and accepts ``device``/``dtype``. Names and keyword names
    are checked now; values when a layer is built. A callable is returned as a partial.

    Example:
        >>> norm_layer = get_norm_layer("an", k=20)
        >>> layer = norm_layer(256)
    """
    if callable(name):
        return functools.partial(name, **bound_kwargs) if bound_kwargs else name
    return functools.partial(build_norm_layer, norm=_check_bound(name, bound_kwargs), **bound_kwargs)


def get_norm_act_layer(name: str | Builder, act_layer: Any, **bound_kwargs) -> Callable[..., nn.Module]:
    """A norm+act constructor in timm's ``BatchNormAct2d`` convention, for timm's ``norm_layer`` of
    EfficientNet/MobileNet-style models (which call ``norm_act_layer(C, apply_act=..., inplace=..., ...)``).

    Args:
        name: A registered norm name (or a callable norm constructor).
        act_layer: The activation where the model applies one (class, factory or torch.nn activation name,
            e.g. ``torch.nn.SiLU`` for EfficientNet); None for none. timm does not pass its own activation to a
            function-type layer, so models that mix activations (MobileNetV3) get this one everywhere: convert
            those with :func:`an.convert_norms` instead.
        **bound_kwargs: Options of the norm (and ``act_kwargs``, ``drop_layer``).

    Example:
        >>> norm_act = get_norm_act_layer("an", act_layer=nn.SiLU, k=5)
        >>> layer = norm_act(32, inplace=True)        # AN then SiLU
        >>> layer = norm_act(32, apply_act=False)     # AN alone (inside a NormAct2d)
    """
    norm = _check_bound(name, bound_kwargs)
    return functools.partial(build_norm_layer, norm=norm, act_layer=act_layer, **bound_kwargs)


# ------------------------------------------------------------------------------------------------ attention
def register_attn(name: str, builder: Builder | None = None, *, description: str = "", replace: bool = False):
    """Registers a channel-attention layer ``builder(channels, **options)``; also usable as a decorator."""

    def add(fn: Builder) -> Builder:
        _ATTNS.add(AttnEntry(_ATTNS.key(name), fn, description), replace)
        return fn

    return add(builder) if builder is not None else add


def unregister_attn(name: str) -> AttnEntry:
    return _ATTNS.remove(name)


def list_attns() -> list[str]:
    """Registered attention-layer names."""
    return list(_ATTNS.entries)


def attn_entry(name: str) -> AttnEntry:
    return _ATTNS.get(name)


def create_attn(name: str, channels: int, **kwargs) -> nn.Module:
    """Builds a channel-attention layer by name (e.g. ``create_attn('se', 256, reduction=16)``)."""
    entry = attn_entry(name)
    entry.check_keywords(kwargs)
    check_int(f"attention layer '{entry.name}'", "channels", channels)
    return entry.builder(channels, **kwargs)


def get_attn_layer(name: str, **bound_kwargs) -> Callable[[int], nn.Module]:
    """A constructor taking the channel count, with ``bound_kwargs`` bound (checked now)."""
    entry = attn_entry(name)
    entry.check_keywords(bound_kwargs)
    return functools.partial(create_attn, entry.name, **bound_kwargs)
