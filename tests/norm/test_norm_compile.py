"""Every registered norm compiles as one graph (``torch.compile(fullgraph=True)``, inductor on
CPU), in training and eval mode and both memory formats, and the compiled layer computes what
the eager one does: outputs, input and parameter gradients, running statistics, over three
steps without recompiling (a norm that read its step count as a Python number would recompile
every step). ``syncbn`` is compiled outside a process group (where it is BN); inside one it
all-reduces, which is not compiled here (``compile=true`` refuses a syncing norm in a
multi-process run: tests/tasks/test_compile_networks.py).

``cuda_bn`` in the per-norm test takes its CPU path (``backend=auto``: PyTorch's BN). Its Triton
kernels are ``torch.library`` custom ops with registered fake implementations: Dynamo keeps each
as one node of a full graph, and inductor calls it as an opaque kernel (it cannot fuse into it,
as it could with ``triton_op``), which the last tests check with the kernels run by Triton's
interpreter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normlab.norm import NORMS, build_norm

# Specs that take each norm's interesting path at batch 7: ghost_bn splits it (3 + 3 + 1), brn
# leaves its warm-up on the second step and its ramp on the third.
SPECS = {
    "ghost_bn": {"name": "ghost_bn", "virtual_batch_size": 3},
    "brn": {"name": "brn", "warmup_steps": 1, "ramp_steps": 1, "r_max": 1.5, "d_max": 0.5},
}
FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
# What `make test` compiles; the rest is slow (several seconds of inductor per case on 2 cores).
FAST = {("brn", True, "NCHW"), ("ghost_bn", True, "channels_last"), ("evonorm_b0", False, "NCHW")}
C = 8


def _cases():
    for name in sorted(NORMS):
        for training in (True, False):
            for layout in FORMATS:
                marks = () if (name, training, layout) in FAST else (pytest.mark.slow,)
                mode = "train" if training else "eval"
                yield pytest.param(
                    name, training, layout, id=f"{name}-{mode}-{layout}", marks=marks
                )


def _step(call: nn.Module, layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    leaf = x.detach().requires_grad_(True)
    layer.zero_grad()
    y = call(leaf)
    y.backward(upstream)
    return y.detach(), leaf.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize(("name", "training", "layout"), list(_cases()))
def test_norm_compiles_without_graph_break_and_matches_eager(name, training, layout):
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    eager = build_norm(SPECS.get(name, name), C).train(training)
    with torch.no_grad():
        for parameter in eager.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True)
    for step in range(3):
        x = torch.randn(7, C, 5, 6, generator=generator) * (1 + step) + step
        x = x.contiguous(memory_format=FORMATS[layout])
        upstream = torch.randn(x.shape, generator=generator)
        expected = _step(eager, eager, x, upstream)
        if step == 1:  # compiled once; the following steps must reuse that graph
            torch.compiler.set_stance("fail_on_recompile")
        try:
            got = _step(compiled, compiled_layer, x, upstream)
        finally:
            torch.compiler.set_stance("default")
        torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[2], expected[2], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            dict(compiled_layer.named_buffers()), dict(eager.named_buffers()), rtol=1e-5, atol=1e-6
        )


def _cuda_bn_pair(training: bool) -> tuple[nn.Module, nn.Module]:
    spec = {"name": "cuda_bn", "backend": "triton", "activation": "relu"}
    eager = build_norm(spec, 4).train(training)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    return eager, copy.deepcopy(eager)


CUDA_BN_OPS = {
    True: ["normlab.batch_norm_stats", "normlab.batch_norm_train"],
    False: ["normlab.batch_norm_eval"],
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_bn_kernels_stay_one_node_each_in_a_full_graph(training):
    torch._dynamo.reset()
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    _, layer = _cuda_bn_pair(training)
    compiled = torch.compile(layer, backend=record, fullgraph=True)
    compiled(torch.randn(3, 4, 5, 5).contiguous(memory_format=torch.channels_last))
    (graph,) = graphs
    calls = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert calls == CUDA_BN_OPS[training]


@pytest.mark.parametrize(
    "training",
    [pytest.param(True, marks=pytest.mark.slow), False],  # inductor's backward: ~15 s on 2 cores
    ids=["train", "eval"],
)
def test_cuda_bn_kernels_under_inductor_match_eager(training):
    torch._dynamo.reset()
    eager, layer = _cuda_bn_pair(training)
    compiled = torch.compile(layer, fullgraph=True)
    for step in range(2):
        x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(step))
        upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
        expected, got = _step(eager, eager, x, upstream), _step(compiled, layer, x, upstream)
        for want, have in zip(expected, got, strict=True):
            torch.testing.assert_close(have, want)
        torch.testing.assert_close(dict(layer.named_buffers()), dict(eager.named_buffers()))
