"""Regional compilation (``compile_regional=true``): ``torch.compile`` each repeated block of a
network on its own, in place, as PyTorch's regional compilation recipe does, instead of the whole
network at once.

Blocks of one kind run the same Python code, so Dynamo compiles it once and reuses that graph for
every block whose guards pass; blocks that differ only in their tensors' sizes share a second,
dynamic-shape graph after the first mismatch (automatic dynamic shapes). Warm-up then grows with
the number of kinds of block, not with depth. The code between blocks (stems, transitions'
pooling, heads' loss and post-processing) runs eagerly. Compiling in place
(``nn.Module.compile``) keeps the module tree, so state-dict keys stay those of the uncompiled
network.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import Conv2dNormActivation

from normlab.models.convnext import ConvNeXtBlock
from normlab.models.densenet import _DenseLayer, _Transition
from normlab.models.pix2pix import UnetSkipBlock

__all__ = ["REPEATED_BLOCKS", "compile_repeated_blocks", "repeated_blocks"]

# What a network repeats: DenseNet's dense layers and transitions, ConvNeXt's blocks, the ResNet
# blocks of RetinaNet's backbone, and the conv-norm-ReLU units of its FPN and head towers.
REPEATED_BLOCKS: tuple[type[nn.Module], ...] = (
    _DenseLayer,
    _Transition,
    ConvNeXtBlock,
    BasicBlock,
    Bottleneck,
    Conv2dNormActivation,
)


def repeated_blocks(network: nn.Module) -> list[nn.Module]:
    """The submodules of ``network`` that regional compilation compiles, outermost first, none
    inside another. U-Net levels nest (each holds the deeper ones), so a level contributes its
    own down and up paths, not itself."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if isinstance(module, REPEATED_BLOCKS):
            found.append(module)
            return
        if isinstance(module, UnetSkipBlock):
            found.extend((module.down, module.up))
            if module.inner is not None:
                visit(module.inner)
            return
        for child in module.children():
            visit(child)

    visit(network)
    return found


def compile_repeated_blocks(network: nn.Module, **options: Any) -> list[nn.Module]:
    """``block.compile(**options)`` for each of :func:`repeated_blocks`; a network that repeats
    nothing (the pix2pix discriminators) is small and is compiled whole. Returns what was
    compiled.

    Sets three of Dynamo's process-wide switches: by default a parameter's or buffer's shape is a
    constant of the graph, and blocks that differ in their channel counts (DenseNet's dense
    layers, one per input width) would each compile a graph of their own, past Dynamo's
    recompile limit (8) after which the rest run eagerly. With the switches off they share one
    dynamic-shape graph after the first mismatch (DenseNet-BC-40: 5 graphs for 20 blocks, not 10
    and eager ones)."""
    torch._dynamo.config.force_parameter_static_shapes = False
    torch._dynamo.config.force_nn_module_property_static_shapes = False
    blocks = repeated_blocks(network) or [network]
    # The U-Net's paths are nn.Sequentials, whose parameters Dynamo keeps static whatever the
    # switches say: they share one code object and recompile per shape, so the limit must let
    # every block compile rather than run the last ones eagerly.
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, len(blocks))
    for block in blocks:
        block.compile(**options)
    return blocks
