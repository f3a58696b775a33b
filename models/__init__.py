"""Backbones for Attentive Normalization experiments, behind one registry.

Usage::

    import models
    model = models.create_model("resnet50", norm="an", num_classes=1000)   # AN at bn2, K = [10, 10, 20, 20]
    models.list_models()        # aognet12m ... resnet50
    models.list_norm_types()    # ['bn', 'gn', 'sn', 'se', 'an', 'an_gn', 'iebn']

Options (``create_model(name, norm, num_classes, **options)``; an option set to None keeps the default):

- every model: ``norm_k`` (K per stage at the AN placement), ``an_attention`` ('hsigmoid'), ``an_impl``
  ('auto'), ``gn_groups`` (32), ``zero_init_last``, ``drop_rate``, ``in_chans`` (3), ``se_reduction`` (16),
  ``se_bias`` (True).
- ResNets: ``an_placement`` ('bn2' for bottlenecks, 'bn1' for basic blocks; 'bn1' | 'bn2' | 'bn3' | 'all'),
  ``deep_stem`` (False), ``avg_down`` (False), ``base_width`` (64); ``zero_init_last`` defaults to True and
  ``drop_rate`` (0) is dropout before the FC.
- MobileNetV2: ``width_mult`` (1.0); ``drop_rate`` 0.2 before the FC; ``norm_k`` has 7 entries.
- DenseNets: ``growth_rate`` (32), ``bn_size`` (4), ``num_init_features`` (64); ``drop_rate`` before the FC.
- AOGNets: ``filter_list``, ``blocks``, ``child_order`` ('official' | 'natural'); ``drop_rate`` is the
  Dropout2d of the node ops of stages 3-4 (0.1), or a list of 4 per-stage rates.

The same models are registered with timm as ``anorm_<name>`` (``timm.create_model('anorm_resnet50',
norm='an')``). Where each norm type goes, parameter counts and MACs: ``docs/MODELS.md``.
"""

from . import aognet, densenet, mobilenetv2, resnet
from ._registry import create_model, is_model, list_models, list_norm_types, model_entrypoint, register_model
from ._timm import TIMM_PREFIX, register_timm_models
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
    "list_norm_types",
    "mobilenetv2",
    "model_entrypoint",
    "register_model",
    "register_timm_models",
    "resnet",
]

register_timm_models()
