"""Our backbones inside torchvision's detection models and feature extractors, and ``torch.export`` of every model.

torchvision's ``IntermediateLayerGetter`` (behind ``BackboneWithFPN``) runs a model's children in registration
order, so a ResNet whose children are registered in another order than they run gives silently wrong features;
these tests compare what torchvision's wrappers compute with our own forward, in train and eval mode.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim, export

import an
import models
from tests.test_models import small
from tests.test_timm import calibrate

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import FasterRCNN  # noqa: E402
from torchvision.models.detection.backbone_utils import BackboneWithFPN  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

RETURN_LAYERS = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}


def fpn_backbone(model: nn.Module) -> BackboneWithFPN:
    """torchvision's FPN around our ResNet's layer1..layer4 (channels from ``feature_info``)."""
    channels = [f["num_chs"] for f in model.feature_info[1:]]
    return BackboneWithFPN(model, RETURN_LAYERS, channels, out_channels=32)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_children_in_torchvision_order(name):
    with torch.device("meta"):
        ref = getattr(torchvision.models, name)()
        ours = models.create_model(name, "an")
        deep = models.create_model(name, "an", deep_stem=True, avg_down=True)
        ours_bn = models.create_model(name, "bn")
    order = [n for n, _ in ref.named_children()]
    assert order == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    assert [n for n, _ in ours.named_children()] == order
    assert [n for n, _ in deep.named_children()] == order
    assert list(ours_bn.state_dict()) == list(ref.state_dict())  # names and their order: torchvision's


@pytest.mark.parametrize("options", [{}, {"deep_stem": True, "avg_down": True}])
def test_backbone_with_fpn_gives_our_stage_features(options):
    """IntermediateLayerGetter's layer1..4 outputs = forward_intermediates' taps 1-4, train and eval mode."""
    torch.manual_seed(0)
    model = models.create_model("resnet50", "an", zero_init_last=False, **small("resnet50"), **options)
    backbone = fpn_backbone(model)
    x = torch.randn(2, 3, 64, 64)
    for mode in ("train", "eval"):
        if mode == "eval":
            calibrate(model, x)
        backbone.train(mode == "train")
        with torch.no_grad():
            got = backbone.body(x)
            expected = model.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
            pyramid = backbone(x)
        assert list(got) == ["0", "1", "2", "3"]
        for (key, g), e in zip(got.items(), expected):
            torch.testing.assert_close(g, e, msg=f"{mode} level {key}")
        assert [p.shape[1] for p in pyramid.values()] == [32] * 5  # four levels + the pooled one


def test_faster_rcnn_trains_one_step_and_detects():
    """torchvision's Faster R-CNN (random weights, 2 classes, tiny images) with our AN ResNet-50 + FPN."""
    torch.manual_seed(0)
    backbone = fpn_backbone(models.create_model("resnet50", "an", zero_init_last=False, **small("resnet50")))
    detector = FasterRCNN(backbone, num_classes=2, min_size=64, max_size=96)
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 8.0, 30.0, 60.0], [32.0, 30.0, 60.0, 70.0]]), "labels": torch.tensor([1, 1])},
    ]
    before = {n: p.detach().clone() for n, p in detector.backbone.body.named_parameters()}
    detector.train()
    losses = detector(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    opt = torch.optim.SGD(detector.parameters(), lr=0.01, momentum=0.9)
    loss.backward()
    an_grads = [p.grad for n, p in detector.backbone.body.named_parameters() if "mixture" in n]
    assert an_grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in an_grads)
    opt.step()
    changed = [n for n, p in detector.backbone.body.named_parameters() if not torch.equal(p, before[n])]
    assert any("mixture_weight" in n for n in changed) and any(n.startswith("conv1") for n in changed)

    detector.eval()
    with torch.no_grad():
        out = detector(images)
    assert len(out) == 2
    for o, img in zip(out, images):
        assert set(o) == {"boxes", "labels", "scores"} and o["boxes"].shape[1:] == (4,)
        assert torch.isfinite(o["boxes"]).all()
        if len(o["boxes"]):  # boxes are in the input image's coordinates
            assert (o["boxes"][:, 2] <= img.shape[2] + 1e-3).all() and (o["boxes"][:, 3] <= img.shape[1] + 1e-3).all()


@pytest.mark.filterwarnings("ignore:The nodes obtained by tracing")
@pytest.mark.parametrize("norm", ["bn", "an"])
@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2", "densenet121", "aognet12m"])
def test_fx_feature_extractor_takes_feature_info_names(name, norm):
    """torchvision's create_feature_extractor (torch.fx) returns forward_intermediates' features for the
    ``feature_info`` module names, with BN and with AN traced through, in train and eval mode (float64: the
    traced graph may order AN's arithmetic differently, so float32 differs in rounding only)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = models.create_model(name, norm, **small(name, drop_rate=0.0)).double()
    extractor = create_feature_extractor(model, return_nodes=[f["module"] for f in model.feature_info])
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for training in (True, False):
        model.train(training), extractor.train(training)
        with torch.no_grad():
            got = list(extractor(x).values())
            expected = model.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def _export_check(model: nn.Module) -> None:
    """torch.export with a dynamic batch; the exported program equals eager at other batch sizes.

    In float64: the exported graph may order AN's arithmetic differently (its eval-mode standardization folded
    into the per-sample affine), and an untrained deep network amplifies float32 rounding to 1e-4 relative.
    """
    model = model.double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    calibrate(model, x)
    program = export(model, (x,), dynamic_shapes={"x": {0: Dim("batch")}})
    exported = program.module()
    for n in (3, 5):
        xb = torch.randn(n, 3, 32, 32, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(exported(xb), model(xb), rtol=1e-9, atol=1e-9)


# One export per norm on the smallest model, and one per block type with AN: the deeper variants (resnet34/101/152,
# densenet169/201, aognet40m) repeat the same blocks more often and take minutes to trace on a 2-core machine.
EXPORTED = ["resnet18", "resnet50", "mobilenetv2", "densenet121", "aognet12m"]


@pytest.mark.parametrize(
    ("norm", "extra"),
    # resnet18 with AN is exported by test_export_every_model
    [(n, {}) for n in an.list_norms() if n != "an"] + [("bn", {"attn_layer": "se", "attn_kwargs": {"reduction": 4}})],
)
def test_export_every_norm(norm, extra):
    torch.manual_seed(0)
    _export_check(models.create_model("resnet18", norm, num_classes=5, **small("resnet18"), **extra))


@pytest.mark.parametrize("name", EXPORTED)
def test_export_every_model(name):
    torch.manual_seed(0)
    _export_check(models.create_model(name, "an", num_classes=5, **small(name)))


def test_exported_models_cover_every_registered_model():
    """Every registered model is built from module types that the exported ones contain (with AN): a new model
    with a new kind of block fails here until it joins EXPORTED."""

    def module_types(name: str) -> set[type]:
        with torch.device("meta"):
            return {type(m) for m in models.create_model(name, "an", num_classes=5, **small(name)).modules()}

    covered = set().union(*(module_types(n) for n in EXPORTED))
    for name in models.list_models():
        assert module_types(name) <= covered, f"{name}: {module_types(name) - covered} never exported"
