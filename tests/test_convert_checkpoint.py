"""tools/convert_checkpoint.py: official AN (AOGNet-v2) checkpoints -> checkpoints of ours; engine/init_weights.py.

The official files are rebuilt here from ``tests/assets/official_layouts.json.gz`` (every state-dict key and
shape of every released model, and the AOGNet node tables) with random values, in the official format:
``torch.save({epoch, arch, state_dict, best_prec1, optimizer})`` with the ``module.network.`` prefix, float16
weights (apex's FP16Model kept only affine BatchNorms in float32) and a ``config.yaml`` with the official keys.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import sys
import types
from functools import cache, lru_cache
from pathlib import Path

import pytest
import torch
import yaml

import eval as eval_script
from engine import checkpoint as ck
from engine.config import config_from_dict
from engine.errors import main_guard
from engine.init_weights import load_init_weights
from tools import convert_checkpoint, official
from train import build_model

ASSETS = Path(__file__).resolve().parent / "assets"
LAYOUTS = ASSETS / "official_layouts.json.gz"
PREFIX = "module.network."


@cache
def layouts() -> dict:
    with gzip.open(LAYOUTS, "rt") as f:
        return json.load(f)["models"]


# ---------------------------------------------------------------------------------------------------
# The official config files, from the official defaults and the released configs' values (docs/AN.md 4, 3.1).
# ---------------------------------------------------------------------------------------------------

_AOG = yaml.safe_load((ASSETS / "official_aognet_section.yaml").read_text())


def official_config(row: str) -> dict:
    """The config.yaml of an official run folder for a row of the layouts file."""
    an = row.endswith("an") or row.endswith("an200")
    long = row.endswith("200")
    cfg: dict = {
        "batch_size": 128,
        "num_epoch": 200 if long else 120,
        "dataset": "imagenet",
        "num_classes": 1000,
        "crop_size": 224,
        "crop_interpolation": 2,
        "use_cosine_lr": True,
        "cosine_lr_min": 0.0,
        "warmup_epochs": 5,
        "lr": 0.1,
        "lr_scale_factor": 256,
        "momentum": 0.9,
        "wd": 0.0001,
        "nesterov": False,
        "activation_mode": 0,
        "norm_name": "MixtureBatchNorm2d" if an else "BatchNorm2d",
        "norm_groups": 32,
        "norm_k": [10, 10, 20, 20],
        "norm_attention_mode": 2,
        "norm_zero_gamma_init": row.startswith("r"),
        "dataaug": {
            "imagenet_extra_aug": False,
            "labelsmoothing_rate": 0.1 if long else 0.0,
            "mixup_rate": 0.2 if long else 0.0,
        },
    }
    if row.startswith("r"):
        cfg["arch"] = "resnet101" if row.startswith("r101") else "resnet50"
        cfg["norm_all_mix"] = False
        cfg["stem"] = {"imagenet_head7x7": not long, "stem_kernel_size": 7, "stem_stride": 2}
        cfg["resnet"] = {
            "base_inplanes": 64,
            "replace_stride_with_dilation": [False, False, False],
            "replace_stride_with_avgpool": long,
            "extra_norm_ac": False,
        }
    elif row.startswith("mv2"):
        cfg.update(arch="mobilenet_v2", num_epoch=150, lr=0.05, wd=0.00004, norm_k=[5, 5, 5, 5, 10, 10, 10])
        cfg["mobilenet"] = {"rm_se": False, "use_mn_in_se": False}
    else:  # AOGNet configs have no 'arch' (the default builder)
        big = row.startswith("aog40")
        cfg["crop_interpolation"] = 3 if row == "aog12bn" else 2  # the 12M BN config used bicubic
        cfg["stem"] = {"imagenet_head7x7": False, "replace_maxpool_with_res_bottleneck": False}
        cfg["aognet"] = {
            **_AOG,
            "filter_list": [56, 224, 448, 896, 1400] if big else [32, 128, 256, 512, 824],
            "blocks": [2, 2, 3, 1] if big else [2, 2, 2, 1],
        }
    return cfg


def _dtype(key: str, shape: list[int], an_layers: set[str]) -> torch.dtype:
    if key.endswith("num_batches_tracked"):
        return torch.int64
    layer = key.rsplit(".", 1)[0]
    if layer in an_layers:  # weight_, bias_ and the statistics of the affine-free standardizer: cast by apex
        return torch.float16
    if "attention_weights.attention.1." in key:  # the attention's BN is affine: kept in float32
        return torch.float32
    if len(shape) == 4 or key in ("fc.weight", "fc.bias", "classifier.1.weight", "classifier.1.bias"):
        return torch.float16
    return torch.float32  # BatchNorm


@lru_cache(maxsize=1)  # written, then compared with the conversion: generate once
def official_state(row: str, seed: int = 0) -> dict[str, torch.Tensor]:
    keys = layouts()[row]["keys"]
    an_layers = {k[: -len(".weight_")] for k in keys if k.endswith(".weight_")}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys.items():
        dtype = _dtype(key, shape, an_layers)
        if dtype == torch.int64:
            value = torch.randint(1, 10**6, shape, generator=g)
        elif key.endswith("running_var"):
            value = torch.rand(shape, generator=g) + 0.5
        elif len(shape) >= 2:  # conv / linear weights at a trainable scale, so that a forward stays finite
            value = torch.randn(shape, generator=g) * (2.0 / math.prod(shape[1:])) ** 0.5
        else:
            value = torch.randn(shape, generator=g) * 0.1 + (1.0 if key.endswith("weight") else 0.0)
        state[PREFIX + key] = value.to(dtype)
    return state


def write_official(folder: Path, row: str, *, optimizer=None, legacy: bool = True, config: bool = True) -> Path:
    """An official run folder (config.yaml + model_best.pth.tar); returns the .pth.tar path."""
    folder.mkdir(parents=True, exist_ok=True)
    arch = official_config(row).get("arch", "aognet")
    obj = {
        "epoch": 120,
        "arch": arch,
        "state_dict": official_state(row),
        "best_prec1": 77.25,
        "optimizer": optimizer if optimizer is not None else {"loss_scale": 128.0, "state": {}},
    }
    path = folder / "model_best.pth.tar"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    if config:
        (folder / "config.yaml").write_text("---\n" + yaml.safe_dump(official_config(row), sort_keys=False))
    return path


def check_converted(out: Path, row: str) -> dict:
    """Loads a converted file as eval.py does, strictly, and checks it against the official file's values."""
    ckpt = ck.load_checkpoint(out)
    cfg = config_from_dict(ckpt["config"], source=str(out))
    layout = layouts()[row]
    assert (cfg.model.name, cfg.model.norm) == (layout["project_model"], layout["project_norm"])
    for option, value in layout["project_kwargs"].items():
        assert cfg.model.options[option] == value, option
    with torch.device("meta"):
        model = build_model(cfg)
    model.load_state_dict(ckpt["model"], strict=True, assign=True)  # every key present, shapes equal
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["model"].values())
    # Every official tensor lands in exactly one tensor of ours, unchanged up to the float32 cast.
    theirs = sorted(
        (tuple(v.shape), v.float().sum().item(), v.float().abs().max().item()) for v in official_state(row).values()
    )
    ours = sorted(
        (tuple(v.shape), v.float().sum().item(), v.float().abs().max().item()) for v in ckpt["model"].values()
    )
    assert theirs == ours
    return ckpt


# ---------------------------------------------------------------------------------------------------
# Every official layout converts and loads strictly; the fast ones convert identically twice.
# ---------------------------------------------------------------------------------------------------

ROWS = sorted(layouts())
FAST = {"r50bn", "r50an", "mv2bn", "mv2an"}  # the others take 20-60 s each on a 2-core machine


@pytest.mark.parametrize("row", [r if r in FAST else pytest.param(r, marks=pytest.mark.slow) for r in ROWS])
def test_every_official_layout_converts(tmp_path, row):
    write_official(tmp_path / "official", row, legacy=row != "r50bn")  # the zip format once, the legacy one else
    out1, out2 = tmp_path / "a.pth", tmp_path / "b.pth"
    report = official.convert(tmp_path / "official", out1)
    if row in FAST:  # deterministic (once per family is enough: the full-size AOGNets take 15 s a conversion)
        official.convert(tmp_path / "official", out2)
        assert out1.read_bytes() == out2.read_bytes()
    ckpt = check_converted(out1, row)
    assert report["epoch"] == ckpt["epoch"] == 120 and report["best_prec1"] == pytest.approx(77.25)
    assert ckpt["official"]["best_prec1"] == pytest.approx(77.25)
    cfg = ckpt["config"]
    if row.startswith("aog"):
        assert cfg["data"]["interpolation"] == ("bicubic" if row == "aog12bn" else "bilinear")
    assert cfg["data"]["img_size"] == 224 and cfg["data"]["crop_pct"] == pytest.approx(0.875)
    if row.endswith("an") or row.endswith("an200"):
        assert cfg["model"]["norm_k"] == official_config(row)["norm_k"]
        assert cfg["model"]["norm_kwargs"] == {"attention": "hsigmoid"}


def test_hand_checked_names(tmp_path):
    """A few official -> ours names worked out by hand from the official node tables and layer layouts."""
    state = {k.removeprefix(PREFIX): v for k, v in official_state("aog12an").items()}
    cfg = official.config_from_official(official_config("aog12an"))
    net = official.build_meta_model(cfg)
    out = official.convert_state(state, net, "aognet12m", "test")
    pairs = {
        # stage 2 (index 2: D=4, remove_symmetric=1): official node 5 is OR[1-3], node 2 is AND[0-3]/1 (an AN node).
        "stage2.stage_2_block_0.stage_2_block_0_node_5_op.conv_norm_ac_2.conv_norm.conv_norm.0.weight": (
            "stage3.block1.nodes.or1_3.conv2.weight"
        ),
        "stage2.stage_2_block_1.stage_2_block_1_node_2_op.conv_norm_ac_2.conv_norm.conv_norm.1.weight_": (
            "stage3.block2.nodes.and0_3s1.bn2.mixture_weight"
        ),
        "stage2.stage_2_block_1.stage_2_block_1_node_2_op.conv_norm_ac_2.conv_norm.conv_norm.1.running_var": (
            "stage3.block2.nodes.and0_3s1.bn2.norm.running_var"
        ),
        "stage2.stage_2_block_1.stage_2_block_1_node_2_op.conv_norm_ac_2.conv_norm.conv_norm.1"
        ".attention_weights.attention.1.running_mean": "stage3.block2.nodes.and0_3s1.bn2.attention.bn.running_mean",
        # stage 3 (D=4, remove_symmetric=2): official node 9 is AND[0-2]/2; node 20 is T[1-1] (projection shortcut).
        "stage3.stage_3_block_0.stage_3_block_0_node_9_op.conv_norm_3.conv_norm.1.bias": (
            "stage4.block1.nodes.and0_2s2.bn3.bias"
        ),
        "stage3.stage_3_block_0.stage_3_block_0_node_20_op.shortcut.conv_norm.0.weight": (
            "stage4.block1.nodes.t1_1.shortcut.0.weight"
        ),
        "stem.2.conv_norm.conv_norm.1.running_mean": "stem.7.running_mean",
        "stage1.stage_1_block_0_transition.0.conv_norm.conv_norm.0.weight": "stage2.transition.0.weight",
        "stage0.stage_0_block_1.extra_norm_ac.0.weight": "stage1.block2.norm.weight",
    }
    for theirs, ours in pairs.items():
        assert torch.equal(out[ours], state[theirs].float()), theirs
    r50 = {k.removeprefix(PREFIX): v for k, v in official_state("r50an").items()}
    out = official.convert_state(
        r50, official.build_meta_model(official.config_from_official(official_config("r50an"))), "r50", "t"
    )
    assert torch.equal(
        out["layer3.2.bn2.attention.conv.weight"], r50["layer3.2.bn2.attention_weights.attention.0.weight"].float()
    )
    assert torch.equal(out["layer3.2.bn2.mixture_bias"], r50["layer3.2.bn2.bias_"].float())
    assert torch.equal(out["layer3.2.bn2.norm.num_batches_tracked"], r50["layer3.2.bn2.num_batches_tracked"])
    assert torch.equal(out["layer3.2.bn1.running_var"], r50["layer3.2.bn1.running_var"])


# ---------------------------------------------------------------------------------------------------
# The command line, bare files, and bad inputs.
# ---------------------------------------------------------------------------------------------------


def test_cli_prints_what_it_found_and_wrote(tmp_path, capsys):
    write_official(tmp_path / "off", "mv2an")
    assert convert_checkpoint.main(["--from", "aognet-v2", str(tmp_path / "off"), str(tmp_path / "out.pth")]) == 0
    text = capsys.readouterr().out
    assert "model mobilenetv2 (norm an, norm_k=[5, 5, 5, 5, 10, 10, 10])" in text
    assert "epoch 120, official best top-1 77.250%" in text and f"Wrote {tmp_path / 'out.pth'}: 416 tensors" in text
    check_converted(tmp_path / "out.pth", "mv2an")


def test_bare_file_needs_a_model_description(tmp_path, capsys):
    pth = write_official(tmp_path / "off", "r50an200", config=False)
    out = tmp_path / "out.pth"
    with pytest.raises(official.ConversionError, match=r"No config\.yaml next to .*--config.*--model/--norm"):
        official.convert(pth, out)
    # --model/--norm with options; the flags suggested by the error for a wrong guess lead here.
    flags = ["--model", "resnet50", "--norm", "an", "--set", "model.deep_stem=true", "--set", "model.avg_down=true"]
    assert convert_checkpoint.main(["--from", "aognet-v2", str(pth), str(out), *flags]) == 0
    check_converted(out, "r50an200")
    # --config with one of our configs, or with the official config.yaml from elsewhere.
    assert (
        convert_checkpoint.main(["--from", "aognet-v2", str(pth), str(out), "--config", "resnet50_an_200e.yaml"]) == 0
    )
    check_converted(out, "r50an200")
    off_cfg = tmp_path / "official.yaml"
    off_cfg.write_text(yaml.safe_dump(official_config("r50an200")))
    assert convert_checkpoint.main(["--from", "aognet-v2", str(pth), str(out), "--config", str(off_cfg)]) == 0
    check_converted(out, "r50an200")


def test_wrong_model_lists_keys_and_names_the_guess(tmp_path, capsys):
    pth = write_official(tmp_path / "off", "r50an", config=False)
    out = tmp_path / "out.pth"
    with pytest.raises(official.ConversionError) as e:
        official.convert(pth, out, model="resnet101", norm="an")
    msg = str(e.value)
    assert (
        "does not fit resnet101 (norm an" in msg and "keys of ours not filled" in msg and "layer3.6.conv1.weight" in msg
    )
    assert "look like resnet50 with norm an (--model resnet50 --norm an)" in msg
    with pytest.raises(official.ConversionError) as e:
        official.convert(pth, out, model="resnet50", norm="bn")
    msg = str(e.value)
    assert "official keys left over" in msg and "layer1.0.bn2.weight_" in msg and "keys of ours not filled" in msg
    with pytest.raises(official.ConversionError, match=r"(?s)deep_stem=True.*conv1\.0\.weight.*look like resnet50"):
        official.convert(pth, out, config="resnet50_an_200e.yaml")
    # The official config in the folder says AOGNet-40M but the weights are AOGNet-12M's.
    write_official(tmp_path / "aog", "aog12bn")
    (tmp_path / "aog" / "config.yaml").write_text(yaml.safe_dump(official_config("aog40bn")))
    with pytest.raises(official.ConversionError, match=r"(?s)does not fit aognet40m.*look like aognet12m with norm bn"):
        official.convert(tmp_path / "aog", out)
    assert not out.exists()  # nothing written
    argv = ["--from", "aognet-v2", str(pth), str(out), "--model", "resnet101", "--norm", "an"]
    assert main_guard(convert_checkpoint.main, argv) == 2
    assert "Error: " in capsys.readouterr().err


def test_unsupported_official_settings_are_named(tmp_path):
    base = official_config("r50an")
    for change, pattern in [
        ({"norm_attention_mode": 0}, "norm_attention_mode 0 has no counterpart"),
        ({"norm_name": "MixtureGroupNorm"}, "norm_name 'MixtureGroupNorm'"),
        ({"norm_all_mix": True}, "norm_all_mix"),
        ({"dataset": "cifar10"}, "only ImageNet"),
        ({"resnet": {**base["resnet"], "base_inplanes": 16}}, "'resnet.base_inplanes' is 16"),
        ({"arch": "densenet121"}, "arch 'densenet121'"),
    ]:
        with pytest.raises(official.ConversionError, match=pattern):
            official.config_from_official({**base, **change})
    aog = official_config("aog12an")
    with pytest.raises(
        official.ConversionError, match=r"'aognet.remove_symmetric_children_of_or_node' is \[0, 0, 0, 0\]"
    ):
        official.config_from_official(
            {**aog, "aognet": {**aog["aognet"], "remove_symmetric_children_of_or_node": [0] * 4}}
        )
    minimal = {"dataset": "imagenet", "num_classes": 1000, "arch": "resnet50", "resnet": {"base_inplanes": 64}}
    cfg = official.config_from_official(minimal)  # the official defaults fill the rest: deep stem, BN, bilinear
    m = cfg.model
    assert (m.name, m.norm, m.options["deep_stem"], m.options["avg_down"]) == ("resnet50", "bn", True, False)


def test_truncated_and_foreign_files(tmp_path):
    for legacy in (True, False):
        pth = write_official(tmp_path / f"off{legacy}", "r50bn", legacy=legacy)
        data = pth.read_bytes()
        pth.write_bytes(data[: len(data) // 2])
        with pytest.raises(official.ConversionError, match="truncated or corrupt"):
            official.convert(pth.parent, tmp_path / "out.pth")
    empty = tmp_path / "empty" / "model_best.pth.tar"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    with pytest.raises(official.ConversionError, match="empty"):
        official.load_official(empty)
    with pytest.raises(official.ConversionError, match=r"holds none of model_best\.pth\.tar"):
        official.convert(tmp_path / "empty" / "..", tmp_path / "out.pth")
    # A checkpoint of ours given as official.
    good = tmp_path / "good"
    write_official(good, "r50bn")
    ours = tmp_path / "ours.pth"
    official.convert(good, ours)
    with pytest.raises(
        official.ConversionError, match=r"already a checkpoint of this framework.*eval\.py --checkpoint"
    ):
        official.convert(ours, tmp_path / "again.pth", model="resnet50", norm="bn")
    plain = tmp_path / "plain.pth"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(official.ConversionError, match="not an official AOGNet-v2 checkpoint"):
        official.load_official(plain)


def test_pickled_objects_need_trust_pickle(tmp_path, monkeypatch):
    """The official optimizer state holds apex's loss scaler: refused by default, read with --trust-pickle.

    The class is pickled from a stand-in ``apex`` module that does not exist when the file is read (as on a
    machine without apex).
    """
    fake = types.ModuleType("apex.fp16_utils.loss_scaler")

    class LossScaler:
        def __init__(self, scale):
            self.cur_scale = scale

    LossScaler.__module__, LossScaler.__qualname__ = fake.__name__, "LossScaler"
    fake.LossScaler = LossScaler
    for name in ("apex", "apex.fp16_utils", "apex.fp16_utils.loss_scaler"):
        monkeypatch.setitem(sys.modules, name, fake)
    pth = write_official(tmp_path / "off", "r50an", optimizer={"loss_scaler": LossScaler(128.0), "overflow": False})
    for name in ("apex", "apex.fp16_utils", "apex.fp16_utils.loss_scaler"):
        monkeypatch.delitem(sys.modules, name)
    out = tmp_path / "out.pth"
    with pytest.raises(official.ConversionError, match=r"apex\.fp16_utils\.loss_scaler\.LossScaler.*--trust-pickle"):
        official.convert(tmp_path / "off", out)
    assert not out.exists()
    report = official.convert(tmp_path / "off", out, trust_pickle=True)
    assert report["model"] == "resnet50"
    ckpt = check_converted(out, "r50an")
    assert "optimizer" not in ckpt  # only the weights are kept
    raw = official.load_official(pth, trust_pickle=True)
    assert raw["optimizer"]["loss_scaler"].state == {"cur_scale": 128.0}  # an inert placeholder


# ---------------------------------------------------------------------------------------------------
# eval.py accepts a converted file; train.init_from loads it.
# ---------------------------------------------------------------------------------------------------


def test_eval_runs_on_a_converted_checkpoint(tmp_path, capsys):
    write_official(tmp_path / "off", "r50an")
    out = tmp_path / "r50an.pth"
    official.convert(tmp_path / "off", out)
    argv = [
        "--checkpoint", str(out), "--backend", "synthetic", "--allow-synthetic", "--batch-size", "2", "--workers", "0",
        "--device", "cpu",
        "data.img_size=32", "data.synthetic_val_size=3", "train.amp=\"none\"", "train.channels_last=false",
    ]  # fmt: skip
    assert eval_script.main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["model"] == "resnet50" and record["norm"] == "an" and record["count"] == 3
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    official_params = sum(
        math.prod(shape) for k, shape in layouts()["r50an"]["keys"].items() if not k.endswith(buffers)
    )
    assert record["epoch"] == 120 and record["params"] == official_params == 25_755_420
    assert 0.0 <= record["top1"] <= 100.0 and math.isfinite(record["loss"])


def test_load_init_weights(tmp_path):
    write_official(tmp_path / "off", "mv2bn")
    out = tmp_path / "mv2.pth"
    official.convert(tmp_path / "off", out)
    cfg = config_from_dict(torch.load(out, weights_only=True)["config"])
    model = build_model(cfg)
    report = load_init_weights(model, out)
    saved = ck.load_checkpoint(out)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert report["tensors"] == len(saved) and report["epoch"] == 120
    assert report["source_model"] == "mobilenetv2 (norm bn, 1000 classes)" and report["official"]["best_prec1"] == 77.25
    assert "model" not in report["ignored"] and "config" in report["ignored"]

    # A training checkpoint of ours: only the weights are taken.
    small = build_model(config_from_dict({"model": {"name": "resnet18", "num_classes": 4}}))
    opt = torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9)
    small(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    run_ckpt = tmp_path / "last.pth"
    ck.save_atomic({"model": small.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "config": {}}, run_ckpt)
    fresh = build_model(config_from_dict({"model": {"name": "resnet18", "num_classes": 4}}))
    report = load_init_weights(fresh, run_ckpt)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), small.state_dict().values()))
    assert report["ignored"] == ["config", "epoch", "optimizer"]

    other = build_model(config_from_dict({"model": {"name": "resnet18", "num_classes": 5}}))
    pattern = rf"train\.init_from={re.escape(str(run_ckpt))} .*with other shapes.*fc\.weight"
    with pytest.raises(ck.CheckpointError, match=pattern):
        load_init_weights(other, run_ckpt)
    with pytest.raises(ck.CheckpointError, match=r"mobilenetv2 \(norm bn, 1000 classes\).*missing"):
        load_init_weights(build_model(config_from_dict({"model": {"name": "resnet18"}})), out)
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        load_init_weights(other, tmp_path / "nope.pth")
