"""Fold norms into convolutions for inference.

``fold_norms(model, example_inputs)`` returns an eval-mode copy of ``model`` in which every norm
that is a fixed per-channel affine map at inference (BatchNorm, SyncBatchNorm, cuda_bn,
FrozenBatchNorm2d, InstanceNorm with running statistics) and sits next to a convolution is
merged into that convolution's weight and bias, plus a :class:`FoldReport`.

Why not torch's own: ``torch.fx.experimental.optimization.fuse`` needs a model ``torch.fx`` can
trace and folds only BatchNorm after a non-transposed convolution, and
``torch.nn.utils.fuse_conv_bn_eval(transpose=True)`` fails on grouped transposed convolutions
(both checked with torch 2.14).

How pairs are found. Module order says nothing about data flow (DenseNet concatenates, ResNet
adds, a module may be called twice), and ``torch.fx`` cannot trace these models (their forwards
branch on shapes and on ``requires_grad``). So the copy runs once on ``example_inputs`` while
module hooks record each call's input and output tensors and a ``TorchFunctionMode`` records
every torch function that receives a tensor produced by a convolution or a norm, and which module
calls were active then. A norm ``N`` is folded

- into the preceding convolution ``C`` if every call of ``N`` receives the output tensor of a
  call of ``C`` (the same object), and every data use of every output of ``C`` happens inside
  the call of ``N`` that received it: nothing else reads it, modifies it in place or returns it;
- otherwise into the following convolution ``C`` if every output of ``N`` is used only inside a
  call of ``C`` as its input, every input of ``C`` comes from ``N``, ``C`` is an ordinary
  (not transposed) convolution without padding (zero padding would be padding of the norm's
  input, where the folded shift is not zero), and ``N`` applies no fused activation.

Anything else is left in place and reported with the reason. Metadata reads (``.shape``,
``.dtype``, ``.dim()``, …) are not uses: folding changes values, not shapes. Limits: only
data flow through torch functions is seen (a tensor handed to a Triton kernel or to C code
directly is not), and the result is proven for the example's control flow only; a network whose
wiring depends on its input needs an example that takes every path.

A cuda_bn that applies a fused activation is folded into the preceding convolution and replaced
by that activation's module; other folded norms become ``nn.Identity()``.

The tracer is :mod:`normlab.norm.fold_tracing`; the pair finder and the folding arithmetic are
here, and each step's reasons end up in the same report.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from normlab.norm.fold_tracing import Call, Trace, tensors_in, trace_model
from normlab.norm.standardize import bake_standardized_weights
from normlab.norm.traits import fused_activation, is_norm, why_not_affine

log = logging.getLogger(__name__)

_ACTIVATIONS = {"relu", "relu_", "leaky_relu", "leaky_relu_", "silu", "gelu", "hardswish", "elu"}


_CONV_FORWARDS = {
    cls.forward
    for cls in (
        nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d
    )
}  # fmt: skip


def _why_not_conv(module: nn.Module) -> str | None:
    """None if ``module`` computes exactly torch's convolution of its input; else why not."""
    if type(module).forward not in _CONV_FORWARDS:
        return f"{type(module).__name__} has its own forward"
    return None


# -- finding pairs ---------------------------------------------------------------------------------


@dataclass
class FoldedNorm:
    """A norm merged into a convolution. ``direction``: ``into_preceding_conv`` (conv → norm)
    or ``into_following_conv`` (norm → conv). ``activation``: the fused activation kept in the
    norm's place, if any."""

    norm: str
    conv: str
    direction: str
    norm_type: str
    activation: str | None = None


@dataclass
class UnfoldedNorm:
    """A norm left in place, and why."""

    norm: str
    norm_type: str
    reason: str


@dataclass
class FoldReport:
    """What :func:`fold_norms` did, with parameter counts before and after (running statistics
    are buffers, counted separately)."""

    folded: list[FoldedNorm] = field(default_factory=list)
    unfolded: list[UnfoldedNorm] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0
    buffers_before: int = 0
    buffers_after: int = 0
    # Convolutions whose weight standardization (norm.weight_standardization) was made constant.
    standardized_weights_baked: int = 0
    # max |folded(x) - model(x)| on the example input, and that over max |model(x)|; None when
    # the outputs cannot be compared (their shapes changed, e.g. a detector's boxes after NMS).
    max_abs_difference: float | None = None
    max_relative_difference: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [
            f"- norms folded: {len(self.folded)}; left in place: {len(self.unfolded)}",
            f"- parameters: {self.parameters_before:,} → {self.parameters_after:,}; "
            f"buffer values: {self.buffers_before:,} → {self.buffers_after:,}",
        ]
        if self.standardized_weights_baked:
            lines.append(
                f"- standardised conv weights made constant: {self.standardized_weights_baked}"
            )
        if self.max_relative_difference is not None:
            lines.append(
                f"- on the example input, max |folded − original| = {self.max_abs_difference:.3g}"
                f" ({self.max_relative_difference:.3g} of the largest output)"
            )
        if self.folded:
            lines += ["", "| norm | type | folded into | direction | kept activation |"]
            lines += ["|---|---|---|---|---|"]
            lines += [
                f"| `{f.norm}` | {f.norm_type} | `{f.conv}` | {f.direction} | {f.activation or ''} |"
                for f in self.folded
            ]
        if self.unfolded:
            lines += ["", "| norm left in place | type | why |", "|---|---|---|"]
            lines += [f"| `{u.norm}` | {u.norm_type} | {u.reason} |" for u in self.unfolded]
        return "\n".join(lines) + "\n"


def _describe_uses(uses: list[str]) -> str:
    names = sorted(set(uses))
    text = ", ".join(names)
    if any(name.removeprefix("Tensor.") in _ACTIVATIONS for name in names):
        text += " (an activation between the norm and the next convolution)"
    return text


class _Finder:
    def __init__(self, model: nn.Module, trace: Trace) -> None:
        self.trace = trace
        self.names = {m: n for n, m in model.named_modules()}
        # id(tensor) → the convolution calls that take it as their only input.
        self.conv_calls_taking: dict[int, list[Call]] = defaultdict(list)
        for module, calls in trace.calls.items():
            if isinstance(module, _ConvNd):
                for call in calls:
                    if call.single_input is not None:
                        self.conv_calls_taking[id(call.single_input)].append(call)

    def _uses(self, tensor: Tensor, outside: Call | None = None) -> list[str]:
        """Data uses of ``tensor`` (those outside the call ``outside``), including being returned
        by the model."""
        uses = [
            op
            for op, active in self.trace.uses.get(id(tensor), [])
            if outside is None or outside.id not in active
        ]
        if id(tensor) in self.trace.outputs:
            uses.append("the model's output")
        return uses

    def preceding(self, norm: nn.Module) -> tuple[nn.Module | None, str]:
        """The convolution ``norm`` folds into as conv → norm, or None and why not."""
        convs = set()
        norm_call_of: dict[int, Call] = {}  # conv call id → the norm call taking its output
        for call in self.trace.calls[norm]:
            x = call.single_input
            if x is None:
                return None, "it is not called with a single tensor"
            source = self.trace.watched.get(id(x))
            if source is None or not isinstance(source[1].module, _ConvNd):
                return None, f"its input comes from {self.trace.producer(x)}, not a convolution"
            convs.add(source[1].module)
            norm_call_of[source[1].id] = call
        if len(convs) != 1:
            return None, "its inputs come from several convolutions"
        conv = convs.pop()
        name = self.names[conv]
        if (why := _why_not_conv(conv)) is not None:
            return None, f"the preceding {name}: {why}"
        for call in self.trace.calls[conv]:
            if call.id not in norm_call_of:
                return None, f"{name} is also called without this norm after it"
            if others := self._uses(call.output, norm_call_of[call.id]):
                return None, f"the output of {name} is also used by {_describe_uses(others)}"
        return conv, ""

    def following(self, norm: nn.Module) -> tuple[nn.Module | None, str]:
        """The convolution ``norm`` folds into as norm → conv, or None and why not."""
        activation = fused_activation(norm)
        if activation is not None:
            return None, f"it applies a fused {type(activation).__name__} after normalising"
        convs, outputs = set(), set()
        for call in self.trace.calls[norm]:
            output = call.output
            if not isinstance(output, Tensor):
                return None, "its output is not a tensor"
            outputs.add(id(output))
            takers = self.conv_calls_taking.get(id(output), [])
            if len(takers) != 1:
                return None, f"its output goes to {_describe_uses(self._uses(output)) or 'nothing'}"
            if others := self._uses(output, takers[0]):
                return None, f"its output goes to {_describe_uses(others)}"
            convs.add(takers[0].module)
        if len(convs) != 1:
            return None, "its outputs go to several convolutions"
        conv = convs.pop()
        name = self.names[conv]
        if (why := _why_not_conv(conv)) is not None:
            return None, f"the following {name}: {why}"
        if isinstance(conv, _ConvTransposeNd):
            return None, f"the following {name} is a transposed convolution"
        if conv.padding == "same" or any(p != 0 for p in conv.padding):
            return None, (
                f"the following {name} pads its input with zeros, where the folded shift "
                "would not be zero"
            )
        if any(id(call.single_input) not in outputs for call in self.trace.calls[conv]):
            return None, f"{name} also takes inputs that do not come from this norm"
        return conv, ""


# -- folding ---------------------------------------------------------------------------------------


def _affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(scale, shift) per channel, in float64: eval-mode ``norm(x) = scale·x + shift``."""
    mean, var = norm.running_mean.double(), norm.running_var.double()
    weight = norm.weight.double() if norm.weight is not None else torch.ones_like(mean)
    bias = norm.bias.double() if norm.bias is not None else torch.zeros_like(mean)
    scale = weight / torch.sqrt(var + norm.eps)
    return scale, bias - mean * scale


def _set_weight_and_bias(conv: _ConvNd, weight: Tensor, bias: Tensor) -> None:
    reference = conv.weight
    conv.weight = nn.Parameter(weight.to(reference.dtype), requires_grad=reference.requires_grad)
    conv.bias = nn.Parameter(bias.to(reference.dtype), requires_grad=reference.requires_grad)


@torch.no_grad()
def _fold_into_preceding(conv: _ConvNd, norm: nn.Module) -> None:
    """conv → norm: scale each output channel's filter, and shift its bias."""
    scale, shift = _affine(norm)
    weight = conv.weight.double()
    kernel_dims = [1] * (weight.dim() - 2)
    if isinstance(conv, _ConvTransposeNd):
        # Weight: in × out/groups × k…; output channel g·(out/groups) + j is [g-th input block, j].
        groups = conv.groups
        grouped = weight.view(groups, weight.shape[0] // groups, weight.shape[1], *weight.shape[2:])
        scaled = grouped * scale.view(groups, 1, weight.shape[1], *kernel_dims)
        weight = scaled.view_as(weight)
    else:
        weight = weight * scale.view(-1, 1, *kernel_dims)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    _set_weight_and_bias(conv, weight, bias * scale + shift)


@torch.no_grad()
def _fold_into_following(norm: nn.Module, conv: _ConvNd) -> None:
    """norm → conv (no padding): scale each input channel's weights; the norm's shift, constant
    over the conv's whole receptive field, adds Σ weight·shift to the bias."""
    scale, shift = _affine(norm)
    weight = conv.weight.double()
    groups, out_channels, group_in = conv.groups, weight.shape[0], weight.shape[1]
    kernel_dims = [1] * (weight.dim() - 2)
    grouped = weight.view(groups, out_channels // groups, group_in, *weight.shape[2:])
    per_input = (groups, 1, group_in, *kernel_dims)
    added = (grouped * shift.view(per_input)).flatten(2).sum(2).flatten()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros(out_channels).double()
    _set_weight_and_bias(conv, (grouped * scale.view(per_input)).view_as(weight), bias + added)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for module in model.modules():
        for name, child in module._modules.items():
            if child is old:
                setattr(module, name, new)


def _count(tensors: Iterator[Tensor]) -> int:
    return sum(t.numel() for t in tensors)


def fold_norms(model: nn.Module, example_inputs: Any) -> tuple[nn.Module, FoldReport]:
    """An eval-mode deep copy of ``model`` with every foldable norm merged into its convolution,
    and a report of what was folded, what was not and why (see the module docstring).

    ``example_inputs``: what the model is called with to observe its data flow, a tuple of
    positional arguments or a single argument (a tensor, or e.g. a list of images for a
    torchvision detector). ``model`` itself is not changed.
    """
    folded = copy.deepcopy(model).eval()
    report = FoldReport(
        parameters_before=_count(model.parameters()), buffers_before=_count(model.buffers())
    )
    # At inference a standardised weight is a constant: fold into it as into any other weight.
    report.standardized_weights_baked = bake_standardized_weights(folded)
    trace = trace_model(folded, example_inputs)
    finder = _Finder(folded, trace)
    plans: list[tuple[str, nn.Module, nn.Module, str]] = []
    for name, norm in folded.named_modules():
        if not is_norm(norm):
            continue
        kind = type(norm).__name__
        if (why := why_not_affine(norm)) is not None:
            report.unfolded.append(UnfoldedNorm(name, kind, why))
            continue
        if not trace.calls[norm]:
            report.unfolded.append(UnfoldedNorm(name, kind, "not called on the example input"))
            continue
        conv, why_not_before = finder.preceding(norm)
        if conv is not None:
            plans.append((name, norm, conv, "into_preceding_conv"))
            continue
        conv, why_not_after = finder.following(norm)
        if conv is not None:
            plans.append((name, norm, conv, "into_following_conv"))
            continue
        report.unfolded.append(
            UnfoldedNorm(
                name,
                kind,
                f"not after a convolution: {why_not_before}; not before one: {why_not_after}",
            )
        )
    for name, norm, conv, direction in plans:
        activation = fused_activation(norm)
        if direction == "into_preceding_conv":
            _fold_into_preceding(conv, norm)
        else:
            _fold_into_following(norm, conv)
        _replace(folded, norm, activation if activation is not None else nn.Identity())
        report.folded.append(
            FoldedNorm(
                name,
                finder.names[conv],
                direction,
                type(norm).__name__,
                type(activation).__name__ if activation is not None else None,
            )
        )
    report.parameters_after = _count(folded.parameters())
    report.buffers_after = _count(folded.buffers())
    _check_outputs(trace.output, run_example(folded, example_inputs), report)
    return folded, report


# -- checking the result ---------------------------------------------------------------------------


# A folded model computes the same function up to rounding; a relative difference above this
# means a data flow the trace did not see (a tensor kept outside torch functions, a norm
# reachable through a plain Python reference) and the folded model must not be used.
_FOLD_TOLERANCE = 1e-3


def run_example(model: nn.Module, example_inputs: Any) -> Any:
    """``model``'s output on ``example_inputs`` (a tuple of arguments or one), without gradients."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with torch.no_grad():
        return model(*args)


def _check_outputs(expected: Any, got: Any, report: FoldReport) -> None:
    """Record how far the folded model's outputs on the example are from the original's, and
    refuse a folded model that computes something else."""
    expected, got = _flat_outputs(expected), _flat_outputs(got)
    if [t.shape for t in expected] != [t.shape for t in got]:
        # Data-dependent outputs (a detector's boxes after NMS) may change in number.
        log.warning("fold_norms: output shapes differ after folding, so outputs were not compared")
        return
    report.max_abs_difference = max_difference(expected, got)
    scale = max((float(t.abs().max()) for t in expected if t.numel()), default=0.0)
    report.max_relative_difference = report.max_abs_difference / scale if scale else 0.0
    if report.max_relative_difference > _FOLD_TOLERANCE:
        raise RuntimeError(
            f"fold_norms: the folded model's outputs differ from the model's by "
            f"{report.max_relative_difference:.2g} (relative) on the example input; it sees data "
            "flow the trace could not, so use the unfolded model"
        )


def _flat_outputs(output: Any) -> list[Tensor]:
    return [t.detach().float() for t in tensors_in(output)]


def max_difference(reference: Any, other: Any) -> float:
    """The largest absolute difference between two (nested) outputs of the same structure."""
    pairs = zip(_flat_outputs(reference), _flat_outputs(other), strict=True)
    return max((float((a - b).abs().max()) for a, b in pairs if a.numel()), default=0.0)
