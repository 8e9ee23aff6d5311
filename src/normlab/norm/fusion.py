"""Let a norm apply the activation that follows it, inside its own kernel.

A fused norm + activation saves one full read and write of the feature map. A norm that can do
this has a method ``absorb_activation(activation: nn.Module) -> bool``: it returns True if it
took ``activation`` over (it applies it itself from then on), False if it cannot (unsupported
activation, fusion switched off in its config). Norms without the method are never fused.

When the norm takes the activation over, the caller puts ``nn.Identity()`` where the activation
was. Activations have no parameters or buffers, so state dict keys do not change: a fused model
loads the checkpoints of the unfused one and the other way round.

Models use :func:`norm_and_activation` where they build a norm and its activation themselves and
:func:`fuse_norm_activations` on ``nn.Sequential`` stacks built elsewhere (torchvision's).
"""

from __future__ import annotations

from itertools import pairwise

from torch import nn

from normlab.norm.registry import NormLayer

# What fuse_norm_activations offers to a norm; the norm still decides which of them it supports.
ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.SiLU)


def activation_after(norm: nn.Module, activation: nn.Module) -> nn.Module:
    """The module to run after ``norm`` in ``activation``'s place: ``nn.Identity()`` if ``norm``
    absorbed the activation, else ``activation`` itself."""
    absorb = getattr(norm, "absorb_activation", None)
    if absorb is not None and absorb(activation):
        return nn.Identity()
    return activation


def norm_and_activation(
    norm_layer: NormLayer, num_features: int, activation: nn.Module
) -> tuple[nn.Module, nn.Module]:
    """Build ``norm_layer(num_features)`` and what has to follow it to apply ``activation``.

    Returns ``(norm, nn.Identity())`` if the norm absorbed the activation, else
    ``(norm, activation)``; either way, running the two in order equals norm then activation.
    """
    norm = norm_layer(num_features)
    return norm, activation_after(norm, activation)


def _runs_children_in_order(module: nn.Module) -> bool:
    # A Sequential subclass with its own forward may reorder children or reuse a norm's output.
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def fuse_norm_activations(model: nn.Module) -> int:
    """Fuse, in place, every norm followed by an activation in an ``nn.Sequential`` of ``model``.

    Only Sequentials are safe to rewrite: their order is the execution order, and a child's output
    feeds nothing but the next child. Sequentials at any depth are visited (``model`` included);
    an absorbed activation is replaced by ``nn.Identity()`` under the same name, so state dict keys
    stay the same. Returns the number of activations fused.
    """
    sequentials = [m for m in model.modules() if _runs_children_in_order(m)]
    fused = 0
    for sequential in sequentials:
        # Not named_children(): it skips repeats of a module, which would pair non-neighbours.
        for (_, norm), (name, activation) in pairwise(list(sequential._modules.items())):
            if not isinstance(activation, ACTIVATIONS):
                continue
            replacement = activation_after(norm, activation)
            if replacement is not activation:
                setattr(sequential, name, replacement)
                fused += 1
    return fused
