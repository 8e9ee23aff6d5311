"""The networks of pix2pix (Isola et al., "Image-to-Image Translation with Conditional
Adversarial Networks", 2017) with a pluggable norm.

The architectures follow the reference implementation (pytorch-CycleGAN-and-pix2pix): the
recursive U-Net generator (``unet_256`` is ``num_downs=8``, ``unet_128`` is 7), the 70×70
PatchGAN discriminator (``basic``, ``n_layers=3``) and the 1×1 PixelGAN. With ``norm="bn"`` the
parameter counts equal the reference's (54,413,955 / 41,828,995 / 2,768,705). Module names are
our own, so the reference's state dicts do not load directly.

Two of the reference's rules are generalised from BatchNorm/InstanceNorm classes to any norm of the
registry:

- Conv bias. The reference gives its convolutions ``bias=use_bias`` with ``use_bias`` true only for
  InstanceNorm (whose pix2pix form has no affine shift). Here ``use_bias`` is "the norm has no shift
  of its own" (:func:`norm_has_shift`), decided once per network like the reference's flag, and
  applied to exactly the convolutions the reference applies it to. Most are followed by a norm; three
  are not (the U-Net's outermost and innermost down convolutions, PixelGAN's last convolution), and
  they keep the reference's choice so that parameter counts match.
- Init. The reference initialises norm weights N(1, gain) only for classes whose name contains
  "BatchNorm2d", so SyncBatchNorm, GroupNorm, LayerNorm and custom norms silently keep weight 1.
  :func:`init_weights` recognises norm layers by their registry traits
  (:func:`normlab.norm.is_norm_layer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from normlab.errors import ConfigError
from normlab.norm import (
    NormLayer,
    NormSpec,
    activation_after,
    fuse_norm_activations,
    get_norm_layer,
    is_norm_layer,
    standardize_conv_weights,
)
from normlab.ranges import COUNT, NON_NEGATIVE, ArgumentError, check_choice, checked_arguments

__all__ = [
    "INIT_TYPES",
    "MIN_NUM_DOWNS",
    "PatchDiscriminator",
    "PixelDiscriminator",
    "UnetGenerator",
    "UnetSkipBlock",
    "check_image_size",
    "init_weights",
    "is_norm_layer",
    "norm_has_shift",
]

InitType = Literal["normal", "xavier", "kaiming", "orthogonal"]
INIT_TYPES: tuple[str, ...] = ("normal", "xavier", "kaiming", "orthogonal")

# The U-Net has four fixed outer levels (ngf → 2ngf → 4ngf → 8ngf) plus the innermost one.
MIN_NUM_DOWNS = 5

BlockRole = Literal["outermost", "intermediate", "innermost"]


def norm_has_shift(norm: nn.Module) -> bool:
    """Whether a norm layer adds its own per-channel shift, making a preceding conv bias redundant.

    The test is a parameter *or buffer* named ``bias`` (at any depth, for wrapper norms): a
    FrozenBatchNorm2d keeps its affine shift as a buffer, and a fixed shift still absorbs the
    conv's constant offset, since what follows sees only their sum. Norms built without affine
    parameters (``affine=False``) register ``bias`` as None and so have no shift.
    """
    names = chain(norm.named_parameters(), norm.named_buffers())
    return any(name.rsplit(".", 1)[-1] == "bias" for name, _ in names)


def _conv_bias(norm_layer: NormLayer, probe_channels: int) -> bool:
    # Built for a channel count the network really uses: GroupNorm with a fixed num_groups, for
    # one, cannot be built for an arbitrary count.
    return not norm_has_shift(norm_layer(probe_channels))


def _check_num_downs(num_downs: int) -> None:
    if num_downs < MIN_NUM_DOWNS:
        raise ArgumentError(
            "num_downs",
            num_downs,
            f"{{key}} must be at least {MIN_NUM_DOWNS} (the U-Net has four fixed outer levels "
            f"and an innermost one), got {num_downs}",
        )


def check_image_size(image_size: int | Sequence[int], num_downs: int) -> None:
    """Raise ConfigError unless every side of ``image_size`` is divisible by ``2**num_downs``.

    The U-Net halves the image ``num_downs`` times and concatenates each level's input with the
    upsampled output, so any other size fails (or would be cropped) at some level.
    """
    _check_num_downs(num_downs)
    sides = list(image_size) if isinstance(image_size, Sequence) else [image_size]
    factor = 2**num_downs
    bad = [side for side in sides if side <= 0 or side % factor]
    if bad:
        raise ConfigError(
            f"image size {image_size} does not fit model.generator.num_downs={num_downs}: the U-Net "
            f"halves the image {num_downs} times, so each side must be a multiple of "
            f"2**{num_downs} = {factor} (use num_downs=7 for 128 px, 8 for 256 px)"
        )


def _check_init_type(init_type: str, owner: str | None = None) -> None:
    check_choice("init_type", init_type, INIT_TYPES, owner)


def _init_weight(weight: Tensor, init_type: str, gain: float) -> None:
    if init_type == "normal":
        nn.init.normal_(weight, 0.0, gain)
    elif init_type == "xavier":
        nn.init.xavier_normal_(weight, gain=gain)
    elif init_type == "kaiming":
        # As the reference: the gain does not apply (a=0, fan_in).
        nn.init.kaiming_normal_(weight, a=0, mode="fan_in")
    else:
        nn.init.orthogonal_(weight, gain=gain)


def init_weights(
    module: nn.Module,
    init_type: str = "normal",
    gain: float = 0.02,
) -> nn.Module:
    """Initialise ``module`` in place as pix2pix does, and return it.

    Conv and linear weights get ``init_type`` (``normal``: N(0, gain); ``xavier``: Xavier-normal
    with ``gain``; ``kaiming``: Kaiming-normal, fan-in; ``orthogonal`` with ``gain``), their biases
    0. Norm layers (:func:`~normlab.norm.is_norm_layer`) with an affine weight parameter get weight
    N(1, gain) and bias 0, whatever ``init_type`` is. Weights held as buffers (FrozenBatchNorm2d)
    are left alone: they are not trained, so random values would only add a fixed distortion.
    """
    _check_init_type(init_type, type(module).__name__)
    for m in module.modules():
        weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
        if is_norm_layer(m):
            if isinstance(weight, nn.Parameter):
                nn.init.normal_(weight, 1.0, gain)
            if isinstance(bias, nn.Parameter):
                nn.init.zeros_(bias)
        elif isinstance(m, (_ConvNd, nn.Linear)):
            _init_weight(m.weight, init_type, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


class UnetSkipBlock(nn.Module):
    """One level of the U-Net: down, the inner levels, up, and the skip connection around them.

    ``down`` halves the resolution to ``inner_channels``, ``inner`` holds the deeper levels (None in
    the innermost block) and ``up`` doubles the resolution back to ``outer_channels``. Except in the
    outermost block, the output is the block's input concatenated with that result, so the next
    ``up`` sees ``2 * inner_channels`` channels.

    Roles, as in the reference: the outermost block has no norm and ends with Tanh; the innermost
    has no norm on its down path (its output is 1×1 at the intended image size); the intermediate
    blocks are conv-norm down, convT-norm up, optionally followed by Dropout(0.5).
    """

    def __init__(
        self,
        outer_channels: int,
        inner_channels: int,
        *,
        norm_layer: NormLayer,
        use_bias: bool,
        in_channels: int | None = None,
        inner: nn.Module | None = None,
        role: BlockRole = "intermediate",
        use_dropout: bool = False,
    ) -> None:
        super().__init__()
        if (role == "innermost") != (inner is None):
            raise ValueError(f"a U-Net block has an inner module iff it is not innermost ({role})")
        in_channels = outer_channels if in_channels is None else in_channels
        self.role = role
        down_conv = nn.Conv2d(in_channels, inner_channels, 4, stride=2, padding=1, bias=use_bias)
        up_in = inner_channels if role == "innermost" else 2 * inner_channels

        # The reference applies this LeakyReLU in place to the block's input, and that same tensor
        # is then concatenated as the skip connection; so the decoder sees the activated features
        # (as in the original Lua pix2pix). It is a separate step here to keep that visible.
        self.act = nn.Identity() if role == "outermost" else nn.LeakyReLU(0.2)
        if role == "intermediate":
            down_norm = norm_layer(inner_channels)
            if isinstance(inner, UnetSkipBlock):
                # This norm's output goes to the inner block's LeakyReLU and nowhere else (that
                # block uses only its activated input, for its down path and its skip half), so a
                # norm that can apply the LeakyReLU itself may absorb it: the network computes the
                # same. The inner block on its own then no longer activates its input.
                inner.act = activation_after(down_norm, inner.act)
            self.down = nn.Sequential(down_conv, down_norm)
        else:
            self.down = nn.Sequential(down_conv)
        self.inner = inner
        # The ReLU opening `up` acts on the inner block's output, the concatenation of its skip
        # half and its up path (in the innermost block, on a conv without norm), never on the
        # output of one norm alone; so no norm can absorb it.
        if role == "outermost":
            up_conv = nn.ConvTranspose2d(up_in, outer_channels, 4, stride=2, padding=1)
            self.up = nn.Sequential(nn.ReLU(inplace=True), up_conv, nn.Tanh())
        else:
            up_conv = nn.ConvTranspose2d(
                up_in, outer_channels, 4, stride=2, padding=1, bias=use_bias
            )
            up: list[nn.Module] = [nn.ReLU(inplace=True), up_conv, norm_layer(outer_channels)]
            if role == "intermediate" and use_dropout:
                up.append(nn.Dropout(0.5))
            self.up = nn.Sequential(*up)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(x)
        y = self.down(x)
        if self.inner is not None:
            y = self.inner(y)
        y = self.up(y)
        return y if self.role == "outermost" else torch.cat([x, y], 1)

    def extra_repr(self) -> str:
        return f"role={self.role}"


@checked_arguments(in_channels=COUNT, out_channels=COUNT, ngf=COUNT, init_gain=NON_NEGATIVE)
class UnetGenerator(nn.Module):
    """The pix2pix U-Net generator: ``num_downs`` stride-2 levels, skip connections, Tanh output.

    Channels per level: ngf, 2ngf, 4ngf, then 8ngf for the remaining ``num_downs - 3``. Dropout 0.5
    sits in the ``num_downs - 5`` 8ngf decoder levels just outside the innermost one (the noise of
    the paper; the reference keeps it on at test time unless ``--eval``).

    Args:
        in_channels: channels of the input image.
        out_channels: channels of the output image.
        num_downs: number of halvings, at least 5; H and W must be multiples of ``2**num_downs``
            (8 for 256-px images, 7 for 128 px; see :func:`check_image_size`).
        ngf: channels of the first level.
        norm: norm spec for every norm layer (see ``normlab.norm``).
        use_dropout: Dropout(0.5) in the middle decoder levels.
        init_type: ``normal``, ``xavier``, ``kaiming`` or ``orthogonal`` (see :func:`init_weights`).
        init_gain: the init's scale (the std of ``normal``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        num_downs: int = 8,
        ngf: int = 64,
        norm: NormSpec = "bn",
        use_dropout: bool = True,
        init_type: InitType = "normal",
        init_gain: float = 0.02,
    ) -> None:
        super().__init__()
        _check_num_downs(num_downs)
        _check_init_type(init_type, type(self).__name__)  # before building 54 M weights
        self.num_downs = num_downs
        norm_layer = get_norm_layer(norm)
        use_bias = _conv_bias(norm_layer, ngf * 2)

        def level(outer_channels: int, inner_channels: int, **kwargs: Any) -> UnetSkipBlock:
            return UnetSkipBlock(
                outer_channels, inner_channels, norm_layer=norm_layer, use_bias=use_bias, **kwargs
            )

        # Built from the inside out: each block wraps the previous one.
        block = level(ngf * 8, ngf * 8, role="innermost")
        for _ in range(num_downs - MIN_NUM_DOWNS):
            block = level(ngf * 8, ngf * 8, inner=block, use_dropout=use_dropout)
        for mult in (4, 2, 1):
            block = level(ngf * mult, ngf * mult * 2, inner=block)
        self.unet = level(out_channels, ngf, in_channels=in_channels, inner=block, role="outermost")
        init_weights(self, init_type, init_gain)
        standardize_conv_weights(self)  # norm.weight_standardization=true

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        factor = 2**self.num_downs
        if height % factor or width % factor:
            raise ValueError(
                f"UnetGenerator with num_downs={self.num_downs} needs H and W divisible by "
                f"2**{self.num_downs} = {factor}, got {height}×{width}"
            )
        return self.unet(x)


@checked_arguments(in_channels=COUNT, ndf=COUNT, init_gain=NON_NEGATIVE)
class PatchDiscriminator(nn.Module):
    """The PatchGAN discriminator: one real/fake logit per overlapping image patch.

    A 4×4 stride-2 conv without norm, then ``n_layers`` conv-norm-LeakyReLU(0.2) layers with
    ``ndf·min(2^n, 8)`` channels (stride 2, except the last which has stride 1), then a 4×4
    conv to one channel; padding 1 throughout. With ``n_layers=3`` each output sees 70×70 input
    pixels and a 256² input gives a 30×30 map.

    Args:
        in_channels: channels it sees; for pix2pix the input and target concatenated.
        ndf: channels of the first conv.
        n_layers: number of normalised convolutions (0 gives one, at ``ndf``, as the reference).
        norm: norm spec for every norm layer (see ``normlab.norm``).
        init_type: see :func:`init_weights`.
        init_gain: the init's scale.
    """

    def __init__(
        self,
        in_channels: int = 6,
        ndf: int = 64,
        n_layers: int = 3,
        norm: NormSpec = "bn",
        init_type: InitType = "normal",
        init_gain: float = 0.02,
    ) -> None:
        super().__init__()
        _check_init_type(init_type, type(self).__name__)
        if n_layers < 0:
            raise ArgumentError("n_layers", n_layers, f"{{key}} must be ≥ 0, got {n_layers}")
        norm_layer = get_norm_layer(norm)
        # Widths of the normalised layers; n_layers=0 still gets one (ndf → ndf), as in the reference.
        widths = [ndf * min(2**n, 8) for n in range(1, n_layers + 1)] or [ndf]
        use_bias = _conv_bias(norm_layer, widths[0])

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = ndf
        for i, width in enumerate(widths):
            stride = 1 if i == len(widths) - 1 else 2
            layers += [
                nn.Conv2d(channels, width, 4, stride=stride, padding=1, bias=use_bias),
                norm_layer(width),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = width
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        fuse_norm_activations(self.net)  # a norm that can apply its LeakyReLU itself does
        init_weights(self, init_type, init_gain)
        standardize_conv_weights(self)  # norm.weight_standardization=true

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@checked_arguments(in_channels=COUNT, ndf=COUNT, init_gain=NON_NEGATIVE)
class PixelDiscriminator(nn.Module):
    """The 1×1 PixelGAN discriminator: one logit per pixel, from 1×1 convolutions only.

    It takes no ``n_layers``; to switch the config's discriminator to it, override
    ``model.discriminator._target_=normlab.models.pix2pix.PixelDiscriminator
    ~model.discriminator.n_layers``.

    Args:
        in_channels: channels it sees; for pix2pix the input and target concatenated.
        ndf: channels of the first conv (the second has ``2 * ndf``).
        norm: norm spec for the one norm layer (see ``normlab.norm``).
        init_type: see :func:`init_weights`.
        init_gain: the init's scale.
    """

    def __init__(
        self,
        in_channels: int = 6,
        ndf: int = 64,
        norm: NormSpec = "bn",
        init_type: InitType = "normal",
        init_gain: float = 0.02,
    ) -> None:
        super().__init__()
        _check_init_type(init_type, type(self).__name__)
        norm_layer = get_norm_layer(norm)
        use_bias = _conv_bias(norm_layer, ndf * 2)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, ndf, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 1, bias=use_bias),
            norm_layer(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            # The reference ties this bias to the norm as well, though no norm follows it.
            nn.Conv2d(ndf * 2, 1, 1, bias=use_bias),
        )
        fuse_norm_activations(self.net)  # a norm that can apply its LeakyReLU itself does
        init_weights(self, init_type, init_gain)
        standardize_conv_weights(self)  # norm.weight_standardization=true

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
