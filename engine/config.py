"""Typed experiment configuration: one YAML file per experiment, defaults in code.

A run is described by a YAML file with the sections below. Every key has a default here, so a file
only states what differs. Dotted ``key=value`` overrides on the command line win over the file. Loading
is strict: an unknown section or key, a value of the wrong type (numbers must be finite), a value outside
its allowed set, a key given twice in one mapping, or an empty file raises :class:`ConfigError`, whose
message names the key, the file and line (or the override) and the valid choices (with a did-you-mean
suggestion for typos). Checks that involve several keys or the device a run uses are
:func:`check_training` (``train.py`` runs them before anything is built).

The resolved :class:`Config` (defaults + file + overrides) is what gets saved in the run folder and
inside every checkpoint, so a checkpoint is enough to rebuild its model (see ``eval.py``).

Example::

    cfg = load_config("resnet50_an.yaml", ["optim.lr=0.2", "data.root=/data/imagenet"])
    cfg.model.name, cfg.data.batch_size, cfg.optim.lr
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from an.checks import did_you_mean
from engine.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

AmpMode = Literal["bf16", "fp16", "none"]


class ConfigError(UserError, ValueError):
    """A configuration problem; the message is meant to be shown to the user as is."""


# ----------------------------------------------------------------------------------------------------
# Sections. The comment after each field documents it (README "Configuration" points here).
# ----------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The ``model:`` section: ``name``, ``norm``, ``num_classes``, and any option of that model.

    Every other key is an option of the model (the keyword-only parameters of its class, with their defaults
    there; ``models.model_options(name)`` lists them), e.g. ``norm_k``, ``norm_kwargs``, ``norm_placement``,
    ``attn_layer``, ``deep_stem``, ``drop_rate``. They are kept in ``options`` and written back flat.
    """

    name: str = "resnet50"  # a name from models.list_models()
    norm: str = "bn"  # a name from an.list_norms(): bn | gn | sn | an | an_gn | iebn | yours
    num_classes: int = 1000
    options: dict[str, Any] = field(default_factory=dict)  # the model's options (see the class docstring)


@dataclass
class DataConfig:
    root: str = ""  # dataset root holding train/<class>/*.JPEG and val/<class>/*.JPEG
    backend: Literal["dali", "dali_cpu", "torch", "synthetic"] = "torch"
    batch_size: int = 128  # per GPU (per process)
    eval_batch_size: int | None = None  # per GPU; None = batch_size
    workers: int = 8  # loader worker processes (torch) or DALI CPU threads, per process
    img_size: int = 224  # training and evaluation crop
    crop_pct: float = 0.875  # evaluation: resize shorter side to img_size / crop_pct (224 / 0.875 = 256)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # RandomResizedCrop aspect range
    hflip: float = 0.5  # horizontal flip probability
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    synthetic_train_size: int = 1281167  # images per epoch of the synthetic backend
    synthetic_val_size: int = 50000
    synthetic_bank_size: int = 128  # distinct random images the synthetic backend cycles through (kept on the device)
    loader_timeout: float = 300.0  # torch backend: seconds to wait for one batch from the workers; 0 = no limit
    # DALI options.
    # Share of JPEGs sent to the hardware decoder (A100/H100/H200). 0.9: DALI's measurement (NVIDIA/DALI pull request
    # 6366, ImageNet at batch 256) routed 90% to it and trained 1.8% faster than at DALI's default 0.65.
    dali_hw_decoder_load: float = 0.9
    dali_preallocate: bool = True  # preallocate the hardware decoder's memory for its share of each batch
    dali_preallocate_mib: int = 2048  # GPU memory budget of that preallocation per pipeline (hints scaled to fit)
    dali_preallocate_width: int = 6000  # preallocation hint: widest image expected (tools/check_dataset.py prints it)
    dali_preallocate_height: int = 6000  # preallocation hint: tallest image expected
    dali_device_memory_padding: int = 268435456  # bytes added to each nvJPEG GPU buffer reallocation (256 MiB)
    dali_host_memory_padding: int = 167772160  # bytes added to each nvJPEG pinned host buffer reallocation (160 MiB)
    dali_prefetch: int = 2  # prefetch queue depth


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw", "apex_sgd", "apex_lamb"] = "sgd"  # apex_* need NVIDIA apex installed
    lr: float = 0.1  # base LR per `base_batch_size` images; scaled by the global batch
    base_batch_size: int = 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    decay_norm: bool = True  # decay norm and AN mixture parameters too (the official recipe decays all)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    clip_grad: float | None = None  # max global gradient norm; None = no clipping
    accum_steps: int = 1  # gradient accumulation: optimizer step every N micro-batches


@dataclass
class SchedConfig:
    name: Literal["cosine", "constant"] = "cosine"
    epochs: int = 120
    warmup_epochs: float = 5.0
    warmup_start_factor: float = 0.0  # warmup starts at this fraction of the peak LR
    min_lr: float = 0.0  # cosine floor, absolute


@dataclass
class TrainConfig:
    output_dir: str = ""  # run folder; empty = runs/<config file name without .yaml>
    amp: AmpMode = "bf16"  # autocast dtype on CUDA; on CPU bf16 autocast is used when set, fp16 is refused
    seed: int = 0
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    cuda_graph: bool = False  # compile with mode="reduce-overhead": CUDA graphs (CUDA only; see engine/accel.py)
    deterministic: bool = False  # deterministic algorithms (slower; used by resume tests)
    label_smoothing: float = 0.0
    mixup: float = 0.0  # mixup alpha (0 = off)
    cutmix: float = 0.0  # cutmix alpha (0 = off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    ema: bool = False
    ema_decay: float = 0.9999
    eval_every: int = 1  # validate every N epochs (the last epoch always validates)
    save_every: int = 0  # keep a copy of the checkpoint every N epochs (0 = only last/best)
    save_minutes: float = 30.0  # also refresh last.pth every N minutes inside an epoch, at the next preemption
    # check (every dist.signal_check_every updates; 0 = off)
    steps_per_epoch: int | None = None  # cap on training steps per epoch (quick runs, tests)
    val_steps: int | None = None  # cap on validation batches (quick runs; counts then cover fewer images)
    auto_resume: bool = True  # resume from output_dir/last.pth when it exists
    init_from: str = ""  # start a new run from these weights (ours or tools/convert_checkpoint.py's); not a resume


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    sync_bn: bool = False  # synchronise BN statistics (AN and SN kept whole)
    dist_bn: Literal["reduce", "broadcast", "none"] = "reduce"  # running stats across ranks before eval/save
    signal_check_every: int = 10  # steps between checks of the preemption flag across ranks
    timeout_minutes: float = 30.0
    recipe_gpus: int | None = None  # processes the recipe was written for; another count logs the changed batch/LR


@dataclass
class LogConfig:
    interval: int = 50  # steps between log lines
    progress: Literal["auto", "bar", "lines"] = "auto"  # bar on a terminal, plain lines otherwise
    tensorboard: bool = True
    an_histograms: bool = True  # TensorBoard histograms of AN attention weights each epoch


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict, as written to YAML and checkpoints (model options flat in ``model``)."""
        out = dataclasses.asdict(self)
        out["model"].update(out["model"].pop("options"))
        return out

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------------
# Value checks beyond the type: (section, key) -> (predicate, description of valid values).
# ----------------------------------------------------------------------------------------------------

_POSITIVE = (lambda v: v > 0, "a number > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
_PROBABILITY = (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def _optional(check):
    pred, text = check
    return (lambda v: v is None or pred(v), f"null or {text}")


def _pair(lo: float, hi: float | None = None):
    def pred(v):
        return len(v) == 2 and v[0] <= v[1] and v[0] > lo and (hi is None or v[1] <= hi)

    return pred


_CHECKS: dict[tuple[str, str], tuple[Any, str]] = {
    ("model", "num_classes"): (lambda v: v >= 1, "an integer >= 1"),
    ("data", "batch_size"): (lambda v: v >= 1, "an integer >= 1"),
    ("data", "eval_batch_size"): _optional((lambda v: v >= 1, "an integer >= 1")),
    ("data", "workers"): (lambda v: v >= 0, "an integer >= 0"),
    ("data", "img_size"): (lambda v: v >= 8, "an integer >= 8"),
    ("data", "crop_pct"): (lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    ("data", "scale"): (_pair(0.0, 1.0), "[min, max] with 0 < min <= max <= 1"),
    ("data", "ratio"): (_pair(0.0), "[min, max] with 0 < min <= max"),
    ("data", "hflip"): _PROBABILITY,
    ("data", "mean"): (lambda v: len(v) == 3, "a list of 3 numbers"),
    ("data", "std"): (lambda v: len(v) == 3 and all(s > 0 for s in v), "a list of 3 numbers > 0"),
    ("data", "synthetic_train_size"): (lambda v: v >= 1, "an integer >= 1"),
    ("data", "synthetic_val_size"): (lambda v: v >= 1, "an integer >= 1"),
    ("data", "dali_hw_decoder_load"): _PROBABILITY,
    ("data", "dali_prefetch"): (lambda v: v >= 1, "an integer >= 1"),
    ("data", "dali_preallocate_mib"): (lambda v: v >= 0, "an integer >= 0 (MiB)"),
    ("data", "synthetic_bank_size"): (lambda v: v >= 1, "an integer >= 1"),
    ("data", "loader_timeout"): _NON_NEGATIVE,
    ("data", "dali_preallocate_width"): (lambda v: v >= 0, "an integer >= 0"),
    ("data", "dali_preallocate_height"): (lambda v: v >= 0, "an integer >= 0"),
    ("data", "dali_device_memory_padding"): (lambda v: v >= 0, "an integer >= 0 (bytes)"),
    ("data", "dali_host_memory_padding"): (lambda v: v >= 0, "an integer >= 0 (bytes)"),
    ("optim", "lr"): _POSITIVE,
    ("optim", "base_batch_size"): (lambda v: v >= 1, "an integer >= 1"),
    ("optim", "momentum"): (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("optim", "weight_decay"): _NON_NEGATIVE,
    ("optim", "betas"): (lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v), "two numbers in [0, 1)"),
    ("optim", "clip_grad"): _optional(_POSITIVE),
    ("optim", "accum_steps"): (lambda v: v >= 1, "an integer >= 1"),
    ("sched", "epochs"): (lambda v: v >= 1, "an integer >= 1"),
    ("sched", "warmup_epochs"): _NON_NEGATIVE,
    ("sched", "warmup_start_factor"): _PROBABILITY,
    ("sched", "min_lr"): _NON_NEGATIVE,
    ("train", "label_smoothing"): (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("train", "mixup"): _NON_NEGATIVE,
    ("train", "cutmix"): _NON_NEGATIVE,
    ("train", "mixup_prob"): _PROBABILITY,
    ("train", "mixup_switch_prob"): _PROBABILITY,
    ("train", "ema_decay"): (lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
    ("train", "eval_every"): (lambda v: v >= 1, "an integer >= 1"),
    ("train", "save_every"): (lambda v: v >= 0, "an integer >= 0"),
    ("train", "save_minutes"): _NON_NEGATIVE,
    ("train", "steps_per_epoch"): _optional((lambda v: v >= 1, "an integer >= 1")),
    ("train", "val_steps"): _optional((lambda v: v >= 1, "an integer >= 1")),
    ("dist", "signal_check_every"): (lambda v: v >= 1, "an integer >= 1"),
    ("dist", "timeout_minutes"): _POSITIVE,
    ("dist", "recipe_gpus"): _optional((lambda v: v >= 1, "an integer >= 1")),
    ("log", "interval"): (lambda v: v >= 1, "an integer >= 1"),
}


# ----------------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------------


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (list, tuple, collections.abc.Sequence):
        args = typing.get_args(tp)
        if not args:
            return "a list"
        inner = _type_name(args[0])
        plural = {"an integer": "integers", "a finite number": "finite numbers", "a string": "strings"}
        return f"a list of {plural.get(inner, inner)}"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    return {int: "an integer", float: "a finite number", bool: "true/false", str: "a string"}.get(tp, str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """Returns ``value`` converted to type ``tp``, or raises _Mismatch. Only lossless conversions."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        if value is None and "none" in typing.get_args(tp):  # `train.amp=none` on the command line reads as null
            return "none"
        raise _Mismatch
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in (list, tuple, collections.abc.Sequence):
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        if isinstance(value, (list, tuple)):
            return [_coerce(v, inner) for v in value]
        raise _Mismatch
    if origin in (dict, collections.abc.Mapping):
        if isinstance(value, dict):
            return dict(value)
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                raise _Mismatch from None
        else:
            raise _Mismatch
        if not math.isfinite(number):  # .inf, nan: no key means anything by them
            raise _Mismatch
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config field type {tp!r}")


def _section_fields(section_cls) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _set(cfg: Config, section: str, key: str, value: Any, source: str | None) -> None:
    """Sets ``section.key`` on ``cfg`` after checking the name, the type and the value."""
    if section not in SECTIONS:
        raise ConfigError(
            f"Unknown config section '{section}'{_where(source)}.{did_you_mean(section, SECTIONS)} "
            f"Valid sections: {', '.join(SECTIONS)}."
        )
    fields = _section_fields(SECTIONS[section])
    if section == "model" and (key not in fields or key == "options"):
        cfg.model.options[key] = value  # a model option: checked against the model by validate_model()
        _record_origin(cfg, section, key, source)
        return
    if key not in fields:
        raise ConfigError(
            f"Unknown config key '{section}.{key}'{_where(source)}.{did_you_mean(key, fields)} "
            f"Valid keys of '{section}': {', '.join(fields)}."
        )
    tp = fields[key]
    try:
        coerced = _coerce(value, tp)
    except _Mismatch:
        raise ConfigError(
            f"Bad value for '{section}.{key}'{_where(source)}: got {value!r} ({type(value).__name__}), "
            f"expected {_type_name(tp)}.{_literal_hint(value, tp)}"
        ) from None
    check = _CHECKS.get((section, key))
    if check is not None:
        pred, text = check
        try:
            ok = pred(coerced)
        except (TypeError, IndexError):
            ok = False
        if not ok:
            raise ConfigError(f"Bad value for '{section}.{key}'{_where(source)}: got {value!r}, expected {text}.")
    setattr(getattr(cfg, section), key, coerced)
    _record_origin(cfg, section, key, source)


def _record_origin(cfg: Config, section: str, key: str, source: str | None) -> None:
    """Remembers where ``section.key`` was set ("FILE, line N" or the override), for the messages of later checks.

    Kept in the instance's ``__dict__`` beside the dataclass fields, so it is never dumped or saved.
    """
    if source:
        cfg.__dict__.setdefault("_origins", {})[(section, key)] = source


def origin(cfg: Config, section: str, key: str, default: str | None = None) -> str | None:
    """Where ``section.key`` was set (see :func:`_record_origin`), else ``default``."""
    return cfg.__dict__.get("_origins", {}).get((section, key), default)


def _literal_hint(value: Any, tp: Any) -> str:
    for arg in (tp, *typing.get_args(tp)):
        if typing.get_origin(arg) is Literal:
            return did_you_mean(value, typing.get_args(arg))
    return ""


def config_from_dict(
    data: dict[str, Any] | None, source: str | None = None, lines: dict[tuple, int] | None = None
) -> Config:
    """Builds a validated Config from a nested mapping (a parsed YAML file or a checkpoint's copy).

    ``lines`` (from :func:`read_yaml`) maps ``(section,)`` and ``(section, key)`` to their line in ``source``,
    which the messages then name.
    """
    cfg = Config()
    if data is None:
        return cfg
    if not isinstance(data, dict):
        raise ConfigError(f"The config{_where(source)} must be a mapping of sections, got {type(data).__name__}.")

    def at(*path: str) -> str | None:
        line = (lines or {}).get(path)
        return f"{source}, line {line}" if source and line else source

    for section, values in data.items():
        section = str(section)
        if section not in SECTIONS:
            raise ConfigError(
                f"Unknown config section '{section}'{_where(at(section))}.{did_you_mean(section, SECTIONS)} "
                f"Valid sections: {', '.join(SECTIONS)}."
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(
                f"Config section '{section}'{_where(at(section))} must be a mapping of keys, got {values!r}."
            )
        for key, value in values.items():
            _set(cfg, section, str(key), value, at(section, str(key)))
            if isinstance(value, dict):  # e.g. model.norm_kwargs: its keys are checked by validate_model
                for sub in value:
                    _record_origin(cfg, section, f"{key}.{sub}", at(section, str(key), str(sub)))
    return cfg


# ----------------------------------------------------------------------------------------------------
# Reading YAML: duplicate keys refused, line numbers kept.
# ----------------------------------------------------------------------------------------------------

_MERGE_TAG = "tag:yaml.org,2002:merge"


def _scan_keys(node: yaml.Node, path: tuple, lines: dict[tuple, int], source: str) -> None:
    """Records the line of every mapping key under ``node`` and refuses a key given twice in one mapping."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *anchor`: its keys are meant to be overridden
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join(map(str, (*path, key)))
                raise ConfigError(
                    f"Config file {source}, line {line}: '{dotted}' is given twice (first on line {seen[key]}). "
                    f"YAML would silently keep only the last one and drop everything under the first; merge the "
                    f"two into one."
                )
            seen[key] = line
            lines[(*path, key)] = line
            _scan_keys(value_node, (*path, key), lines, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _scan_keys(item, (*path, i), lines, source)


def read_yaml(path: str | Path) -> tuple[Any, dict[tuple, int]]:
    """Parses a YAML file with ``yaml.SafeLoader`` and returns ``(data, lines)``.

    ``lines`` maps each key path (``("model",)``, ``("model", "name")``, ...) to its 1-based line. A key given
    twice in one mapping, a file that is not UTF-8 text and invalid YAML raise :class:`ConfigError` naming the
    file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"Config file {path} is not a text file (byte {e.start} is not UTF-8); give the experiment's .yaml file."
        ) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[tuple, int] = {}
        if node is None:
            return None, lines
        _scan_keys(node, (), lines, str(path))
        return loader.construct_document(node), lines
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        if isinstance(e, yaml.MarkedYAMLError) and e.problem:
            detail = f"{e.context}: {e.problem}" if e.context else e.problem
        else:
            detail = " ".join(str(e).split())
        raise ConfigError(
            f"Config file {path}{where} is not valid YAML ({detail}). Check the indentation, colons and brackets there."
        ) from None
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[str, str, tuple[str, ...], Any]:
    """Parses ``section.key=value`` or ``section.key.sub=value`` (a key of a mapping-valued option, e.g.
    ``model.norm_kwargs.impl=fused``); the value is read as YAML (numbers, true/false, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"Bad override '{text}': expected section.key=value, e.g. optim.lr=0.2.")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"Bad override '{text}': the key must be section.key, e.g. data.root=/data/imagenet.")
    raw = raw.strip()
    if raw in ("None", "none"):
        return parts[0], parts[1], tuple(parts[2:]), None
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"Bad override '{text}': the value is not valid YAML ({e}).") from None
    return parts[0], parts[1], tuple(parts[2:]), value


def _current(cfg: Config, section: str, key: str) -> Any:
    if section == "model" and key in cfg.model.options:
        return cfg.model.options[key]
    return getattr(getattr(cfg, section, None), key, None)


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """Applies dotted ``section.key[.sub...]=value`` overrides in order (later ones win)."""
    for text in overrides:
        section, key, sub, value = parse_override(text)
        source = f"command-line override '{text}'"
        if sub:
            root = _current(cfg, section, key)
            if root is not None and not isinstance(root, dict):
                raise ConfigError(f"Bad override '{text}': '{section}.{key}' is not a mapping, so it has no sub-keys.")
            root = dict(root or {})
            node = root
            for part in sub[:-1]:
                node[part] = dict(node.get(part) or {})
                node = node[part]
            node[sub[-1]] = value
            value = root
        _set(cfg, section, key, value, source)
        if sub:
            _record_origin(cfg, section, ".".join((key, *sub)), source)
    return cfg


def resolve_config_path(name: str | Path) -> Path:
    """Finds a config: an existing path as given, else ``configs/<name>`` (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml", CONFIG_DIR / path):
        if candidate.is_file():
            return candidate
    available = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(
        f"Config file '{name}' not found: it is neither an existing path nor a file in {CONFIG_DIR}."
        f"{did_you_mean(path.name, available)} Available configs: {', '.join(available) or '(none)'}."
    )


def load_config(name: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Loads a YAML experiment file (see :func:`resolve_config_path`), applies overrides and validates the model."""
    path = resolve_config_path(name)
    data, lines = read_yaml(path)
    if data is None:
        raise ConfigError(
            f"Config file {path} is empty (or holds only comments): a run would silently use every default "
            f"(resnet50/bn, 1000 classes, no data.root). Write the experiment into it, or start from one in "
            f"{CONFIG_DIR} (e.g. resnet50_an.yaml or demo_digits.yaml)."
        )
    cfg = config_from_dict(data, source=str(path), lines=lines)
    apply_overrides(cfg, overrides)
    if not cfg.train.output_dir.strip():
        cfg.train.output_dir = str(Path("runs") / path.stem)
    validate_model(cfg, str(path))
    return cfg


def checkpoint_config(
    ckpt: dict[str, Any], path: str | Path, config: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> Config:
    """The config to rebuild the model of a loaded checkpoint ``ckpt`` (read from ``path``) with.

    The config file ``config`` when one is given (:func:`load_config`), else the config stored in the checkpoint;
    ``overrides`` apply to either. Raises ConfigError when neither exists.
    """
    if config:
        return load_config(config, overrides)
    if "config" not in ckpt:
        raise ConfigError(f"{path} holds no config; pass --config with the experiment's YAML file.")
    cfg = config_from_dict(ckpt["config"], source=f"the config stored in {path}")
    apply_overrides(cfg, overrides)
    return cfg


def _check_layer_kwargs(cfg: Config, key: str, builder: Any, owner: str, source: str | None) -> None:
    """Coerces the values of ``model.<key>`` (``norm_kwargs``/``attn_kwargs``) to the types of the layer builder's
    keyword parameters, or raises ConfigError naming ``model.<key>.<name>``. Unknown names are left to the build,
    whose message lists the valid ones."""
    kwargs = cfg.model.options.get(key)
    if not isinstance(kwargs, dict) or not kwargs:
        return
    target = builder.__init__ if isinstance(builder, type) else builder
    try:
        hints = typing.get_type_hints(target)
        params = inspect.signature(target).parameters
    except (NameError, TypeError, ValueError):  # annotations this module cannot resolve: the build checks
        return
    for name, value in kwargs.items():
        tp = hints.get(name)
        if tp is None or name not in params:
            continue
        try:
            kwargs[name] = _coerce(value, tp)
        except _Mismatch:
            default = params[name].default
            shown = "" if default is inspect.Parameter.empty else f", default {default!r}"
            where = origin(cfg, "model", f"{key}.{name}", origin(cfg, "model", key, source))
            raise ConfigError(
                f"Bad value for 'model.{key}.{name}'{_where(where)}: got {value!r}, expected {_type_name(tp)} "
                f"({owner}{shown})."
            ) from None
        except TypeError:  # a parameter type the config does not model: the build checks the value
            continue


def validate_model(cfg: Config, source: str | None = None) -> None:
    """Checks the ``model`` section against the registries: the name, the norm, each option's name and type
    (from the model's signature), the types of the ``norm_kwargs``/``attn_kwargs`` entries (from the layer
    builder's signature), then the values, by building the model on the meta device (no memory), so every error
    a model would raise surfaces here, naming the file and line (or the override). Coerces values in place."""
    import torch

    import an
    import models

    m = cfg.model
    names = models.list_models()
    if m.name not in names:
        raise ConfigError(
            f"Unknown model '{m.name}' for 'model.name'{_where(origin(cfg, 'model', 'name', source))}."
            f"{did_you_mean(m.name, names)} Valid models: {', '.join(names)}."
        )
    norms = an.list_norms()
    if m.norm not in norms:
        raise ConfigError(
            f"Unknown norm '{m.norm}' for 'model.norm'{_where(origin(cfg, 'model', 'norm', source))}."
            f"{did_you_mean(m.norm, norms)} Valid norms: {', '.join(norms)}."
        )
    valid = {k: v for k, v in models.model_options(m.name).items() if k not in ("norm", "num_classes")}
    for key, value in m.options.items():
        where = origin(cfg, "model", key, source)
        if key not in valid:
            raise ConfigError(
                f"Unknown option 'model.{key}' for model '{m.name}'{_where(where)}.{did_you_mean(key, valid)} "
                f"Options of {m.name}: {', '.join(valid)} (see models.model_options('{m.name}'))."
            )
        default, tp = valid[key]
        try:
            m.options[key] = _coerce(value, tp)
        except (_Mismatch, TypeError):
            raise ConfigError(
                f"Bad value for 'model.{key}'{_where(where)}: got {value!r}, expected {_type_name(tp)} "
                f"(default: {default!r})."
            ) from None
    _check_layer_kwargs(cfg, "norm_kwargs", an.norm_entry(m.norm).builder, f"norm '{m.norm}'", source)
    attn = m.options.get("attn_layer")
    if isinstance(attn, str) and attn in an.list_attns():
        _check_layer_kwargs(cfg, "attn_kwargs", an.attn_entry(attn).builder, f"attention layer '{attn}'", source)
    try:
        with torch.device("meta"):
            models.create_model(m.name, norm=m.norm, num_classes=m.num_classes, **m.options)
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        overridden = sorted({o for (sec, _), o in cfg.__dict__.get("_origins", {}).items() if sec == "model"} - {None})
        overridden = [o for o in overridden if o.startswith("command-line")]
        also = f", with {', '.join(overridden)}" if overridden else ""
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"Bad model options (section 'model'{_where(source)}{also}): {detail}") from None


# ----------------------------------------------------------------------------------------------------
# Checks across keys, and against the device the run uses (train.py).
# ----------------------------------------------------------------------------------------------------


def check_training(cfg: Config, device: str, source: str | None = None) -> None:
    """Raises ConfigError for a combination of keys a training run cannot honour on ``device`` ("cpu"/"cuda").

    Each single key was checked when it was set; these involve several keys or the device: mixup/cutmix need an
    even per-GPU batch, the warm-up must end before the run does, ``train.amp=fp16`` needs CUDA (fp16 autocast
    with a loss scaler is a CUDA recipe; the CPU uses bf16), and ``train.cuda_graph`` needs CUDA
    (:func:`engine.accel.check_accel`).
    """
    from engine.accel import check_accel

    def at(section: str, key: str) -> str:
        return _where(origin(cfg, section, key, source))

    t, s = cfg.train, cfg.sched
    if (t.mixup > 0 or t.cutmix > 0) and cfg.data.batch_size % 2:
        raise ConfigError(
            f"'data.batch_size' is {cfg.data.batch_size}{at('data', 'batch_size')}, but mixup/cutmix pair each "
            f"image with another of the batch and need an even per-GPU batch; use an even data.batch_size."
        )
    if s.warmup_epochs > 0 and s.warmup_epochs >= s.epochs:
        raise ConfigError(
            f"'sched.warmup_epochs' is {s.warmup_epochs:g}{at('sched', 'warmup_epochs')} but the run lasts "
            f"sched.epochs={s.epochs}: the learning rate would never reach its peak. Make the warm-up shorter than "
            f"the run (the recipes warm up for 5 of 120 epochs), or set sched.warmup_epochs=0."
        )
    device_type = str(device).split(":")[0]
    if t.amp == "fp16" and device_type != "cuda":
        raise ConfigError(
            f"train.amp=fp16{at('train', 'amp')} needs a CUDA device (float16 autocast with a loss scaler), but "
            f"this run is on {device_type}. Use train.amp=bf16 (or none) on the CPU, or run on a GPU."
        )
    check_accel(cfg, device_type, origin(cfg, "train", "cuda_graph", source))
