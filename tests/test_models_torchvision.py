"""Our BN backbones compute torchvision's functions: same weights in, same logits and gradients out (float64).

The state-dict names and shapes are checked in tests/test_models.py; here torchvision's randomly initialised
weights are loaded into our model and both are run on the same input, in training mode (batch statistics,
running-statistic updates) and in evaluation mode.
"""

from __future__ import annotations

import pytest
import torch

from models import create_model

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(
    ("name", "tv_name"),
    [
        ("resnet18", "resnet18"),
        ("resnet50", "resnet50"),
        ("densenet121", "densenet121"),
        ("mobilenetv2", "mobilenet_v2"),
    ],
)
def test_bn_models_compute_torchvision_functions(name, tv_name):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, tv_name)(num_classes=7).double()
    ours = create_model(name, "bn", num_classes=7).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    for m in (ref, ours):  # dropout off, everything else in training mode
        m.train()
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.eval()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    torch.testing.assert_close(yo, yr, rtol=1e-12, atol=1e-12)
    yr.square().sum().backward()
    yo.square().sum().backward()
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-10, atol=1e-12)
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[n], rtol=1e-10, atol=1e-12, msg=n)
    buffers_ref = dict(ref.named_buffers())
    for n, b in ours.named_buffers():  # running statistics updated identically
        torch.testing.assert_close(b, buffers_ref[n], rtol=1e-12, atol=1e-12, msg=n)
    ref.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
