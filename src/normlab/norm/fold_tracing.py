"""The tracer of :mod:`normlab.norm.fold`: one run of a model on example inputs that records
each module call's inputs and output, and every torch function that receives the output of a
convolution or a norm, with the module calls active then (the uses that decide whether a norm
may be merged into a neighbouring convolution)."""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

from normlab.norm.traits import is_norm

# Torch functions that read a tensor's metadata, not its values.
_METADATA = {
    *(
        getattr(torch.Tensor, name).__get__
        for name in (
            "shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_sparse",
            "is_quantized", "is_meta", "grad_fn", "is_leaf", "_version", "itemsize", "nbytes",
        )
    ),
    *(
        getattr(torch.Tensor, name)
        for name in (
            "size", "dim", "numel", "nelement", "ndimension", "stride", "is_contiguous",
            "is_floating_point", "is_complex", "element_size", "__len__", "get_device",
            "data_ptr", "storage_offset",
        )
    ),
}  # fmt: skip


@dataclass(eq=False)
class Call:
    """One call of a module: its positional/keyword inputs and its output."""

    id: int
    module: nn.Module
    args: tuple
    kwargs: dict
    output: Any = None

    @property
    def single_input(self) -> Tensor | None:
        if len(self.args) == 1 and not self.kwargs and isinstance(self.args[0], Tensor):
            return self.args[0]
        return None


def tensors_in(value: Any) -> Iterator[Tensor]:
    """The tensors in ``value``, a tensor or nested lists, tuples and dicts of them."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__qualname__", "")
    return f"Tensor.{name}" if owner.startswith(("TensorBase.", "Tensor.")) else name


@dataclass
class Trace:
    """What one run recorded: the calls of each module, and the uses of the tensors that
    convolutions and norms returned."""

    calls: dict[nn.Module, list[Call]] = field(default_factory=lambda: defaultdict(list))
    # id(tensor) → (tensor, the call that returned it) for outputs of convolutions and norms.
    watched: dict[int, tuple[Tensor, Call]] = field(default_factory=dict)
    # id(tensor) → [(torch function, ids of the module calls active then)]
    uses: dict[int, list[tuple[str, frozenset[int]]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    # id(tensor) → (weak reference, the torch function that produced it), for every tensor.
    producers: dict[int, tuple[weakref.ref, str]] = field(default_factory=dict)
    outputs: set[int] = field(default_factory=set)
    output: Any = None

    def producer(self, tensor: Tensor) -> str:
        entry = self.producers.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else "the model's input"


class _Recorder(TorchFunctionMode):
    def __init__(self, trace: Trace, stack: list[int]) -> None:
        super().__init__()
        self.trace, self.stack = trace, stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _METADATA:
            active = frozenset(self.stack)
            for tensor in tensors_in((args, kwargs)):
                if id(tensor) in self.trace.watched:
                    self.trace.uses[id(tensor)].append((_op_name(func), active))
        out = func(*args, **kwargs)
        name = _op_name(func)
        for tensor in tensors_in(out):
            known = self.trace.producers.get(id(tensor))
            # An op returning its input unchanged (x.to(x.dtype)) keeps the producer; an
            # in-place op (relu_) becomes it.
            if known is None or known[0]() is not tensor or name.endswith("_"):
                self.trace.producers[id(tensor)] = (weakref.ref(tensor), name)
        return out


@torch.no_grad()
def trace_model(model: nn.Module, example_inputs: Any) -> Trace:
    """Run ``model`` once on ``example_inputs`` (a tensor, or a tuple of positional arguments)
    and record what :class:`Trace` holds."""
    trace, stack, ids = Trace(), [], count()
    watch = {m for m in model.modules() if isinstance(m, _ConvNd) or is_norm(m)}

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = Call(next(ids), module, args, kwargs)
        trace.calls[module].append(call)
        stack.append(call.id)

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call_id = stack.pop()
        call = next(c for c in reversed(trace.calls[module]) if c.id == call_id)
        call.output = output
        if module in watch and isinstance(output, Tensor):
            trace.watched[id(output)] = (output, call)

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
    try:
        with _Recorder(trace, stack):
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            output = model(*args)
    finally:
        for handle in handles:
            handle.remove()
    trace.output = output
    trace.outputs = {id(t) for t in tensors_in(output)}
    return trace
