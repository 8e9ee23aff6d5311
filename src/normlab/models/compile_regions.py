"""Regional compilation (``compile_regional=true``): ``torch.compile`` each repeated block of a
network on its own, in place, as PyTorch's regional compilation recipe does, instead of the whole
network at once.

Blocks of one kind run the same Python code, so Dynamo compiles it once and reuses that graph for
every block whose guards pass: the same parameter and input shapes (ConvNeXt's blocks within a
stage, ResNet's blocks after a stage's first, the head towers' units on one FPN level). The code between blocks (stems, transitions'
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

    Shapes are static (``dynamic=False`` unless ``options`` say otherwise): blocks of one kind
    that differ in size would otherwise share a dynamic-shape graph after the first mismatch, and
    inductor (torch 2.14) fails to compile ConvNeXt-atto's second stage that way. Each shape of a
    block's parameters and input is then a graph of its own (DenseNet's dense layers, one per
    input width; the U-Net's levels; a head unit per FPN level), in training and again in eval
    mode, and all of them share the block class's code object: Dynamo's recompile limit
    (process-wide, 8 by default) is raised to four times the number of blocks, so that no block
    runs eagerly past it."""
    blocks = repeated_blocks(network) or [network]
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 4 * len(blocks))
    options = {"dynamic": False, **options}
    for block in blocks:
        block.compile(**options)
    return blocks
