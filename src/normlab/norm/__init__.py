"""The norm registry used by every model: ``build_norm``, ``register_norm`` with each norm's
``NormTraits``, ``convert_norms``, the norm + activation fusion hook (``norm_and_activation``,
``fuse_norm_activations``), and what a module is as a norm, read from those traits (``is_norm``,
``norm_channels``, ``has_running_statistics``, ``norm_traits``), and evaluation with each
batch's own statistics (``batch_statistics``).

Importing it imports torch, torchvision and timm, never Lightning or OmegaConf.

Models never import a norm class; they take a spec (a name, a mapping or a callable) and call
``get_norm_layer(spec)`` to get a factory ``num_features -> nn.Module``.
"""

from timm.layers import LayerNorm2d

from normlab.norm import small_batch as _small_batch  # noqa: F401  (registers brn, ghost_bn, ...)
from normlab.norm.builtin import Float32LayerNorm2d, NoNorm  # importing it registers the norms
from normlab.norm.convert import convert_norms
from normlab.norm.fusion import activation_after, fuse_norm_activations, norm_and_activation
from normlab.norm.inference_statistics import NORM_STATISTICS, batch_statistics
from normlab.norm.registry import (
    NORMS,
    NormLayer,
    NormSpec,
    build_norm,
    get_norm_layer,
    norm_name,
    norm_traits,
    register_norm,
)
from normlab.norm.small_batch import (
    BatchRenorm2d,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm2d,
    GhostBatchNorm2d,
    RMSNorm2d,
)
from normlab.norm.standardize import bake_standardized_weights, standardize_conv_weights
from normlab.norm.sync_batchnorm import SyncBatchNorm
from normlab.norm.traits import (
    NormTraits,
    has_running_statistics,
    is_norm,
    is_norm_layer,
    layer_traits,
    norm_channels,
    normalises_with_stored_statistics,
    register_norm_class,
    training_input_problem,
)

__all__ = [
    "NORMS",
    "NORM_STATISTICS",
    "BatchRenorm2d",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm2d",
    "Float32LayerNorm2d",
    "GhostBatchNorm2d",
    "LayerNorm2d",
    "NoNorm",
    "NormLayer",
    "NormSpec",
    "NormTraits",
    "RMSNorm2d",
    "SyncBatchNorm",
    "activation_after",
    "bake_standardized_weights",
    "batch_statistics",
    "build_norm",
    "convert_norms",
    "fuse_norm_activations",
    "get_norm_layer",
    "has_running_statistics",
    "is_norm",
    "is_norm_layer",
    "layer_traits",
    "norm_and_activation",
    "norm_channels",
    "norm_name",
    "norm_traits",
    "normalises_with_stored_statistics",
    "register_norm",
    "register_norm_class",
    "standardize_conv_weights",
    "training_input_problem",
]
