"""an.convert_norms (an/convert.py): AN and the other registered norms put into torchvision, timm and plain models.

The reference for the paper rule is our own backbones, whose placement and K per stage are pinned against the
paper's counts in tests/test_models.py: torchvision's ResNet-50 converted by the rule must have our AN
ResNet-50's parameter count and state-dict names and, with the same weights, compute the same function.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import an
import models
from tests.conftest import conv_bn_relu

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = torch.zeros(1, 3, 64, 64)  # example input for the paper rule's analysis pass (the default is 224 px)


def _an_layers(model: nn.Module) -> dict[str, an.AttentiveNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, an.AttentiveNorm2d)}


@pytest.mark.slow
def test_torchvision_resnet50_paper_rule_is_our_an_resnet50():
    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    report = an.convert_norms(tv, "an", example_input=SMALL)
    assert report.model is tv and len(report) == 16 and report.names == [n for n in _an_layers(tv)]
    assert all(n.endswith(".bn2") for n in report.names)
    assert {n.split(".")[0]: m.k for n, m in _an_layers(tv).items()} == {
        "layer1": 10,
        "layer2": 10,
        "layer3": 20,
        "layer4": 20,
    }
    assert [s[0] for s in report.stages] == [256, 512, 1024, 2048]
    assert sum(p.numel() for p in tv.parameters()) == 25_755_420  # the paper's AN ResNet-50 (BN: 25,557,032)
    ours = models.create_model("resnet50", "an")
    assert sum(p.numel() for p in ours.parameters()) == 25_755_420
    assert list(ours.state_dict()) == list(tv.state_dict())
    ours.load_state_dict(tv.state_dict(), strict=True)
    tv.double(), ours.double()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    for training in (True, False):
        tv.train(training), ours.train(training)
        torch.testing.assert_close(tv(x), ours(x), rtol=1e-10, atol=1e-10)
    for (name, a), (_, b) in zip(tv.named_buffers(), ours.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)  # same running-statistic updates

    # torchvision's create_feature_extractor (torch.fx) traces the converted model: same features, both modes.
    from torchvision.models.feature_extraction import create_feature_extractor

    nodes = {"layer2": "c3", "layer4": "c5"}
    for leaves in (None, an.fx_leaf_modules()):
        kwargs = {} if leaves is None else {"tracer_kwargs": {"leaf_modules": leaves}}
        fe = create_feature_extractor(copy.deepcopy(tv), nodes, **kwargs)
        an_nodes = [n for n in fe.graph.nodes if n.op == "call_module" and n.target.endswith("bn2")]
        assert len(an_nodes) == (0 if leaves is None else 16)  # traced through, or one node per AN layer
        for training in (False, True):
            ref = copy.deepcopy(tv).train(training)
            feats = {key: None for key in ("c3", "c5")}
            ref.layer2.register_forward_hook(lambda m, i, o, f=feats: f.__setitem__("c3", o))
            ref.layer4.register_forward_hook(lambda m, i, o, f=feats: f.__setitem__("c5", o))
            ref(x)
            out = fe.train(training)(x)
            for key in ("c3", "c5"):
                torch.testing.assert_close(out[key], feats[key], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("name", "count", "ks"),
    [
        ("resnet50", 16, [10] * 7 + [20] * 9),
        ("efficientnet_b0", 16, [5] * 8 + [10] * 8),
        ("mobilenetv3_large_100", 15, [5] * 6 + [10] * 9),
    ],
)
def test_timm_models_convert_and_train_a_step(name, count, ks):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    acts_before = {n: type(m.act) for n, m in model.named_modules() if hasattr(m, "act") and hasattr(m, "drop")}
    report = an.convert_norms(model, "an", example_input=SMALL)
    layers = _an_layers(model)
    assert len(report) == count == len(layers) and [m.k for m in layers.values()] == ks
    if name == "resnet50":
        assert all(n.endswith(".bn2") for n in report.names)
    else:  # the norm of each depthwise convolution; timm's norm+act layers keep their activation and drop
        for r in report.replaced:
            wrapper = model.get_submodule(r.name)
            assert isinstance(wrapper, an.NormAct2d) and type(wrapper.act) is acts_before[r.name]
            conv = model.get_submodule(r.name.rsplit(".", 1)[0]).conv_dw
            assert conv.groups == conv.in_channels > 1
    if name == "mobilenetv3_large_100":  # it mixes ReLU and hard-swish: each layer kept its own
        assert {type(model.get_submodule(n).act) for n in report.names} == {nn.ReLU, nn.Hardswish}
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "mixture" in n or "attention" in n}
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    for _ in range(2):  # two steps: timm's ResNet zero-inits bn3, so the branch (and AN in it) learns from step 2
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_model_without_batchnorm_is_reported_not_an_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU())
    state = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="has no BatchNorm layer"):
        report = an.convert_norms(model, "an")
    assert report.model is model and len(report) == 0 and report.kept == []
    assert "no BatchNorm layer; nothing was changed" in str(report)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


class _Block(nn.Module):
    def __init__(self, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(y + (x[:, :, :: self.conv2.stride[0], :: self.conv2.stride[0]]))


def _plain_model() -> nn.Sequential:
    """A user's model: a 3x3 stem and six residual blocks over three resolutions."""
    torch.manual_seed(0)
    return nn.Sequential(
        *conv_bn_relu(3, 16),
        *[_Block(16, 2 if i in (2, 4) else 1) for i in range(6)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def test_plain_model_paper_rule_where_and_k():
    model = _plain_model()
    report = an.convert_norms(model, "an", example_input=torch.zeros(1, 3, 32, 32))
    # The stem's 3x3 (the first convolution, outside any block) keeps BN; every block's bn2 becomes AN.
    assert report.names == [f"{i}.bn2" for i in range(3, 9)] and report.kept[0] == "1"
    assert [s for s in report.stages] == [(16, 32, 32), (16, 16, 16), (16, 8, 8)]
    assert [model.get_submodule(n).k for n in report.names] == [10, 10, 10, 10, 20, 20]  # 3 stages: 10, 10, 20
    out = an.convert_norms(_plain_model(), "an", k=[1, 2, 3], example_input=torch.zeros(1, 3, 32, 32))
    assert [r.options["k"] for r in out.replaced] == [1, 1, 2, 2, 3, 3] and [r.stage for r in out.replaced] == [
        0,
        0,
        1,
        1,
        2,
        2,
    ]
    with pytest.raises(ValueError, match="list of 3 integers"):
        an.convert_norms(_plain_model(), "an", k=[1, 2], example_input=torch.zeros(1, 3, 32, 32))
    # 'all', a pattern, a list of patterns, a predicate.
    assert len(an.convert_norms(_plain_model(), "an", "all", k=4)) == 13
    assert an.convert_norms(_plain_model(), "an", "*.bn1").names == [f"{i}.bn1" for i in range(3, 9)]
    assert len(an.convert_norms(_plain_model(), "an", ["1", "3.*"])) == 3
    pred = an.convert_norms(_plain_model(), "iebn", lambda name, m: m.num_features == 16 and name.startswith("4"))
    assert pred.names == ["4.bn1", "4.bn2"] and all(
        isinstance(pred.model.get_submodule(n), an.IEBatchNorm2d) for n in pred.names
    )
    assert len(an.convert_norms(_plain_model(), "sn")) == 13  # 'auto' is 'all' for norms that go everywhere
    with pytest.raises(ValueError, match=r"matches none of the model's 13 BatchNorm layers.*Did you mean 'paper'"):
        an.convert_norms(_plain_model(), "an", "papr")
    with pytest.raises(ValueError, match="Unknown norm 'ann'"):
        an.convert_norms(_plain_model(), "ann")
    with pytest.raises(TypeError, match="unexpected keyword"):
        an.convert_norms(_plain_model(), "an", attn="softmax")
    with pytest.raises(ValueError, match="'affine' must be one of"):
        an.convert_norms(_plain_model(), "an", affine="keep")


def test_outputs_and_state_carried_over():
    """norm='bn' is an exact copy; AN with softmax attention (weights summing to 1) and the BN's affine in every row
    computes exactly the BatchNorm's output in eval mode; hsigmoid rows are scaled by 2/K; affine='init' keeps the
    paper's init."""
    torch.manual_seed(0)
    ref = _plain_model()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.normal_(), m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0), m.num_batches_tracked.fill_(7)
    x = torch.randn(4, 3, 32, 32)
    copied = an.convert_norms(ref, "bn", inplace=False)
    assert (
        copied.model is not ref
        and len(copied) == 13
        and all(type(m) is not an.NormAct2d for m in copied.model.modules())
    )
    for training in (False, True):
        torch.testing.assert_close(copied.model.train(training)(x), copy.deepcopy(ref).train(training)(x))
    soft = an.convert_norms(ref, "an", "all", k=3, attention="softmax", inplace=False).model.eval()
    torch.testing.assert_close(soft(x), ref.eval()(x), rtol=1e-5, atol=1e-5)
    bn, layer = ref[4].bn2, soft[4].bn2
    assert torch.equal(layer.norm.running_mean, bn.running_mean) and int(layer.norm.num_batches_tracked) == 7
    hs = an.convert_norms(ref, "an", "all", k=4, inplace=False).model[4].bn2
    torch.testing.assert_close(hs.mixture_weight, (bn.weight / 2).expand(4, -1))
    torch.testing.assert_close(hs.mixture_bias, (bn.bias / 2).expand(4, -1))
    init = an.convert_norms(ref, "an", "all", k=20, affine="init", inplace=False).model[4].bn2
    assert abs(init.mixture_weight.mean().item() - 1.0) < 0.05 and torch.equal(init.norm.running_var, bn.running_var)
    for norm, options in (("sn", {}), ("iebn", {}), ("gn", {"groups": 4})):
        layer = an.convert_norms(ref, norm, inplace=False, **options).model[4].bn2
        assert torch.equal(layer.weight, bn.weight) and torch.equal(layer.bias, bn.bias), norm
        if norm != "gn":
            stats = layer.norm if norm == "iebn" else layer
            assert torch.equal(stats.running_mean, bn.running_mean) and torch.equal(stats.running_var, bn.running_var)


def test_copy_root_shared_meta_and_train_flags():
    bn = nn.BatchNorm2d(8).eval()
    out = an.convert_norms(bn, "an", "all", k=2)
    assert isinstance(out.model, an.AttentiveBatchNorm2d) and not out.model.training and out.names == [""]
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.Conv2d(4, 4, 1), shared)
    out = an.convert_norms(model, "gn", groups=2)
    assert model[1] is model[3] and isinstance(model[1], nn.GroupNorm) and len(out) == 1
    with torch.device("meta"):
        big = torchvision.models.resnet18()
    out = an.convert_norms(big, "an", example_input=torch.zeros(1, 3, 64, 64, device="meta"))
    assert len(out) == 16 and all(p.is_meta for p in big.parameters())
    model = torchvision.models.resnet18().float()
    model.layer1.eval()
    an.convert_norms(model, "an", "all", k=2)
    assert not model.layer1[0].bn1.training and model.layer2[0].bn1.training
    assert model.layer1[0].bn1.mixture_weight.dtype == torch.float32


def test_an_gn_mirrors_the_backbone_and_ours_are_not_entered():
    """'an_gn' puts GN at the other positions, as create_model(norm='an_gn') does (MobileNet widths fit groups)."""
    tv = torchvision.models.resnet50()
    an.convert_norms(tv, "an_gn", example_input=SMALL)
    with torch.device("meta"):
        ours = models.create_model("resnet50", "an_gn")
    norms = (nn.BatchNorm2d, nn.GroupNorm, an.AttentiveNorm2d, an.GroupStandardize2d)

    def kinds(m):
        return {n: (type(x).__name__, getattr(x, "k", None)) for n, x in m.named_modules() if isinstance(x, norms)}

    assert kinds(tv) == kinds(ours) and len(kinds(tv)) == 53 + 16 * 2
    mnv2 = torchvision.models.mobilenet_v2()
    report = an.convert_norms(mnv2, "an_gn", example_input=SMALL)
    assert len(report) == 52 and mnv2.features[3].conv[0][1].num_groups == 24  # 144 channels: 24 groups, not 32
    # Converting an AN model again leaves AN (and its attention BN) alone: only BNs outside our layers are seen.
    with torch.device("meta"):
        an_model = models.create_model("resnet50", "an")
    again = an.convert_norms(an_model, "an", "all", k=2)
    assert len(again) == 53 - 16 and not [n for n in again.names if "attention" in n or n.endswith(".norm")]
    assert sorted(m.k for m in _an_layers(an_model).values()) == [2] * 37 + [10] * 7 + [20] * 9


@pytest.mark.slow
def test_paper_rule_on_torchvision_mobilenet_v2_and_densenet121():
    """Depthwise norms with K per row as the paper (MobileNetV2), the pre-activation norm2 (DenseNet-121)."""
    mnv2 = torchvision.models.mobilenet_v2()
    report = an.convert_norms(mnv2, "an", example_input=SMALL)
    assert [m.k for m in _an_layers(mnv2).values()] == [5] * 10 + [10] * 7 and len(report.stages) == 7
    dense = torchvision.models.densenet121()
    report = an.convert_norms(dense, "an", example_input=SMALL)
    assert all(n.endswith(".norm2") for n in report.names)
    assert [m.k for m in _an_layers(dense).values()] == [10] * 18 + [20] * 40


def test_convert_sync_norm_after_conversion_keeps_timm_norm_act():
    model = timm.create_model("mobilenetv3_small_050", num_classes=3)
    an.convert_norms(model, "an", example_input=SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        synced = an.convert_sync_norm(model)
    kept = [m for m in synced.modules() if type(m).__name__ == "SyncBatchNormAct"]
    assert kept and all(hasattr(m, "act") for m in kept)
    assert all(type(m.norm.norm) is nn.SyncBatchNorm for m in synced.modules() if isinstance(m, an.NormAct2d))
