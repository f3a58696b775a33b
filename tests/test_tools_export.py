"""tools/export.py: a small AN checkpoint exported as TorchScript, torch.export and ONNX, each file loaded back and
compared with the PyTorch model (the tool's own check, and an independent one here)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from engine import checkpoint as ck
from engine.config import Config
from models import create_model
from tools import export as ex

pytestmark = pytest.mark.usefixtures("single_thread")

OPTIONS = {"base_width": 8}
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
HAS_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("resnet18", "an", num_classes=5, **OPTIONS)
    with torch.no_grad():  # trained-looking state: every parameter and running statistic away from its init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = Config()
    cfg.model.name, cfg.model.norm, cfg.model.num_classes = "resnet18", "an", 5
    cfg.model.options = dict(OPTIONS)
    cfg.data.img_size = 32
    ema = {f"module.{k}": v for k, v in _model(1).state_dict().items()}
    path = tmp_path_factory.mktemp("export") / "best.pth"
    ck.save_atomic({"model": _model(0).state_dict(), "ema": ema, "config": cfg.to_dict(), "epoch": 3}, path)
    return path


def _run(capsys, *argv) -> tuple[int, dict | None, str]:
    code = ex.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if out.strip() else None), err


def _independent_check(fmt: str, path, ema: bool = False) -> None:
    """Our own comparison on a batch of 5: the file's output against a freshly built model with the weights."""
    ref = _model(1 if ema else 0).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = ref(x)
    got = ex.run_exported(fmt, path, x)
    torch.testing.assert_close(got.float(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("fmt", "extra", "method"),
    # auto: our backbones' timm-style trunk (modules called by path) is not TorchScript, so auto traces
    [("torchscript", [], "trace"), ("torchscript", ["--jit", "trace"], "trace"), ("exported", [], "torch.export")],
)
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_torchscript_and_torch_export(checkpoint, tmp_path, capsys, fmt, extra, method):
    out = tmp_path / f"model.{fmt}"
    code, record, err = _run(capsys, checkpoint, out, "--format", fmt, *extra)
    assert code == 0, err
    assert record["ok"] and record["method"] == method and record["check_batch"] == 3 and record["rel_err"] < 1e-5
    assert record["model"] == "resnet18" and record["norm"] == "an" and record["input_shape"] == [-1, 3, 32, 32]
    _independent_check(fmt, out)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_forced_script_of_a_backbone_is_a_one_paragraph_error(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.pt"
    code, record, err = _run(capsys, checkpoint, out, "--format", "torchscript", "--jit", "script")
    assert code == 2 and record is None and not out.exists()
    message = err.strip()
    assert message.startswith("Error: torch.jit.script cannot compile this model") and "--jit trace" in message
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_ema_weights_and_a_failing_check(checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ema.pt"
    code, record, err = _run(capsys, checkpoint, out, "--format", "torchscript", "--ema")
    assert code == 0 and record["ema"], err
    _independent_check("torchscript", out, ema=True)
    # The check can fail: an exported model that is off by 1% of the output is refused with exit status 1.
    real = ex.run_exported
    monkeypatch.setattr(ex, "run_exported", lambda fmt, path, x: real(fmt, path, x) * 1.01)
    code, record, err = _run(capsys, checkpoint, out, "--format", "torchscript")
    assert code == ex.EXIT_CHECK_FAILED and not record["ok"] and "differs from PyTorch" in err


def test_missing_onnx_packages_are_a_clear_error(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    code, record, err = _run(capsys, checkpoint, tmp_path / "m.onnx", "--format", "onnx")
    assert code == ex.EXIT_ERROR and record is None
    assert "needs the 'onnx' package" in err and "pip install onnx onnxscript onnxruntime" in err
    assert not (tmp_path / "m.onnx").exists()


def test_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    code, _, err = _run(capsys, tmp_path / "nope.pth", tmp_path / "m.pt", "--format", "torchscript")
    assert code == ex.EXIT_ERROR and "does not exist" in err


@pytest.mark.skipif(not HAS_ONNX, reason="onnx and onnxruntime are not installed (requirements-dev.txt)")
@pytest.mark.parametrize(
    "exporter",
    [
        pytest.param(
            "dynamo", marks=[pytest.mark.slow, pytest.mark.skipif(not HAS_ONNXSCRIPT, reason="needs onnxscript")]
        ),
        "torchscript",
    ],
)
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
def test_onnx_with_onnxruntime(checkpoint, tmp_path, capsys, exporter):
    out = tmp_path / "model.onnx"
    code, record, err = _run(capsys, checkpoint, out, "--format", "onnx", "--onnx-exporter", exporter)
    assert code == 0, err
    assert record["ok"] and record["method"] == f"onnx-{exporter}" and record["rel_err"] < 1e-5
    _independent_check("onnx", out)
    import onnx

    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch is dynamic
    assert len(list(model.graph.output)) == 1  # one output: the logits
