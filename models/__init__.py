"""Backbones for Attentive Normalization experiments, behind one registry.

Usage::

    import models
    model = models.create_model("resnet50", norm="an", num_classes=1000)   # AN at bn2, K = [10, 10, 20, 20]
    models.list_models()              # aognet12m ... resnet50
    models.model_options("resnet50")  # {option: (default, type)}: the model's keyword-only parameters

Options (``create_model(name, norm=..., **options)``) are the keyword-only parameters of the model's class, whose
defaults are the only defaults. Every model takes ``norm`` (a name from ``an.list_norms()``), ``num_classes``,
``norm_k`` (K per stage where the norm takes one), ``norm_kwargs`` (the norm's own options, e.g.
``{'attention': 'sigmoid', 'impl': 'fused', 'groups': 16}``), ``attn_layer`` (``'se'`` or None) with
``attn_kwargs``, and ``in_chans``; ResNets add ``norm_placement``, ``deep_stem``, ``avg_down``, ``base_width``,
``drop_rate``, ``zero_init_last``; MobileNetV2 ``width_mult``, ``drop_rate``, ``zero_init_last``; DenseNets
``growth_rate``, ``bn_size``, ``num_init_features``, ``drop_rate``; AOGNets ``filter_list``, ``blocks``,
``drop_rate``, ``child_order``, ``zero_init_last``. All take ``global_pool`` and, except DenseNet (no residual
branch), ``drop_path_rate`` (stochastic depth).

Every model has timm's model interface (``models/_backbone.py``): ``feature_info``, ``forward_features``,
``forward_head(x, pre_logits=...)``, ``forward_intermediates``, ``get_classifier``, ``reset_classifier``,
``num_classes``, ``num_features``, ``head_hidden_size``, ``set_grad_checkpointing``. Each (model, norm) pair is
registered with timm as ``anorm_<model>_<norm>`` (``timm.create_model('anorm_resnet50_an',
features_only=True)``), with a full ``pretrained_cfg``. Where each norm goes, parameter counts, MACs and the
feature taps: ``docs/MODELS.md``.
"""

from . import aognet, densenet, mobilenetv2, resnet
from ._registry import create_model, is_model, list_models, model_entrypoint, model_options, register_model
from ._timm import TIMM_PREFIX, register_timm_models, timm_name
from .stats import count_macs, count_params

__all__ = [
    "TIMM_PREFIX",
    "aognet",
    "count_macs",
    "count_params",
    "create_model",
    "densenet",
    "is_model",
    "list_models",
    "mobilenetv2",
    "model_entrypoint",
    "model_options",
    "register_model",
    "register_timm_models",
    "resnet",
    "timm_name",
]

register_timm_models()
