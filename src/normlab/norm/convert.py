"""Swap every norm layer of an existing model for another kind, keeping what both can hold."""

from __future__ import annotations

import logging

import torch
from torch import nn

from normlab.errors import ConfigError
from normlab.norm.registry import NormSpec, get_norm_layer, norm_name
from normlab.norm.standardize import standardize_conv_weights
from normlab.norm.traits import fused_activation, layer_traits, norm_channels

log = logging.getLogger(__name__)

_STATE_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _floating_tensor(module: nn.Module) -> torch.Tensor | None:
    """A floating-point parameter or buffer: the device and dtype the replacement must have."""
    tensors = [*module.parameters(), *module.buffers()]
    return next((t for t in tensors if t.is_floating_point()), None)


@torch.no_grad()
def _transfer_state(source: nn.Module, target: nn.Module) -> None:
    for name in _STATE_NAMES:
        src, dst = getattr(source, name, None), getattr(target, name, None)
        if (
            isinstance(src, torch.Tensor)
            and isinstance(dst, torch.Tensor)
            and src.shape == dst.shape
        ):
            dst.copy_(src)


def _check_fused_activations_survive(model: nn.Module, norm_layer, spec: NormSpec) -> None:
    for name, module in model.named_modules():
        channels, activation = norm_channels(module), fused_activation(module)
        if channels is None or activation is None:
            continue
        absorb = getattr(norm_layer(channels), "absorb_activation", None)
        if absorb is None or not absorb(activation):
            raise ConfigError(
                f"{name or 'the model'} applies a fused {activation} that norm {spec!r} cannot "
                "take over, so converting would drop it; build the model with the new norm and "
                "load this state dict instead (the keys are the same)"
            )


def _includes_a_rectifier(norm: nn.Module) -> bool:
    """Whether ``norm`` applies its own activation (FRN's TLU, EvoNorm), which a model built with
    it lets replace the ReLU after the norm. Asked of the traits first: a norm that only fuses an
    activation it is handed (cuda_bn) would take the ReLU over if asked."""
    traits = layer_traits(norm)
    return traits is not None and traits.absorbs_activation and norm.absorb_activation(nn.ReLU())


def _convert(module: nn.Module, norm_layer, kept_activations: list[nn.Module]) -> nn.Module:
    channels = norm_channels(module)
    if channels is not None:
        replacement = norm_layer(channels)
        activation = fused_activation(module)
        if activation is not None:
            replacement.absorb_activation(activation)
        elif _includes_a_rectifier(replacement):
            kept_activations.append(replacement)
        reference = _floating_tensor(module)
        if reference is not None:
            replacement.to(device=reference.device, dtype=reference.dtype)
        _transfer_state(module, replacement)
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        converted = _convert(child, norm_layer, kept_activations)
        if converted is not child:
            setattr(module, name, converted)
    return module


def convert_norms(model: nn.Module, spec: NormSpec) -> nn.Module:
    """Replace every 2-D norm layer in ``model`` with ``spec``'s kind and return the model.

    Affine weights and running statistics are copied wherever both layers have them with equal
    shapes; the model is changed in place (except when ``model`` is itself a norm layer, in which
    case the returned module is its replacement). A norm with a fused activation (cuda_bn) passes
    it on to its replacement; if the new kind cannot apply it, nothing is changed and a
    ConfigError says so. With ``weight_standardization`` in ``spec``, the convolution before each
    new norm is then standardised (``normlab.norm.standardize``); without it, standardised
    convolutions stay as they are.

    A norm that includes its activation (``frn`` with TLU, ``evonorm_b0``, ``evonorm_s0``) cannot
    take over the activations the model applies after its norms (they are in the model's
    ``forward``): both then apply, which a warning says. A model built with that norm does
    replace them.
    """
    norm_layer = get_norm_layer(spec)
    _check_fused_activations_survive(model, norm_layer, spec)
    kept_activations: list[nn.Module] = []
    converted = _convert(model, norm_layer, kept_activations)
    if kept_activations:
        log.warning(
            "convert_norms: %d %s layers apply their own activation, and the model's activations "
            "after them stay, so both apply; build the model with norm=%s to have the norm "
            "replace them",
            len(kept_activations),
            type(kept_activations[0]).__name__,
            norm_name(spec),
        )
    standardize_conv_weights(converted)
    return converted
