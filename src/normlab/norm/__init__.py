"""The norm registry used by every model: ``build_norm``, ``register_norm``, ``convert_norms``,
and the norm + activation fusion hook (``norm_and_activation``, ``fuse_norm_activations``).

Models never import a norm class; they take a spec (a name, a mapping or a callable) and call
``get_norm_layer(spec)`` to get a factory ``num_features -> nn.Module``.
"""

from normlab.norm import builtin as _builtin  # noqa: F401  (registers the built-in norms)
from normlab.norm.convert import convert_norms, norm_channels
from normlab.norm.fusion import activation_after, fuse_norm_activations, norm_and_activation
from normlab.norm.layers import LayerNorm2d, NoNorm
from normlab.norm.registry import (
    NORMS,
    NormLayer,
    NormSpec,
    build_norm,
    get_norm_layer,
    norm_name,
    register_norm,
)
from normlab.norm.sync import SyncBatchNorm

__all__ = [
    "NORMS",
    "LayerNorm2d",
    "NoNorm",
    "NormLayer",
    "NormSpec",
    "SyncBatchNorm",
    "activation_after",
    "build_norm",
    "convert_norms",
    "fuse_norm_activations",
    "get_norm_layer",
    "norm_and_activation",
    "norm_channels",
    "norm_name",
    "register_norm",
]
