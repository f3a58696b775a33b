"""Squeeze-and-Excitation (SE) channel attention.

Reference: J. Hu, L. Shen and G. Sun, "Squeeze-and-Excitation Networks", CVPR 2018. ``s = sigmoid(W2 relu(W1
GAP(u)))`` with W1: C -> C/r, W2: C/r -> C, output ``u * s``. The FCs are 1x1 convolutions so a model's
conv init applies to them. ``bias=False`` gives the bias-free variant (SE-ResNet-50: 28.09M parameters with
biased FCs, 28.07M without; ``docs/AN.md`` section 8). Placement in a block is the backbone's business.
"""

from __future__ import annotations

from torch import Tensor, nn

from an.checks import check_int

__all__ = ["SqueezeExcite"]


class SqueezeExcite(nn.Module):
    """SE block: global average pool -> FC C->C/r -> ReLU -> FC C/r->C -> sigmoid -> channel scale.

    Args:
        channels: Channels C.
        reduction: Reduction ratio r; the hidden width is ``max(1, C // r)``.
        bias: Whether the two FCs have biases.
    """

    def __init__(self, channels: int, reduction: int = 16, bias: bool = True) -> None:
        super().__init__()
        check_int("SqueezeExcite", "reduction", reduction)
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()
