"""Attentive Normalization (AN): a standardizer followed by an attention-weighted mixture of K affine transforms.

Reference: X. Li, W. Sun and T. Wu, "Attentive Normalization", ECCV 2020 (arXiv 1908.01259). The maths and
the initialisation follow docs/AN.md section 1, which records what the authors' ImageNet code computes:

    x_hat  = standardize(x)                                    # BN(affine=False) or GN(affine=False)
    s[n,c] = mean_hw(x)[n,c] / sqrt(var_hw(x)[n,c] + 1e-3)      # from the RAW input; var is unbiased
    lam    = act(BN_K(W s))                                    # W: K x C, no bias; act = hard-sigmoid
    y      = (lam @ Gamma)[n,c] * x_hat + (lam @ B)[n,c]       # Gamma, B: K x C

What is ours: the module is built by composition (``norm`` standardizer submodule, ``attention`` submodule,
``mixture_weight``/``mixture_bias`` parameters) instead of subclassing BatchNorm2d, so generic BN tools
(SyncBN converters, ``isinstance(m, _BatchNorm)`` freezing rules, ``.weight`` zero-init) cannot silently drop
the mixture; the mixture parameters are deliberately not called ``weight``/``bias`` because they are K x C,
not C. The statistics, attention and mixture run in float32 under autocast and the output is cast back to
the input dtype. The forward reads the input once for statistics and once for the output (see
:mod:`an.functional`). ``sigmoid``/``softmax`` attention are the spec's modes 5 and 6.

Edge case (ours): when H*W == 1 the unbiased variance over (H, W) is undefined (0/0); we use 0 there, so the
descriptor is ``s = mean / sqrt(1e-3)``. The BN over the K logits removes that constant scale in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from an.checks import check_choice, check_int
from an.functional import ChannelStatsForward, hw_unbiased, mixture_affine, standardize_affine, unbias_factor
from an.standardize import BatchStandardize2d, GroupStandardize2d, StandardizedAffine

__all__ = [
    "ATTENTION_MODES",
    "DEFAULT_ATTENTION",
    "DEFAULT_GROUPS",
    "DEFAULT_K",
    "AttentiveBatchNorm2d",
    "AttentiveGroupNorm2d",
    "AttentiveNorm2d",
    "MixtureAttention",
]

ATTENTION_MODES = ("hsigmoid", "sigmoid", "softmax")
DEFAULT_ATTENTION = "hsigmoid"  # the paper's (the official code's attention mode 2)
DEFAULT_K = 10  # the paper's K for the first two ResNet/DenseNet/AOGNet stages
DEFAULT_GROUPS = 32  # GroupNorm groups (Wu and He's default; the official ResNet configs' norm_groups)


class MixtureAttention(nn.Module):
    """The attention branch of AN: per-sample weights ``lam`` of shape (N, K) for the K affine transforms.

    ``s = mean / sqrt(var + eps)`` (per sample and channel) -> bias-free 1x1 conv C->K -> BatchNorm over the
    K logits -> activation. Register a forward hook on this module to capture ``lam`` (its output).

    Args:
        num_features: Channels C of the normalized tensor.
        k: Number of mixture components K.
        mode: ``'hsigmoid'`` (relu6(t + 3) / 6, the paper's), ``'sigmoid'`` or ``'softmax'`` (over K).
        eps: Added to the variance in the descriptor (1e-3 in the reference code).
    """

    def __init__(
        self,
        num_features: int,
        k: int = DEFAULT_K,
        mode: str = DEFAULT_ATTENTION,
        eps: float = 1e-3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.k = check_int("AttentiveNorm", "k (number of mixture components)", k)
        self.mode = check_choice("AttentiveNorm", "attention", mode, ATTENTION_MODES)
        self.conv = nn.Conv2d(num_features, k, kernel_size=1, bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(k, device=device, dtype=dtype)  # BN over the K logits, viewed as (N, K, 1, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal conv (fan_out, ReLU gain: std sqrt(2/K)); BN weight 1, bias 0."""
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        self.bn.reset_parameters()
        self.bn.reset_running_stats()

    def forward(self, mean: Tensor, var: Tensor) -> Tensor:
        """Attention weights from the raw input's per-(n, c) statistics.

        Args:
            mean: Per-(n, c) mean over (H, W), shape (N, C).
            var: Per-(n, c) unbiased variance over (H, W), shape (N, C).

        Returns:
            ``lam`` of shape (N, K), in the dtype of ``mean``.
        """
        s = mean * torch.rsqrt(var + self.eps)
        z = F.linear(s, self.conv.weight.flatten(1).to(s.dtype))
        z = self.bn(z[:, :, None, None]).flatten(1)
        if self.mode == "hsigmoid":  # the official formula: F.hardsigmoid's backward uses a float32 1/6
            return F.relu6(z + 3.0) / 6.0
        return torch.sigmoid(z) if self.mode == "sigmoid" else torch.softmax(z, dim=1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, k={self.k}, mode={self.mode!r}"


class AttentiveNorm2d(ChannelStatsForward, StandardizedAffine, nn.Module):
    """Attentive Normalization around any affine-free standardizer (use the two subclasses below).

    Submodules and parameters (names are part of the checkpoint format):

    - ``norm``: the standardizer (:class:`~an.standardize.BatchStandardize2d` /
      :class:`~an.standardize.GroupStandardize2d`: affine-free BN / GN that builders' init loops leave alone).
    - ``attention``: :class:`MixtureAttention`; its output is ``lam`` (N, K).
    - ``mixture_weight`` (K, C): Gamma, init N(1, 0.1^2). ``mixture_bias`` (K, C): B, init N(0, 0.1^2).

    Parameter count: 2KC (Gamma, B) + KC (attention conv) + 2K (attention-BN affine).

    ``weight`` and ``bias`` are None: AN has no per-channel affine (its affine is the K x C mixture), so model
    init code that tests ``norm.weight is not None`` before touching it (torchvision's ``zero_init_residual``,
    timm's ``zero_init_last``) leaves AN alone; zero-init AN with :func:`an.zero_init_`.

    The forward runs one of two formulations of the same function: the eager one (one statistics pass, one output
    pass, custom autograd; :mod:`an.functional`) and, when the layer is compiled by TorchScript, traced by
    ``torch.jit.trace`` or ``torch.fx``, or exported by ``torch.export``, plain differentiable torch ops
    (:meth:`forward_plain`).

    Args:
        num_features: Channels C.
        norm: The standardizer module.
        k: Number of mixture components K.
        attention: Attention activation, one of ``ATTENTION_MODES``.
        device: Device of the parameters and buffers.
        dtype: Dtype of the floating-point parameters and buffers.
    """

    weight: None = None
    bias: None = None

    def __init__(
        self,
        num_features: int,
        norm: nn.Module,
        k: int = DEFAULT_K,
        attention: str = DEFAULT_ATTENTION,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.norm = norm
        self.attention = MixtureAttention(num_features, k, attention, device=device, dtype=dtype)
        self.mixture_weight = nn.Parameter(torch.empty(k, num_features, device=device, dtype=dtype))
        self.mixture_bias = nn.Parameter(torch.empty(k, num_features, device=device, dtype=dtype))
        self.reset_mixture()

    @property
    def k(self) -> int:
        """Number of mixture components K."""
        return self.attention.k

    def reset_mixture(self) -> None:
        """Gamma ~ N(1, 0.1^2), B ~ N(0, 0.1^2), as in the reference code."""
        nn.init.normal_(self.mixture_weight, 1.0, 0.1)
        nn.init.normal_(self.mixture_bias, 0.0, 0.1)

    def reset_parameters(self) -> None:
        """Re-initialise the mixture, the attention branch and the standardizer's running statistics."""
        self.reset_mixture()
        self.attention.reset_parameters()
        if hasattr(self.norm, "reset_running_stats"):
            self.norm.reset_running_stats()

    @torch.no_grad()
    def zero_init_(self) -> None:
        """Gamma = B = 0, so the layer outputs exactly zero (zero-init of a residual branch's last norm)."""
        self.mixture_weight.zero_()
        self.mixture_bias.zero_()

    def attentive_affine(self, mean: Tensor, var: Tensor, hw: int) -> tuple[Tensor, Tensor]:
        """Per-(n, c) ``(scale, shift) = (lam @ Gamma, lam @ B)`` with ``lam`` the attention (a module call: its
        hooks fire) on the raw input's per-(n, c) ``mean`` and biased ``var`` over ``hw`` positions."""
        lam = self.attention(mean, hw_unbiased(var, hw))  # unbiased; 0 at 1x1
        return mixture_affine(lam, self.mixture_weight, self.mixture_bias)

    def _forward_stats(self, xf: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """The eager forward (see :class:`~an.functional.ChannelStatsForward`)."""
        scale, shift = self.attentive_affine(mean, var, xf.shape[2] * xf.shape[3])
        return standardize_affine(self.norm, xf, mean, var, scale, shift)

    def forward_plain(self, x: Tensor) -> Tensor:
        """The forward in plain differentiable torch ops: what TorchScript, ``torch.jit.trace``, ``torch.fx`` and
        ``torch.export`` see (no custom autograd Function, no autocast switching, no Python-side checks).

        Statistics and mixture run in float32 for float16/bfloat16 inputs; the output has the input's dtype.
        H*W enters as a tensor, so traced and exported graphs stay valid at other input sizes.
        """
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 or float64
        var, mean = torch.var_mean(xf, dim=[2, 3], correction=0)
        lam = self.attention(mean, var * unbias_factor(xf))
        scale = lam @ self.mixture_weight.to(lam.dtype)
        shift = lam @ self.mixture_bias.to(lam.dtype)
        return self._standardize_affine(xf, scale, shift).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, k={self.k}, attention={self.attention.mode!r}"


class AttentiveBatchNorm2d(AttentiveNorm2d):
    """AN with BN standardization (the paper's "AN w/ BN"; factory name ``'an'``).

    Args:
        num_features: Channels C.
        k: Number of mixture components K (default 10).
        attention: ``'hsigmoid'`` (default), ``'sigmoid'`` or ``'softmax'``.
        eps: Epsilon of the standardizer BN.
        momentum: Momentum of the standardizer BN and of the attention BN (None = cumulative average).
        device: Device of the parameters and buffers.
        dtype: Dtype of the floating-point parameters and buffers.
    """

    def __init__(
        self,
        num_features: int,
        k: int = DEFAULT_K,
        attention: str = DEFAULT_ATTENTION,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        norm = BatchStandardize2d(num_features, eps, momentum, device=device, dtype=dtype)
        super().__init__(num_features, norm, k, attention, device=device, dtype=dtype)
        self.attention.bn.momentum = momentum


class AttentiveGroupNorm2d(AttentiveNorm2d):
    """AN with GroupNorm standardization (the paper's "AN w/ GN"; factory name ``'an_gn'``).

    The attention branch is the same as for AN w/ BN, including the BatchNorm over the K logits.

    Args:
        num_features: Channels C (must be divisible by ``groups``).
        k: Number of mixture components K (default 10).
        attention: ``'hsigmoid'`` (default), ``'sigmoid'`` or ``'softmax'``.
        groups: GroupNorm groups (default 32).
        eps: Epsilon of the GroupNorm.
        momentum: Momentum of the attention BN.
        device: Device of the parameters and buffers.
        dtype: Dtype of the floating-point parameters and buffers.
    """

    def __init__(
        self,
        num_features: int,
        k: int = DEFAULT_K,
        attention: str = DEFAULT_ATTENTION,
        groups: int = DEFAULT_GROUPS,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_groups("AttentiveGroupNorm", num_features, groups)
        norm = GroupStandardize2d(groups, num_features, eps)
        super().__init__(num_features, norm, k, attention, device=device, dtype=dtype)
        self.attention.bn.momentum = momentum


def check_groups(layer: str, num_features: int, groups: int) -> None:
    """Raises ValueError unless ``groups`` is a positive integer dividing ``num_features``."""
    check_int(layer, "groups", groups)
    if num_features % groups:
        raise ValueError(
            f"{layer}: {num_features} channels cannot be split into {groups} groups; "
            f"choose a group count that divides {num_features} (e.g. pass groups=...)"
        )
