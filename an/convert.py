"""Put any registered norm into any model: replace its BatchNorm layers (ours).

:func:`convert_norms` works on torchvision, timm and plain PyTorch models. It replaces ``nn.BatchNorm2d``,
``nn.SyncBatchNorm`` and timm's ``BatchNormAct2d`` / ``SyncBatchNormAct`` layers chosen by ``where`` with layers
of a registered norm (``an.list_norms()``), keeps the activation and drop modules of timm's norm+act layers (in an
:class:`~an.norm_act.NormAct2d`), carries the BatchNorm's state over, and returns a :class:`NormConversion` report.

**Which layers** (``where``):

- ``'all'``: every BatchNorm.
- ``'paper'``: the rule of the AN paper (``docs/AN.md`` section 2): the norm of every 3x3 or depthwise convolution
  inside a block. Found by running the model once (``example_input``; default a 224x224 image of the first
  convolution's channels, eval mode, no gradients, state untouched) and following the tensors: the BatchNorm that
  normalizes the output of such a convolution, or, where no BatchNorm does (pre-activation designs such as
  DenseNet), the one whose output (directly or through one activation module) is its input. Excluded: the model's
  first convolution, and convolutions with no *block* around them, a block being a submodule that is neither
  the model itself nor a torch container (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict`` and their
  subclasses such as torchvision's ``Conv2dNormActivation``): stems and heads keep BatchNorm. In torchvision's
  and timm's ResNets this is the 16 ``bn2`` of ResNet-50, in MobileNetV2/EfficientNet/MobileNetV3 the norm of every
  depthwise convolution, in torchvision's DenseNet ``norm2``: the paper's placements.
- ``'auto'`` (default): ``'paper'`` for norms that the registry places only at AN's positions (an entry with a
  ``plain`` norm, e.g. ``'an'``, ``'an_gn'``), ``'all'`` for the others (``'bn'``, ``'gn'``, ``'sn'``, ``'iebn'``).
  For an entry whose plain norm is not BatchNorm (``'an_gn'``: GN), the layers left out are converted to that plain
  norm, so ``convert_norms(model, 'an_gn')`` mirrors ``models.create_model(..., norm='an_gn')``.
- a name pattern (``fnmatch``, e.g. ``'layer*.*.bn2'``) or a list of them, matched against module names;
- a predicate ``where(name, module) -> bool``.

**K per stage** (norms with ``per_stage_k``, e.g. AN): ``k=None`` with ``where='paper'``/``'auto'`` derives it as the
paper does: stages are the distinct output shapes of the blocks holding the chosen layers, in order; the first
half (rounded up) gets a base K and the rest twice it, the base being 5 when the chosen convolutions are
depthwise (MobileNet-style) and 10 otherwise: ResNet-50 [10, 10, 20, 20], MobileNetV2 [5, 5, 5, 5, 10, 10, 10],
DenseNet-121 [10, 10, 20, 20]. ``k=int`` gives every layer that K; ``k=[...]`` one K per stage (the stages are
found as above). With other ``where`` values and ``k=None`` the norm's default K applies.

**State carried over** (``affine``): running statistics always go to the new layer's BatchNorm statistics (AN's and
IEBN's standardizer, SN's BN part, a BatchNorm), where the shapes match. With ``affine='copy'`` (default) the
affine follows: ``weight``/``bias`` are copied to norms that have per-channel ones (BN, GN, SN, IEBN); AN's K x C
Gamma and B get the BatchNorm's gamma and beta in every row, divided by the expected total attention
``E[sum_k lam_k]`` (K/2 for ``hsigmoid``/``sigmoid``, whose weights average 1/2 at initialisation; 1 for
``softmax``), so that the converted layer starts, on average over the attention, as the BatchNorm it replaces:
a pretrained model keeps (approximately) its function and fine-tunes from there. ``affine='init'`` keeps the new
layers' own initialisation (AN: Gamma ~ N(1, 0.1^2), B ~ N(0, 0.1^2), the paper's, for training from scratch).

New layers are built on the BatchNorm's device and dtype and take its train/eval mode. Only these BatchNorm kinds
are converted; any other ``_BatchNorm`` subclass (which may carry extra state) and 1-D/3-D BatchNorms are reported
as skipped. Norm layers of this package are never entered (AN's attention BatchNorm stays).
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import activation as _activation
from torch.nn.modules.batchnorm import _BatchNorm

from an.attentive import AttentiveNorm2d
from an.checks import check_choice, check_int, did_you_mean
from an.iebn import IEBatchNorm2d
from an.norm_act import NormAct2d
from an.registry import create_norm, norm_entry
from an.switchable import SwitchableNorm2d

__all__ = ["AFFINE_MODES", "PRESETS", "NormConversion", "Replacement", "convert_norms", "expected_attention_sum"]

PRESETS = ("auto", "all", "paper")
AFFINE_MODES = ("copy", "init")
DEFAULT_INPUT_SIZE = 224  # side of the example image the 'paper' preset runs the model on
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_OURS = (AttentiveNorm2d, IEBatchNorm2d, SwitchableNorm2d)  # never entered: their BatchNorms are theirs
_ACTIVATIONS = tuple(
    cls
    for name, cls in vars(_activation).items()
    if isinstance(cls, type) and issubclass(cls, nn.Module) and name in _activation.__all__
)


@dataclass(frozen=True)
class Replacement:
    """One replaced layer.

    Attributes:
        name: Module name in the model.
        old: Class name of the BatchNorm.
        new: Class name of the new layer (``NormAct2d(...)`` for a timm norm+act layer).
        options: Keywords the new layer was built with (e.g. ``{'k': 20}``).
        stage: Stage index (0-based) when stages were determined, else None.
    """

    name: str
    old: str
    new: str
    options: dict[str, Any] = field(default_factory=dict)
    stage: int | None = None


@dataclass
class NormConversion:
    """What :func:`convert_norms` did.

    Attributes:
        model: The converted model (the given one when converted in place; the new layer when the model itself
            was a BatchNorm).
        norm: The registry name of the norm put in.
        replaced: The replaced layers, in module order.
        kept: BatchNorm layers that were not selected and stay as they were.
        skipped: ``(name, reason)`` of BatchNorm-like layers this function does not convert.
        stages: Output shape (C, H, W) of the blocks of each stage, when stages were determined.
    """

    model: nn.Module
    norm: str
    replaced: list[Replacement] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stages: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """Names of the replaced layers."""
        return [r.name for r in self.replaced]

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        total = len(self.replaced) + len(self.kept) + len(self.skipped)
        if total == 0:
            return f"convert_norms -> '{self.norm}': the model has no BatchNorm layer; nothing was changed."
        kinds = Counter(r.new for r in self.replaced)
        lines = [
            f"convert_norms -> '{self.norm}': replaced {len(self.replaced)} of {total} BatchNorm layers "
            f"({', '.join(f'{n} x {c}' for c, n in kinds.items()) or 'none'}); kept {len(self.kept)}"
            + (f", skipped {len(self.skipped)}" if self.skipped else "")
        ]
        ks = Counter(r.options.get("k") for r in self.replaced if "k" in r.options)
        if ks:
            lines.append("  K: " + ", ".join(f"{k} x {n}" for k, n in sorted(ks.items())))
        if self.stages:
            per = Counter(r.stage for r in self.replaced)
            lines.append(
                "  stages (block output C x H x W: layers): "
                + "; ".join(f"{'x'.join(map(str, s))}: {per[i]}" for i, s in enumerate(self.stages))
            )
        lines += [f"  {r.name}: {r.old} -> {r.new}{_fmt(r.options)}" for r in self.replaced]
        lines += [f"  skipped {n}: {why}" for n, why in self.skipped]
        return "\n".join(lines)


def _fmt(options: dict[str, Any]) -> str:
    return " (" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")" if options else ""


def expected_attention_sum(layer: AttentiveNorm2d) -> float:
    """``E[sum_k lam_k]`` of an AN layer at initialisation: K/2 for hsigmoid/sigmoid (symmetric around a
    standardized logit), 1 for softmax."""
    return 1.0 if layer.attention.mode == "softmax" else layer.k / 2


# ---------------------------------------------------------------------------------------------- what is a BN
def _is_norm_act(m: nn.Module) -> bool:
    """timm's BatchNormAct2d / SyncBatchNormAct (a BatchNorm with ``act`` and ``drop`` children)."""
    return type(m).__module__.startswith("timm.") and "act" in m._modules and "drop" in m._modules


def _kind(m: nn.Module) -> str | None:
    """'bn' for a convertible BatchNorm, a reason string for a BatchNorm-like layer we leave, None otherwise."""
    if not isinstance(m, _BatchNorm):
        return None
    kind = type(m)
    if kind in (nn.BatchNorm2d, nn.SyncBatchNorm) or _is_norm_act(m):
        return "bn"
    if kind in (nn.BatchNorm1d, nn.BatchNorm3d):
        return f"{kind.__name__} is not 2-D"
    return f"{kind.__name__} is a BatchNorm subclass that may hold more state; select and replace it yourself"


def _candidates(model: nn.Module) -> tuple[dict[int, list[str]], dict[int, nn.Module], list[tuple[str, str]]]:
    """BatchNorm layers (id -> all their names, id -> module), and the skipped ones, not entering our layers."""
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    skipped: list[tuple[str, str]] = []
    inside: list[str] = []  # prefixes of our own norm layers
    for name, m in model.named_modules(remove_duplicate=False):
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(m, _OURS):
            inside.append(f"{name}." if name else "")
            continue
        kind = _kind(m)
        if kind == "bn":
            names.setdefault(id(m), []).append(name)
            modules[id(m)] = m
        elif kind is not None and name not in {n for n, _ in skipped}:
            skipped.append((name, kind))
    return names, modules, skipped


# ---------------------------------------------------------------------------------------------- the paper's rule
@dataclass
class _Structure:
    """What one example forward pass tells about the model."""

    chosen: list[int]  # ids of the BatchNorms of 3x3/depthwise convolutions inside blocks, in execution order
    stage_of: dict[int, int]  # BatchNorm id -> stage index (for every BatchNorm inside a block)
    stages: list[tuple[int, ...]]
    depthwise: bool  # most chosen convolutions are depthwise


def _first_conv_channels(model: nn.Module) -> int:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(
            "convert_norms: the 'paper' rule runs the model once and needs example_input=... (the model has no "
            "Conv2d to take the input channels from)"
        )
    return conv.in_channels


def _example(model: nn.Module, example_input: Any) -> tuple:
    if example_input is not None:
        return example_input if isinstance(example_input, tuple) else (example_input,)
    ref = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    c = _first_conv_channels(model)
    return (torch.randn(1, c, DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE, device=device, dtype=dtype),)


def _block_of(name: str, blocks: set[str]) -> str | None:
    """The nearest enclosing block of module ``name`` (a strict ancestor)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in blocks:
            return prefix
    return None


def _is_3x3_or_depthwise(conv: nn.Conv2d) -> bool:
    return tuple(conv.kernel_size) == (3, 3) or (conv.groups > 1 and conv.groups == conv.in_channels)


@torch.no_grad()
def _structure(model: nn.Module, bn_names: dict[int, list[str]], example_input: Any) -> _Structure:
    """Runs the model once (eval mode, hooks) and applies the paper's rule; the model's state is untouched."""
    named = dict(model.named_modules())
    blocks = {n for n, m in named.items() if n and not isinstance(m, _CONTAINERS)}
    convs = {id(m): n for n, m in named.items() if isinstance(m, nn.Conv2d)}
    bn_name = {i: ns[0] for i, ns in bn_names.items()}
    conv_out: dict[int, str] = {}  # id(tensor) -> conv that produced it
    conv_in: dict[str, int] = {}  # conv -> id(its input)
    first_conv: list[str] = []
    bn_in: dict[int, int] = {}  # bn id -> id(its input)
    bn_out: dict[int, int] = {}  # id(tensor) -> bn id (its output, or an activation of it)
    block_shape: dict[str, tuple[int, ...]] = {}
    order: list[int] = []  # bn ids in execution order
    keep: list[Tensor] = []  # every tensor whose id is recorded stays alive, so no id is reused during the pass

    def conv_hook(m, args, out):
        name = convs[id(m)]
        if not first_conv:
            first_conv.append(name)
        if args and isinstance(args[0], Tensor):
            conv_in.setdefault(name, id(args[0]))
            keep.append(args[0])
        if isinstance(out, Tensor):
            conv_out[id(out)] = name
            keep.append(out)

    def bn_hook(m, args, out):
        if id(m) not in bn_in and args and isinstance(args[0], Tensor):
            bn_in[id(m)] = id(args[0])
            order.append(id(m))
            keep.append(args[0])
        if isinstance(out, Tensor):
            bn_out[id(out)] = id(m)
            keep.append(out)

    def act_hook(m, args, out):
        if args and isinstance(args[0], Tensor) and id(args[0]) in bn_out and isinstance(out, Tensor):
            bn_out[id(out)] = bn_out[id(args[0])]
            keep.append(out)

    def block_hook(name):
        def hook(m, args, out):
            if isinstance(out, Tensor) and out.dim() == 4 and name not in block_shape:
                block_shape[name] = tuple(out.shape[1:])

        return hook

    handles = []
    for n, m in named.items():
        if id(m) in convs:
            handles.append(m.register_forward_hook(conv_hook))
        elif id(m) in bn_name:
            handles.append(m.register_forward_hook(bn_hook))
        elif isinstance(m, _ACTIVATIONS):
            handles.append(m.register_forward_hook(act_hook))
        if n in blocks:
            handles.append(m.register_forward_hook(block_hook(n)))
    modes = {n: m.training for n, m in named.items()}
    try:
        model.eval()
        model(*_example(model, example_input))
    except Exception as e:
        raise RuntimeError(
            f"convert_norms: the 'paper' rule runs the model once on example_input and that failed ({e}); pass "
            "example_input=... (a tensor or a tuple of forward arguments), or choose the layers with where=patterns"
        ) from e
    finally:
        for h in handles:
            h.remove()
        for n, m in named.items():
            m.training = modes[n]
    # The norm of each 3x3/depthwise conv inside a block: the BN after it, else (pre-activation) the one before it.
    after = {conv_out[t]: b for b, t in bn_in.items() if t in conv_out}
    chosen: dict[int, nn.Conv2d] = {}
    for conv_name, in_id in conv_in.items():
        conv = named[conv_name]
        if conv_name == first_conv[0] or not _is_3x3_or_depthwise(conv) or _block_of(conv_name, blocks) is None:
            continue
        bn = after.get(conv_name, bn_out.get(in_id))
        if bn is not None and _block_of(bn_name[bn], blocks) is not None:
            chosen[bn] = conv
    # Stages: distinct output shapes of the blocks holding BatchNorms, in execution order.
    stages: list[tuple[int, ...]] = []
    stage_of: dict[int, int] = {}
    for b in order:
        block = _block_of(bn_name[b], blocks)
        shape = block_shape.get(block) if block is not None else None
        if shape is None:
            continue
        if shape not in stages:
            stages.append(shape)
        stage_of[b] = stages.index(shape)
    chosen_order = [b for b in order if b in chosen]
    used = sorted({stage_of[b] for b in chosen_order if b in stage_of})
    stages_used = [stages[i] for i in used]
    stage_of = {b: used.index(s) for b, s in stage_of.items() if s in used}
    dw = sum(c.groups > 1 for c in chosen.values())
    return _Structure(chosen_order, stage_of, stages_used, depthwise=dw * 2 > len(chosen))


def derived_k(num_stages: int, depthwise: bool) -> list[int]:
    """The paper's K per stage: base K (5 for depthwise blocks, 10 otherwise) for the first half of the stages
    (rounded up), twice that for the rest."""
    base = 5 if depthwise else 10
    first = math.ceil(num_stages / 2)
    return [base] * first + [2 * base] * (num_stages - first)


# ---------------------------------------------------------------------------------------------- state
def _ref_tensor(bn: nn.Module) -> Tensor | None:
    return next((t for t in (bn.weight, bn.running_mean) if t is not None), None)


@torch.no_grad()
def _carry_over(bn: _BatchNorm, layer: nn.Module, affine: str) -> None:
    """Copies ``bn``'s running statistics and (``affine='copy'``) its affine into the new ``layer``."""
    c = bn.num_features
    stats_owner = next(
        (m for m in (layer, getattr(layer, "norm", None)) if isinstance(getattr(m, "running_mean", None), Tensor)),
        None,
    )
    if stats_owner is not None and bn.running_mean is not None and stats_owner.running_mean.shape == (c,):
        stats_owner.running_mean.copy_(bn.running_mean)
        stats_owner.running_var.copy_(bn.running_var)
        if isinstance(getattr(stats_owner, "num_batches_tracked", None), Tensor) and bn.num_batches_tracked is not None:
            stats_owner.num_batches_tracked.copy_(bn.num_batches_tracked)
    if affine != "copy":
        return
    gamma = bn.weight if bn.affine else torch.ones(c, device=bn.running_mean.device)
    beta = bn.bias if bn.affine else torch.zeros(c, device=bn.running_mean.device)
    if isinstance(layer, AttentiveNorm2d):
        scale = 1.0 / expected_attention_sum(layer)
        layer.mixture_weight.copy_((gamma * scale).expand_as(layer.mixture_weight))
        layer.mixture_bias.copy_((beta * scale).expand_as(layer.mixture_bias))
        return
    w, b = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if isinstance(w, Tensor) and w.shape == (c,):
        w.copy_(gamma)
    if isinstance(b, Tensor) and b.shape == (c,):
        b.copy_(beta)


def _fit_groups(norm: str, channels: int, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``groups`` (for norms that take it) lowered to the largest divisor of ``channels`` not above
    it, as the backbones do for widths the group count does not divide (MobileNet's 144 channels with 32 groups)."""
    groups = options.get("groups", norm_entry(norm).options.get("groups"))
    if not isinstance(groups, int) or channels % groups == 0:
        return options
    return {**options, "groups": next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0)}


def _build(norm: str, bn: _BatchNorm, options: dict[str, Any], affine: str) -> nn.Module:
    ref = _ref_tensor(bn)
    dd = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    layer = create_norm(norm, bn.num_features, **dd, **options)
    if not (ref is not None and ref.is_meta):
        _carry_over(bn, layer, affine)
    layer.train(bn.training)
    if _is_norm_act(bn):
        return NormAct2d(layer, act=bn.act, drop=bn.drop).train(bn.training)
    return layer


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = new


# ---------------------------------------------------------------------------------------------- selection
Where = str | Sequence[str] | Callable[[str, nn.Module], bool]


def _select(where: Where, names: dict[int, list[str]], modules: dict[int, nn.Module]) -> set[int]:
    if callable(where):
        return {i for i, ns in names.items() if any(bool(where(n, modules[i])) for n in ns)}
    patterns = [where] if isinstance(where, str) else list(where)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"convert_norms: 'where' must be a preset ({', '.join(PRESETS)}), a name pattern, a list of them or a "
            f"predicate, got {where!r}"
        )
    chosen = {i for i, ns in names.items() if any(fnmatch.fnmatchcase(n, p) for n in ns for p in patterns)}
    if names and not chosen:
        listed = ", ".join(ns[0] for ns in list(names.values())[:6])
        hint = did_you_mean(where, PRESETS) if isinstance(where, str) else ""
        raise ValueError(
            f"convert_norms: where={where!r} matches none of the model's {len(names)} BatchNorm layers "
            f"(e.g. {listed}); patterns are fnmatch patterns over module names, e.g. 'layer*.*.bn2'.{hint}"
        )
    return chosen


def _k_options(
    k: int | Sequence[int] | None, chosen: list[int], structure: _Structure | None, preset: bool, label: dict[int, str]
) -> dict[int, dict[str, Any]]:
    """The ``k`` option of each chosen layer (per-stage norms)."""
    if k is None and not preset:
        return {i: {} for i in chosen}
    if isinstance(k, int) and not isinstance(k, bool):
        check_int("convert_norms", "k", k)
        return {i: {"k": k} for i in chosen}
    assert structure is not None
    outside = [label[i] for i in chosen if i not in structure.stage_of]
    if outside:
        raise ValueError(
            f"convert_norms: K per stage needs each chosen layer inside a block; {', '.join(outside[:5])} "
            "are not: pass an integer k=..."
        )
    num = len(structure.stages)
    if k is None:
        ks = derived_k(num, structure.depthwise)
    else:
        if isinstance(k, (str, bytes)) or not isinstance(k, Sequence) or len(k) != num:
            shapes = ", ".join("x".join(map(str, s)) for s in structure.stages)
            raise ValueError(
                f"convert_norms: k must be an integer or a list of {num} integers (one per stage; the stages' block "
                f"outputs are {shapes}), got {k!r}"
            )
        ks = [check_int("convert_norms", "k", v) for v in k]
    return {i: {"k": ks[structure.stage_of[i]]} for i in chosen}


# ---------------------------------------------------------------------------------------------- entry point
def convert_norms(
    model: nn.Module,
    norm: str = "an",
    where: Where = "auto",
    *,
    k: int | Sequence[int] | None = None,
    inplace: bool = True,
    affine: str = "copy",
    example_input: Tensor | tuple | None = None,
    **kwargs: Any,
) -> NormConversion:
    """Replaces BatchNorm layers of ``model`` by layers of a registered norm (see the module docstring).

    Args:
        model: Any ``nn.Module`` (a whole model or a single BatchNorm).
        norm: A registered norm name (``an.list_norms()``).
        where: ``'auto'``, ``'all'``, ``'paper'``, an fnmatch name pattern or list of them, or a predicate
            ``where(name, module) -> bool``.
        k: K for norms with per-stage K (AN): None (derived per stage for the paper rule, else the norm's default),
            an integer, or one integer per stage.
        inplace: Convert ``model`` itself (True) or a deep copy (False; the copy is ``result.model``).
        affine: ``'copy'`` (the BatchNorm's affine carried over) or ``'init'`` (the new layers' own init).
        example_input: Forward arguments for the paper rule's analysis pass (a tensor or a tuple).
        **kwargs: Options of the norm (e.g. ``attention='softmax'``, ``impl='fused'``, ``groups=16``).

    Returns:
        A :class:`NormConversion`: ``result.model`` is the converted model, ``print(result)`` lists every change.
        A model without BatchNorm is returned unchanged, with a warning.

    Raises:
        ValueError: Unknown norm, a bad ``where``/``k``/option value, or a pattern matching no BatchNorm.
        TypeError: An option the norm does not accept.

    Example:
        >>> model = torchvision.models.resnet50()
        >>> report = an.convert_norms(model, "an")  # the 16 bn2 become AN, K = 10, 10, 20, 20 per stage
    """
    entry = norm_entry(norm)
    affine = check_choice("convert_norms", "affine", affine, AFFINE_MODES)
    options = dict(kwargs)
    if entry.per_stage_k and "k" in options:
        raise TypeError("convert_norms: pass k=... as its own argument")
    entry.check_keywords({**options, **({"k": k} if k is not None and not entry.per_stage_k else {})})
    if k is not None and not entry.per_stage_k:
        options["k"] = k
    if isinstance(where, str) and where in PRESETS:
        preset = "paper" if where == "auto" and entry.plain is not None else ("all" if where == "auto" else where)
    else:
        preset = None
    if not inplace:
        model = copy.deepcopy(model)
    names, modules, skipped = _candidates(model)
    result = NormConversion(model, entry.name, skipped=skipped)
    if not names:
        warnings.warn(f"convert_norms: {type(model).__name__} has no BatchNorm layer; nothing changed", stacklevel=2)
        return result
    label = {i: ns[0] for i, ns in names.items()}
    structure = None
    if preset == "paper" or (entry.per_stage_k and k is not None and not isinstance(k, int)):
        structure = _structure(model, names, example_input)
        result.stages = structure.stages
    if preset == "paper":
        chosen = structure.chosen
        if not chosen:
            warnings.warn(
                "convert_norms: the 'paper' rule found no BatchNorm of a 3x3 or depthwise convolution inside a block; "
                "nothing was replaced (choose the layers with where=patterns)",
                stacklevel=2,
            )
    elif preset == "all":
        chosen = list(names)
    else:
        chosen = [i for i in names if i in _select(where, names, modules)]
    per_layer = (
        _k_options(k, chosen, structure, preset == "paper", label) if entry.per_stage_k else {i: {} for i in chosen}
    )
    plan: dict[int, tuple[str, dict[str, Any]]] = {i: (entry.name, {**options, **per_layer[i]}) for i in chosen}
    if preset == "paper" and where == "auto" and entry.plain not in (None, "bn"):
        plain = norm_entry(entry.plain)
        for i in names:
            if i not in plan:
                plan[i] = (plain.name, plain.accepted(options))
    stage_of = structure.stage_of if structure is not None else {}
    for i, ns in names.items():
        if i not in plan:
            result.kept.append(ns[0])
            continue
        old = modules[i]
        name, opts = plan[i][0], _fit_groups(plan[i][0], old.num_features, plan[i][1])
        new = _build(name, old, opts, affine)
        for n in ns:
            if n:
                _set(model, n, new)
            else:
                result.model = new
        shown = f"NormAct2d({type(new.norm).__name__})" if isinstance(new, NormAct2d) else type(new).__name__
        result.replaced.append(Replacement(ns[0], type(old).__name__, shown, opts, stage_of.get(i)))
    return result
