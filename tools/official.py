"""Checkpoints of the AN authors' released ImageNet models (the AOGNet-v2 code) as checkpoints of ours.

An official run folder holds ``config.yaml`` (the experiment's yacs config) and ``model_best.pth.tar``: a
``torch.save`` of ``{epoch, arch, state_dict, best_prec1, optimizer}`` whose ``state_dict`` keys carry the
prefix ``module.network.`` and whose weights are mostly float16. :func:`convert` turns such a file into a
checkpoint of this framework (``{"model": state_dict, "config": resolved config, ...}``) that ``eval.py``
evaluates directly and that ``train.init_from`` starts a run from. docs/AN.md 7 describes the format and the
mapping; ``tools/convert_checkpoint.py`` is the command line.

The conversion is strict: every official key is mapped to exactly one key of ours and every key of ours is
filled exactly once, with equal shapes, or it stops with a :class:`ConversionError` that lists what is
missing or left over and names the model it assumed and the model the file's keys look like. Files are read
with ``torch.load(weights_only=True)``; a file holding other pickled objects (the official optimizer state
holds apex's loss scaler) is refused unless the caller passes ``trust_pickle=True``. All floating-point
tensors are written in float32.

Name mapping (official -> ours):

- AN layers (official ``MixtureBatchNorm2d``, recognised by their ``weight_``): ``weight_``/``bias_`` ->
  ``mixture_weight``/``mixture_bias``; ``running_mean``/``running_var``/``num_batches_tracked`` -> the
  standardizer's ``norm.*``; ``attention_weights.attention.0.weight`` -> ``attention.conv.weight``;
  ``attention_weights.attention.1.*`` -> ``attention.bn.*``.
- ResNet and MobileNetV2: torchvision's names on both sides; only the AN layers are renamed.
- AOGNet: ``stem.{i}.conv_norm.conv_norm.{j}`` -> ``stem.{3i+j}``;
  ``stage{s}.stage_{s}_block_0_transition.0.conv_norm.conv_norm.{j}`` -> ``stage{s+1}.transition.{j}``;
  ``stage{s}.stage_{s}_block_{b}.extra_norm_ac.0`` -> ``stage{s+1}.block{b+1}.norm``; node op
  ``..._node_{id}_op`` -> ``stage{s+1}.block{b+1}.nodes.{key}`` where ``key`` names the grammar node with that
  id (our node ids follow the official creation order), with ``conv_norm_ac_1``/``conv_norm_ac_2``/
  ``conv_norm_3`` -> ``conv1``+``bn1``/``conv2``+``bn2``/``conv3``+``bn3`` and ``shortcut.conv_norm`` ->
  ``shortcut``.
"""

from __future__ import annotations

import pickle
import re
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from engine import checkpoint as ck
from engine.config import (
    SECTIONS,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    resolve_config_path,
    validate_model,
)
from engine.errors import UserError

__all__ = [
    "FORMATS",
    "OFFICIAL_PREFIX",
    "ConversionError",
    "config_from_official",
    "convert",
    "convert_state",
    "guess_model",
    "is_official_config",
    "load_official",
]

FORMATS = ("aognet-v2",)
OFFICIAL_PREFIX = "module.network."  # DDP around apex's FP16Model
CHECKPOINT_NAMES = ("model_best.pth.tar", "checkpoint.pth.tar")
CONFIG_NAME = "config.yaml"

# Official config defaults for the keys read here (the code's yacs defaults; a copied config file states only
# what it changes).
_DEFAULTS: dict[str, Any] = {
    "arch": "aognet",
    "dataset": "cifar10",
    "num_classes": 10,
    "crop_size": 224,
    "crop_interpolation": 2,
    "activation_mode": 0,
    "norm_name": "BatchNorm2d",
    "norm_k": [0],
    "norm_attention_mode": 0,
    "norm_zero_gamma_init": False,
    "norm_all_mix": False,
    "num_epoch": 300,
    "stem.imagenet_head7x7": False,
    "stem.replace_maxpool_with_res_bottleneck": False,
    "stem.stem_kernel_size": 7,
    "stem.stem_stride": 2,
    "resnet.base_inplanes": 16,
    "resnet.replace_stride_with_dilation": [False, False, False],
    "resnet.replace_stride_with_avgpool": False,
    "resnet.extra_norm_ac": False,
    "aognet.filter_list": [16, 64, 128, 256],
    "aognet.out_channels": [0, 0],
    "aognet.blocks": [1, 1, 1],
    "aognet.dims": [4, 4, 4],
    "aognet.max_split": [2, 2, 2],
    "aognet.extra_node_hierarchy": [0, 0, 0],
    "aognet.remove_symmetric_children_of_or_node": [0, 0, 0],
    "aognet.terminal_node_no_slice": [0, 0, 0],
    "aognet.stride": [1, 2, 2],
    "aognet.drop_rate": [0.0, 0.0, 0.0],
    "aognet.bottleneck_ratio": 0.25,
    "aognet.handle_dbl_cnt": True,
    "aognet.handle_tnode_dbl_cnt": False,
    "aognet.use_group_conv": False,
    "aognet.when_downsample": 0,
    "aognet.use_elem_max_for_ORNodes": False,
}

_NORMS = {"BatchNorm2d": "bn", "MixtureBatchNorm2d": "an"}
_ATTENTION_MODES = {2: "hsigmoid", 5: "sigmoid", 6: "softmax"}  # conv (no bias) -> BN over K -> activation
_INTERPOLATION = {2: "bilinear", 3: "bicubic"}

# The AOGNet configurations of ours and the official settings they correspond to (docs/AN.md 3.1).
_AOGNETS = {
    "aognet12m": {"aognet.filter_list": [32, 128, 256, 512, 824], "aognet.blocks": [2, 2, 2, 1]},
    "aognet40m": {"aognet.filter_list": [56, 224, 448, 896, 1400], "aognet.blocks": [2, 2, 3, 1]},
}
_AOGNET_FIXED = {
    "aognet.dims": [2, 2, 4, 4],
    "aognet.max_split": [2, 2, 2, 2],
    "aognet.extra_node_hierarchy": [4, 4, 4, 4],
    "aognet.remove_symmetric_children_of_or_node": [1, 2, 1, 2],
    "aognet.terminal_node_no_slice": [0, 0, 0, 0],
    "aognet.stride": [1, 2, 2, 2],
    "aognet.when_downsample": 1,
    "aognet.out_channels": [0, 0],
    "aognet.bottleneck_ratio": 0.25,
    "aognet.handle_dbl_cnt": True,
    "aognet.handle_tnode_dbl_cnt": False,
    "aognet.use_group_conv": False,
    "aognet.use_elem_max_for_ORNodes": False,
    "stem.imagenet_head7x7": False,
    "stem.replace_maxpool_with_res_bottleneck": False,
}
_AOGNET_DROP = [0.0, 0.0, 0.1, 0.1]
_RESNET_FIXED = {
    "resnet.base_inplanes": 64,
    "resnet.replace_stride_with_dilation": [False, False, False],
    "resnet.extra_norm_ac": False,
    "stem.replace_maxpool_with_res_bottleneck": False,
}


class ConversionError(UserError, ValueError):
    """A file or config that cannot be converted; the message names the file and what to do."""


# ----------------------------------------------------------------------------------------------------
# Reading the official files.
# ----------------------------------------------------------------------------------------------------


class _Placeholder:
    """Stands in for a class the file names but this environment lacks (e.g. apex's loss scaler)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Placeholder,), {"__module__": module})


_LENIENT_PICKLE = types.ModuleType("lenient_pickle")
_LENIENT_PICKLE.Unpickler = _LenientUnpickler  # type: ignore[attr-defined]
_LENIENT_PICKLE.load = lambda f, **kw: _LenientUnpickler(f, **kw).load()  # type: ignore[attr-defined]


def load_official(path: str | Path, trust_pickle: bool = False) -> dict[str, Any]:
    """Loads an official ``.pth.tar`` on the CPU: ``weights_only=True`` unless ``trust_pickle``.

    With ``trust_pickle`` the file is fully unpickled (this can run code stored in it: only for files from a
    source you trust); classes missing here (apex's) are replaced by inert placeholders, since only the
    tensors are kept.

    Raises:
        ConversionError: Missing, empty, truncated or refused files, files of ours, and files without a
            ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} does not exist or is not a file.")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path} is empty (0 bytes), probably an interrupted download; download it again.")
    reason = ck.not_a_checkpoint(path)  # checked before any unpickling, --trust-pickle or not
    if reason is not None:
        raise ConversionError(
            f"{path} is {reason}. Pass the official model_best.pth.tar (or the folder holding it and config.yaml)."
        )
    try:
        if trust_pickle:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_LENIENT_PICKLE)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        text = str(e)
        refused = ck.refused_global(e)
        if not trust_pickle and refused is not None:
            what = f" (e.g. {refused})"
            raise ConversionError(
                f"{path} holds pickled Python objects besides tensors{what}; the official files keep apex's "
                f"optimizer state in them. They are refused by default because unpickling them can run code "
                f"stored in the file. If you trust the file (e.g. downloaded from the authors' release), run the "
                f"conversion again with --trust-pickle: only its weights are kept."
            ) from None
        first = text.splitlines()[0] if text else type(e).__name__
        raise ConversionError(
            f"{path} is truncated or corrupt and cannot be read ({type(e).__name__}: {first}); download or unzip "
            f"it again."
        ) from None
    if isinstance(obj, dict) and "model" in obj and "state_dict" not in obj:
        raise ConversionError(
            f"{path} is already a checkpoint of this framework (it has a 'model' entry, not the official "
            f"'state_dict'): use it directly, e.g. python eval.py --checkpoint {path}, or train.init_from={path}."
        )
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ConversionError(
            f"{path} is not an official AOGNet-v2 checkpoint (expected a dict with 'state_dict', 'epoch', "
            f"'best_prec1'; found {keys})."
        )
    return obj


def strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """The state dict without the ``module.network.`` prefix (also accepted: ``module.`` or no prefix)."""
    for prefix in (OFFICIAL_PREFIX, "module."):
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def is_official_config(data: Any) -> bool:
    """Whether a parsed YAML file is an official (flat yacs) config rather than one of ours (sections)."""
    return isinstance(data, dict) and bool(data) and not set(data) <= set(SECTIONS)


def _get(off: dict[str, Any], dotted: str) -> Any:
    node: Any = off
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _DEFAULTS[dotted]
        node = node[part]
    return node


def _require(off: dict[str, Any], settings: dict[str, Any], model: str, source: str) -> None:
    for key, want in settings.items():
        got = _get(off, key)
        if isinstance(want, list) and isinstance(got, (list, tuple)):
            same = list(got) == want
        else:
            same = got == want
        if not same:
            raise ConversionError(
                f"{source}: '{key}' is {got!r}, but {model} of this framework is built with {want!r}; that "
                f"official model has no counterpart here. Pass --config with a config of ours that describes "
                f"the architecture, if one does."
            )


def config_from_official(off: dict[str, Any], source: str = "the official config") -> Config:
    """The Config of ours for an official config: model, norm, options, classes and evaluation settings.

    The rest (optimizer, schedule, training data settings) comes from our recipe config for the same row
    (``configs/<model>_<norm>[_200e].yaml``) when there is one, else from the defaults.
    """
    if _get(off, "dataset") != "imagenet":
        raise ConversionError(f"{source}: dataset is {_get(off, 'dataset')!r}; only ImageNet models convert.")
    arch = str(_get(off, "arch"))
    norm_name = _get(off, "norm_name")
    if norm_name not in _NORMS:
        raise ConversionError(
            f"{source}: norm_name {norm_name!r} has no counterpart here (convertible: {', '.join(_NORMS)})."
        )
    norm = _NORMS[norm_name]
    if _get(off, "norm_all_mix"):
        raise ConversionError(f"{source}: norm_all_mix (AN in place of every norm) is not supported by the converter.")
    if _get(off, "activation_mode") != 0:
        raise ConversionError(f"{source}: activation_mode {_get(off, 'activation_mode')} (not ReLU) is not supported.")

    model: dict[str, Any] = {"norm": norm, "num_classes": int(_get(off, "num_classes"))}
    if arch.startswith("resnet"):
        name = arch
        _require(off, _RESNET_FIXED, name, source)
        head7x7 = bool(_get(off, "stem.imagenet_head7x7"))
        if head7x7:
            _require(off, {"stem.stem_kernel_size": 7, "stem.stem_stride": 2}, name, source)
        model.update(
            deep_stem=not head7x7,
            avg_down=bool(_get(off, "resnet.replace_stride_with_avgpool")),
            zero_init_last=bool(_get(off, "norm_zero_gamma_init")),
        )
    elif arch == "mobilenet_v2":
        name = "mobilenetv2"
    elif arch.startswith("aognet"):
        filters = list(_get(off, "aognet.filter_list"))
        matches = [n for n, s in _AOGNETS.items() if s["aognet.filter_list"] == filters]
        if not matches:
            raise ConversionError(
                f"{source}: aognet.filter_list {filters} is neither AOGNet-12M {_AOGNETS['aognet12m']} nor "
                f"AOGNet-40M {_AOGNETS['aognet40m']}; only those two convert."
            )
        name = matches[0]
        _require(off, {**_AOGNETS[name], **_AOGNET_FIXED}, name, source)
        model["zero_init_last"] = bool(_get(off, "norm_zero_gamma_init"))
        drop = [float(d) for d in _get(off, "aognet.drop_rate")]
        if drop != _AOGNET_DROP:
            model["drop_rate"] = drop
    else:
        raise ConversionError(f"{source}: arch {arch!r} has no counterpart here (resnet*, mobilenet_v2, aognet).")
    model["name"] = name
    if norm == "an":
        mode = _get(off, "norm_attention_mode")
        if mode not in _ATTENTION_MODES:
            raise ConversionError(
                f"{source}: norm_attention_mode {mode} has no counterpart here (convertible: 2 = the paper's "
                f"hard-sigmoid, 5 = sigmoid, 6 = softmax)."
            )
        model["norm_kwargs"] = {"attention": _ATTENTION_MODES[mode]}
        model["norm_k"] = [int(k) for k in _get(off, "norm_k")]

    crop = int(_get(off, "crop_size"))
    interpolation = _get(off, "crop_interpolation")
    if interpolation not in _INTERPOLATION:
        raise ConversionError(f"{source}: crop_interpolation {interpolation} is not 2 (bilinear) or 3 (bicubic).")
    data = {"img_size": crop, "crop_pct": crop / (crop + 32), "interpolation": _INTERPOLATION[interpolation]}

    recipe = f"{name}_{norm}" + ("_200e" if int(_get(off, "num_epoch")) >= 200 else "")
    return _recipe_config(recipe, model, data, source)


def _recipe_config(recipe: str, model: dict[str, Any], data: dict[str, Any], source: str) -> Config:
    try:
        base = load_config(recipe).to_dict()
    except ConfigError:
        base = Config().to_dict()
    base["train"]["output_dir"] = ""
    base["model"] = {**Config().to_dict()["model"], **model}  # the recipe's own model options are replaced
    base["data"].update(data)
    try:
        cfg = config_from_dict(base, source=f"the config converted from {source}")
        validate_model(cfg, source)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    return cfg


# ----------------------------------------------------------------------------------------------------
# Guessing the model from the keys (for error messages and for bare files).
# ----------------------------------------------------------------------------------------------------


def guess_model(state: dict[str, Any]) -> dict[str, Any] | None:
    """What the (prefix-free) official keys look like: model, norm, num_classes and options, or None."""
    keys = set(state)
    norm = "an" if any(k.endswith(".weight_") for k in keys) else "bn"
    guess: dict[str, Any] = {"norm": norm}
    if "fc.weight" in keys and any(k.startswith("stem.0.conv_norm") for k in keys):
        width = state["fc.weight"].shape[1]
        guess["name"] = {824: "aognet12m", 1400: "aognet40m"}.get(width, f"an AOGNet with {width} output channels")
        guess["num_classes"] = state["fc.weight"].shape[0]
    elif "classifier.1.weight" in keys and any(k.startswith("features.") for k in keys):
        guess["name"] = "mobilenetv2"
        guess["num_classes"] = state["classifier.1.weight"].shape[0]
    elif "fc.weight" in keys and any(k.startswith("layer1.0.") for k in keys):
        blocks = [len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
        bottleneck = any(k.startswith("layer1.0.conv3.") for k in keys)
        depth = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}.get(tuple(blocks)) if bottleneck else None
        if depth is None and not bottleneck:
            depth = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}.get(tuple(blocks))
        guess["name"] = f"resnet{depth}" if depth else f"a ResNet with blocks {blocks}"
        guess["num_classes"] = state["fc.weight"].shape[0]
        guess["deep_stem"] = "conv1.0.weight" in keys
        guess["avg_down"] = any(re.match(r"layer\d\.0\.downsample\.2\.", k) for k in keys)
    else:
        return None
    return guess


def describe_guess(guess: dict[str, Any] | None) -> str:
    if guess is None:
        return "The file's keys match none of the official model families (ResNet, MobileNetV2, AOGNet)"
    flags = [f"--model {guess['name']}", f"--norm {guess['norm']}"]
    if guess.get("num_classes") not in (None, 1000):
        flags.append(f"--set model.num_classes={guess['num_classes']}")
    for option in ("deep_stem", "avg_down"):
        if guess.get(option):
            flags.append(f"--set model.{option}=true")
    return f"The file's keys look like {guess['name']} with norm {guess['norm']} ({' '.join(flags)})"


# ----------------------------------------------------------------------------------------------------
# Key mapping.
# ----------------------------------------------------------------------------------------------------

_AN_RENAMES = {
    "weight_": "mixture_weight",
    "bias_": "mixture_bias",
    "running_mean": "norm.running_mean",
    "running_var": "norm.running_var",
    "num_batches_tracked": "norm.num_batches_tracked",
    "attention_weights.attention.0.weight": "attention.conv.weight",
}
_AN_BN = "attention_weights.attention.1."

_NODE_PARTS = {
    "conv_norm_ac_1.conv_norm.conv_norm.0": "conv1",
    "conv_norm_ac_1.conv_norm.conv_norm.1": "bn1",
    "conv_norm_ac_2.conv_norm.conv_norm.0": "conv2",
    "conv_norm_ac_2.conv_norm.conv_norm.1": "bn2",
    "conv_norm_3.conv_norm.0": "conv3",
    "conv_norm_3.conv_norm.1": "bn3",
    "shortcut.conv_norm.0": "shortcut.0",
    "shortcut.conv_norm.1": "shortcut.1",
}
_STEM = re.compile(r"^stem\.(\d+)\.conv_norm\.conv_norm\.(\d+)\.(.+)$")
_TRANSITION = re.compile(r"^stage(\d+)\.stage_\1_block_0_transition\.0\.conv_norm\.conv_norm\.(\d+)\.(.+)$")
_BLOCK_NORM = re.compile(r"^stage(\d+)\.stage_\1_block_(\d+)\.extra_norm_ac\.0\.(.+)$")
_NODE = re.compile(r"^stage(\d+)\.stage_\1_block_(\d+)\.stage_\1_block_\2_node_(\d+)_op\.(.+)$")


def _rename_an(key: str, an_layers: set[str]) -> str:
    """Renames the suffix of a key inside an official AN layer (``an_layers``: their module paths)."""
    for suffix, ours in _AN_RENAMES.items():
        layer = key[: -len(suffix) - 1]
        if key.endswith("." + suffix) and layer in an_layers:
            return f"{layer}.{ours}"
    if _AN_BN in key:
        layer, rest = key.split("." + _AN_BN, 1)
        if layer in an_layers:
            return f"{layer}.attention.bn.{rest}"
    return key


def _aognet_module_path(key: str, model: torch.nn.Module) -> str | None:
    """Our name for an official AOGNet key (before the AN renaming), or None if no rule applies."""
    if m := _STEM.match(key):
        return f"stem.{3 * int(m[1]) + int(m[2])}.{m[3]}"
    if m := _TRANSITION.match(key):
        return f"stage{int(m[1]) + 1}.transition.{m[2]}.{m[3]}"
    if m := _BLOCK_NORM.match(key):
        return f"stage{int(m[1]) + 1}.block{int(m[2]) + 1}.norm.{m[3]}"
    if m := _NODE.match(key):
        block_path = f"stage{int(m[1]) + 1}.block{int(m[2]) + 1}"
        try:
            block = model.get_submodule(block_path)
        except AttributeError:
            return None
        node_id, rest = int(m[3]), m[4]
        if node_id >= len(block.aog.nodes):
            return None
        for official, ours in _NODE_PARTS.items():
            if rest.startswith(official + "."):
                return f"{block_path}.nodes.{block.aog.nodes[node_id].key}.{ours}.{rest[len(official) + 1 :]}"
        return None
    if key.startswith("fc."):
        return key
    return None


def convert_state(state: dict[str, Any], model: torch.nn.Module, what: str, source: str) -> dict[str, torch.Tensor]:
    """Maps a prefix-free official state dict onto ``model``'s keys (strict; float tensors as float32).

    Args:
        state: Official keys (without ``module.network.``) -> tensors.
        model: A model of ours (may live on the meta device): its ``state_dict`` gives the keys, shapes, dtypes.
        what: How the model was chosen, for errors (e.g. ``"resnet50 (norm an) from config.yaml"``).
        source: The official file, for errors.

    Raises:
        ConversionError: Unmapped or doubly mapped official keys, unfilled keys of ours, other shapes.
    """
    ours = model.state_dict()
    aognet = hasattr(model, "config") and hasattr(model.config, "filter_list")
    pre = {k: (_aognet_module_path(k, model) if aognet else k) for k in state}
    an_layers = {p[: -len(".weight_")] for p in pre.values() if p is not None and p.endswith(".weight_")}
    mapping = {k: (_rename_an(p, an_layers) if p is not None else None) for k, p in pre.items()}

    out: dict[str, torch.Tensor] = {}
    claimed: dict[str, str] = {}
    leftover, doubled, shapes, kinds = [], [], [], []
    for key, target in mapping.items():
        value = state[key]
        if target is None or target not in ours:
            leftover.append(key)
            continue
        if target in claimed:
            doubled.append(f"{key} and {claimed[target]} -> {target}")
            continue
        claimed[target] = key
        ref = ours[target]
        if not isinstance(value, torch.Tensor):
            kinds.append(f"{key} ({type(value).__name__})")
            continue
        if tuple(value.shape) != tuple(ref.shape):
            shapes.append(f"{key} {tuple(value.shape)} -> {target} {tuple(ref.shape)}")
            continue
        if value.is_floating_point() != ref.is_floating_point():
            kinds.append(f"{key} ({value.dtype}, ours {ref.dtype})")
            continue
        out[target] = value.detach().to(device="cpu", dtype=ref.dtype, memory_format=torch.contiguous_format, copy=True)
    missing = [k for k in ours if k not in claimed]
    if leftover or missing or doubled or shapes or kinds:
        parts = []
        for label, items in (
            ("official keys left over (no key of ours)", leftover),
            ("keys of ours not filled", missing),
            ("keys of ours claimed twice", doubled),
            ("shapes that differ", shapes),
            ("values that are not tensors of the right kind", kinds),
        ):
            if items:
                shown = "; ".join(items[:6]) + (f"; ... ({len(items) - 6} more)" if len(items) > 6 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        raise ConversionError(
            f"{source} does not fit {what}:\n  " + "\n  ".join(parts) + f"\n{describe_guess(guess_model(state))}; "
            f"pass the right model (--config, or --model/--norm with --set model.<option>=<value>)."
        )
    return {k: out[k] for k in ours}  # our key order


# ----------------------------------------------------------------------------------------------------
# The whole conversion.
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where the weights and the model description come from."""

    checkpoint: Path
    official_config: Path | None


def find_source(path: str | Path) -> Source:
    """The checkpoint file and official config for a folder or a file (its folder's config.yaml, if any)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in CHECKPOINT_NAMES if (path / n).is_file()]
        if not found:
            raise ConversionError(
                f"{path} holds none of {', '.join(CHECKPOINT_NAMES)}; pass the folder the official zip unpacks "
                f"to, or the .pth.tar file itself."
            )
        config = path / CONFIG_NAME
        return Source(found[0], config if config.is_file() else None)
    if not path.is_file():
        raise ConversionError(
            f"{path} does not exist (or is not a file); pass the official model_best.pth.tar or the folder the "
            f"official zip unpacks to."
        )
    config = path.parent / CONFIG_NAME
    return Source(path, config if config.is_file() else None)


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConversionError(f"{path} cannot be read as YAML: {e}") from None


def resolve_config(
    source: Source,
    config: str | Path | None = None,
    model: str | None = None,
    norm: str | None = None,
    overrides: tuple[str, ...] = (),
) -> tuple[Config, str]:
    """The Config describing the weights, and a phrase saying where it came from.

    Precedence: ``config`` (ours, or an official one), then ``model``/``norm``, then the official config next
    to the checkpoint. ``overrides`` (``section.key=value``) are applied last.
    """
    if config is not None:
        try:
            config = resolve_config_path(config)  # a path, or a name in configs/
        except ConfigError as e:
            raise ConversionError(str(e)) from None
        data = read_yaml(config)
        if is_official_config(data):
            cfg, origin = config_from_official(data, str(config)), f"official config {config}"
        else:
            try:
                cfg = load_config(config)
            except ConfigError as e:
                raise ConversionError(str(e)) from None
            cfg.train.output_dir = ""
            origin = f"config {config}"
    elif model is not None or norm is not None:
        if model is None or norm is None:
            raise ConversionError("--model and --norm go together (e.g. --model resnet50 --norm an).")
        cfg = _recipe_config(f"{model}_{norm}", {"name": model, "norm": norm}, {}, "--model/--norm")
        origin = f"--model {model} --norm {norm}"
    elif source.official_config is not None:
        data = read_yaml(source.official_config)
        if not is_official_config(data):
            raise ConversionError(f"{source.official_config} is not an official AOGNet-v2 config.")
        cfg, origin = (
            config_from_official(data, str(source.official_config)),
            f"official config {source.official_config}",
        )
    else:
        raise ConversionError(
            f"No config.yaml next to {source.checkpoint}: say which model the file holds with --config (the "
            f"official config.yaml or one of ours) or --model/--norm."
        )
    try:
        apply_overrides(cfg, overrides)
        validate_model(cfg, origin)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    return cfg, origin


def build_meta_model(cfg: Config) -> torch.nn.Module:
    """The model ``cfg`` describes, exactly as train.py and eval.py build it, on the meta device."""
    from engine.build import build_model  # the one place that turns a config into a model

    with torch.device("meta"):
        return build_model(cfg)


def convert(
    path: str | Path,
    out: str | Path,
    config: str | Path | None = None,
    model: str | None = None,
    norm: str | None = None,
    overrides: tuple[str, ...] = (),
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Converts an official checkpoint (folder or file) into a checkpoint of ours at ``out``.

    Returns:
        A report: model, norm, options, epoch, best_prec1, source files, tensors and parameters written.
    """
    source = find_source(path)
    cfg, origin = resolve_config(source, config, model, norm, overrides)
    raw = load_official(source.checkpoint, trust_pickle)
    state = strip_prefix(raw["state_dict"])
    net = build_meta_model(cfg)
    m = cfg.model
    options = {k: m.options[k] for k in ("deep_stem", "avg_down", "norm_k") if m.options.get(k)}
    what = f"{m.name} (norm {m.norm}{''.join(f', {k}={v}' for k, v in options.items())}; from {origin})"
    weights = convert_state(state, net, what, str(source.checkpoint))
    epoch = raw.get("epoch")
    best = raw.get("best_prec1")
    best = float(best) if isinstance(best, (int, float, torch.Tensor)) else None
    official = {
        "format": FORMATS[0],
        "checkpoint": str(source.checkpoint),
        "described_by": origin,
        "arch": raw.get("arch") if isinstance(raw.get("arch"), str) else None,
        "epoch": int(epoch) if isinstance(epoch, int) else None,
        "best_prec1": best,
    }
    ckpt = {
        "model": weights,
        "config": cfg.to_dict(),
        "epoch": official["epoch"],
        "official": official,
        "git_rev": ck.git_revision(),
        "versions": ck.versions(),
    }
    ck.save_atomic(ckpt, out)
    return {
        "model": m.name,
        "norm": m.norm,
        "num_classes": m.num_classes,
        "options": options,
        "described_by": origin,
        "epoch": official["epoch"],
        "best_prec1": best,
        "checkpoint": str(source.checkpoint),
        "out": str(out),
        "tensors": len(weights),
        "parameters": sum(p.numel() for p in net.parameters()),
    }
