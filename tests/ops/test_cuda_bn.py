"""cuda_bn against nn.BatchNorm computed in float64: the Triton kernels (run by Triton's
interpreter on CPU, see conftest) and the plain-PyTorch reference, on tiny shapes that cross every
tile, chunk and split boundary, in every layout and with every flag and activation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.errors import ConfigError
from normlab.norm import build_norm, get_norm_layer
from normlab.norm.sync_batchnorm import SyncBatchNorm
from normlab.ops.batchnorm import CudaBatchNorm, batch_norm, batch_norm_reference, kernels
from normlab.ops.batchnorm import module as cuda_bn_module

BACKENDS = ["triton", "reference"]
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
ACTIVATION_FUNCTIONS = {
    None: lambda z, slope: z,
    "relu": lambda z, slope: F.relu(z),
    "leaky_relu": F.leaky_relu,
    "silu": lambda z, slope: F.silu(z),
}


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    memory_format = {4: torch.channels_last, 5: torch.channels_last_3d}[x.dim()]
    return x.contiguous(memory_format=memory_format)


def _pair(shape, backend, activation=None, negative_slope=0.01, dtype=torch.float32, **flags):
    """(ours in ``dtype``, torch's BatchNorm in float64) with the same random parameters."""
    channels = shape[1]
    truth = TORCH_BN[len(shape)](channels, **flags).double()
    if truth.affine:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            truth.weight.copy_(torch.rand(channels, generator=generator, dtype=torch.double) + 0.5)
            truth.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.double))
    ours = CudaBatchNorm(
        channels, backend=backend, activation=activation, negative_slope=negative_slope, **flags
    )
    ours.load_state_dict(truth.state_dict())
    return ours, truth


def _step(ours, truth, x, activation, negative_slope, dtype=torch.float32):
    """One forward/backward of both; returns [(what, ours, expected in ours' dtype)]."""
    x_ours = x.to(dtype).requires_grad_(True)
    x_truth = x.to(dtype).double().requires_grad_(True)
    y_ours = ours(x_ours)
    y_truth = ACTIVATION_FUNCTIONS[activation](truth(x_truth), negative_slope)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype).double()
    (y_ours * grad.to(dtype)).sum().backward()
    (y_truth * grad).sum().backward()
    pairs = [("output", y_ours, y_truth), ("input grad", x_ours.grad, x_truth.grad)]
    if truth.affine:
        pairs += [
            ("weight grad", ours.weight.grad, truth.weight.grad),
            ("bias grad", ours.bias.grad, truth.bias.grad),
        ]
        ours.zero_grad()
        truth.zero_grad()
    return pairs


def _assert_matches(pairs):
    for what, got, want in pairs:
        torch.testing.assert_close(got, want.to(got.dtype), msg=lambda m, w=what: f"{w}: {m}")


def _assert_same_state(ours, truth):
    for key, want in truth.state_dict().items():
        got = ours.state_dict()[key]
        torch.testing.assert_close(got, want.to(got.dtype), msg=lambda m, k=key: f"{k}: {m}")


# (id, shape, channels_last, flags): odd sizes, C=1, N·H·W=2, every rank, every BN flag.
CASES = [
    ("nchw-odd", (3, 5, 7, 9), False, {}),
    ("channels-last", (3, 5, 7, 9), True, {}),
    ("C=1", (4, 1, 3, 5), False, {}),
    ("NHW=2", (2, 3, 1, 1), False, {}),
    ("NHW=2-channels-last", (1, 3, 1, 2), True, {}),
    ("2d", (6, 5), False, {}),
    ("3d", (3, 4, 5), False, {}),
    ("5d", (2, 3, 2, 3, 4), False, {}),
    ("5d-channels-last", (2, 3, 2, 3, 4), True, {}),
    ("many-channels-last", (2, 37, 3, 3), True, {}),
    ("no-affine", (3, 5, 4, 3), False, {"affine": False}),
    ("no-running-stats", (3, 5, 4, 3), False, {"track_running_stats": False}),
    ("cumulative", (3, 5, 4, 3), False, {"momentum": None}),
    ("momentum-eps", (3, 5, 4, 3), True, {"momentum": 0.3, "eps": 1e-3}),
]
ACTIVATION_CASES = [(None, 0.01), ("relu", 0.01), ("leaky_relu", 0.2), ("silu", 0.01)]


def _check_training_then_eval(backend, shape, channels_last, flags, activation, slope):
    ours, truth = _pair(shape, backend, activation, slope, **flags)
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        if step == 2:  # eval: running statistics (batch statistics without them)
            ours.eval()
            truth.eval()
        x = torch.randn(shape, generator=generator, dtype=torch.double) * 2 + 0.5
        if channels_last:
            x = _channels_last(x)
        pairs = _step(ours, truth, x, activation, slope)
        _assert_matches(pairs)
        if channels_last:  # the output keeps the input's memory format
            assert pairs[0][1].stride() == x.stride()
        _assert_same_state(ours, truth)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("shape", "channels_last", "flags"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_matches_torch_batchnorm_in_float64(backend, shape, channels_last, flags, activation):
    _check_training_then_eval(backend, shape, channels_last, flags, activation, 0.01)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("activation", "slope"), ACTIVATION_CASES[2:], ids=["leaky_relu", "silu"])
@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [((3, 5, 7, 9), False), ((3, 5, 7, 9), True), ((6, 5), False), ((2, 3, 2, 3, 4), True)],
    ids=["nchw", "channels-last", "2d", "5d-channels-last"],
)
def test_every_activation_matches(backend, activation, slope, shape, channels_last):
    _check_training_then_eval(backend, shape, channels_last, {}, activation, slope)


def test_tiny_shapes_cross_chunk_and_split_boundaries():
    """The CPU plan uses small tiles, so the cases above merge several chunks and splits."""
    for shape, channels_last in [((3, 5, 7, 9), False), ((3, 5, 7, 9), True)]:
        x = torch.empty(shape)
        if channels_last:
            x = _channels_last(x)
        _, layout = kernels.layout_of(x)
        plan = kernels._plan_for(x, layout)
        assert plan.num_chunks > 1 and plan.splits > 1, plan


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [((32, 64, 112, 112), False), ((32, 64, 112, 112), True), ((256, 2048, 7, 7), False)],
)
def test_gpu_plan_fills_the_sms_when_channels_are_few(shape, channels_last):
    n, c, h, w = shape
    if channels_last:
        layout = kernels.Layout(n * h * w, c, 1, c, 1, 1)
    else:
        layout = kernels.Layout(n, c, h * w, c * h * w, h * w, 1)
    programs = 4 * 132  # an H100's SMs, four programs each
    plan = kernels.plan_reduction(layout, programs=programs, tile_elements=2048)
    # Enough programs to occupy every SM (up to rounding of the chunks per split).
    wanted = min(programs, plan.channel_blocks * plan.num_chunks)
    assert plan.channel_blocks * plan.splits >= 0.95 * wanted
    assert plan.splits * plan.chunks_per_split >= plan.num_chunks  # every chunk is covered
    tile = plan.block_o * plan.block_c * plan.block_i
    assert tile <= 2048
    # The tile's long axis is the memory-contiguous one.
    assert (plan.block_i == 1) == channels_last


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs_keep_fp32_statistics_and_parameters(backend, dtype):
    ours, truth = _pair((4, 6, 5, 3), backend, "relu")
    x = torch.randn(4, 6, 5, 3, generator=torch.Generator().manual_seed(0)).to(dtype).double()
    pairs = _step(ours, truth, x, "relu", 0.01, dtype=dtype)
    assert pairs[0][1].dtype == dtype and pairs[1][1].dtype == dtype
    assert ours.weight.grad is None  # zeroed by _step after the comparison pairs were taken
    _assert_matches(pairs)
    assert ours.running_mean.dtype == torch.float32 and ours.weight.dtype == torch.float32
    _assert_same_state(ours, truth)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_is_like_batchnorm(backend):
    ours, truth = _pair((0, 3, 4, 4), backend)
    x = torch.empty(0, 3, 4, 4, requires_grad=True)
    y = ours(x)
    y.sum().backward()
    truth(x.detach().double().requires_grad_(True)).sum().backward()
    assert y.shape == x.shape
    assert torch.equal(ours.weight.grad, torch.zeros(3))
    _assert_same_state(ours, truth)  # running statistics untouched, num_batches_tracked 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)])
def test_one_value_per_channel_fails_in_training_only(backend, shape):
    layer = CudaBatchNorm(3, backend=backend)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(torch.randn(shape))
    layer.eval()
    assert layer(torch.randn(shape)).shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_in_float64(backend):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 1, 3, dtype=torch.double, generator=generator, requires_grad=True)
    weight = (torch.rand(2, dtype=torch.double, generator=generator) + 0.5).requires_grad_(True)
    bias = torch.randn(2, dtype=torch.double, generator=generator, requires_grad=True)
    running_mean = torch.randn(2, dtype=torch.double, generator=generator)
    running_var = torch.rand(2, dtype=torch.double, generator=generator) + 0.5
    function = batch_norm if backend == "triton" else batch_norm_reference
    for use_batch_stats in (True, False):
        stats = (None, None) if use_batch_stats else (running_mean, running_var)

        def bn(x, weight, bias, stats=stats, use_batch_stats=use_batch_stats):
            return function(x, weight, bias, *stats, use_batch_stats, 0.1, 1e-5, "silu", 0.01)

        assert torch.autograd.gradcheck(bn, (x, weight, bias))


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cuda_bn_module, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1.*norm.backend=auto"):
        CudaBatchNorm(3, backend="triton")(torch.randn(2, 3, 2, 2))


def test_auto_backend_on_cpu_is_native_batchnorm_bit_for_bit():
    torch.manual_seed(0)
    ours, plain = CudaBatchNorm(4, activation="relu"), nn.BatchNorm2d(4)
    x = torch.randn(5, 4, 3, 3)
    for _ in range(2):
        assert torch.equal(ours(x), F.relu(plain(x)))
    for key, value in plain.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_state_dicts_move_between_bn_syncbn_and_cuda_bn():
    trained = nn.BatchNorm2d(4)
    trained(torch.randn(6, 4, 3, 3) * 3 + 1)
    for target in ("cuda_bn", "syncbn", "bn"):
        layer = build_norm(target, 4)
        layer.load_state_dict(trained.state_dict())  # strict
        back = nn.BatchNorm2d(4)
        back.load_state_dict(layer.state_dict())
        for key, value in trained.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), (target, key)
    assert CudaBatchNorm(4).state_dict().keys() == SyncBatchNorm(4).state_dict().keys()


def test_config_errors_name_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"backend='cuda' is not one of: auto, triton"):
        get_norm_layer({"name": "cuda_bn", "backend": "cuda"})(4)
    with pytest.raises(ConfigError, match=r"activation='gelu' .*relu, leaky_relu, silu"):
        get_norm_layer({"name": "cuda_bn", "activation": "gelu"})(4)


def test_absorbs_the_activations_it_can_fuse():
    layer = CudaBatchNorm(4)
    assert not layer.absorb_activation(nn.GELU())
    assert layer.absorb_activation(nn.LeakyReLU(0.3))
    assert (layer.activation, layer.negative_slope) == ("leaky_relu", 0.3)
    assert not layer.absorb_activation(nn.ReLU())  # already has one
    assert not CudaBatchNorm(4, fuse_activation=False).absorb_activation(nn.ReLU())
    assert "activation=leaky_relu" in repr(layer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_densenet_with_fused_cuda_bn_equals_bn(backend):
    from normlab.models.densenet import DenseNet

    def densenet(norm):
        torch.manual_seed(0)
        return DenseNet(4, (2, 2), 8, 2, num_classes=3, norm=norm, in_channels=1, stem="cifar")

    plain = densenet("bn")
    fused = densenet({"name": "cuda_bn", "backend": backend})
    fused.load_state_dict(plain.state_dict())
    assert (
        sum(isinstance(m, CudaBatchNorm) and m.activation == "relu" for m in fused.modules()) == 10
    )
    x = torch.randn(2, 1, 6, 6)
    for mode in ("train", "eval"):
        getattr(plain, mode)()
        getattr(fused, mode)()
        out_plain, out_fused = plain(x), fused(x)
        torch.testing.assert_close(out_fused, out_plain)
        out_plain.square().sum().backward()
        out_fused.square().sum().backward()
        for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, msg=lambda m, n=name: f"{n}: {m}")
            p.grad = q.grad = None


def test_torch_compile_traces_the_custom_ops_with_running_stat_updates():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 4, 3), CudaBatchNorm(4, backend="triton", activation="relu"), nn.Flatten()
        )

    eager, compiled = model(), model()
    step = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for seed in range(2):
        x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(seed))
        want, got = eager(x), step(x)
        torch.testing.assert_close(got, want)
        want.sum().backward()
        got.sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m, n=name: f"{n}: {m}")
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, msg=lambda m, k=key: k + m)


CUSTOM_OPS = ("batch_norm_stats", "batch_norm_train", "batch_norm_eval", "batch_norm_backward")


@pytest.mark.parametrize("device_type", ["CPU", "CUDA"])
def test_the_ops_register_no_autocast_rule(device_type):
    """A rule would cast the running buffers to bf16 copies (their update lost) or the input to
    float32 (its saved copy doubled): see normlab.ops.batchnorm.ops."""
    for op in CUSTOM_OPS:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"normlab::{op}", f"Autocast{device_type}"
        ), op


def test_autocast_bf16_conv_output_goes_through_the_kernels():
    """Under CPU autocast the kernels do what native BN does: the bf16 input stays bf16 (output
    and input gradient too), the statistics and the running buffers are float32, the parameter
    gradients float32; eval mode likewise, and a float32 input stays float32."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3)
    ours = CudaBatchNorm(4, backend="triton", activation="relu")
    plain = nn.BatchNorm2d(4)
    x = torch.randn(3, 2, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = conv(x)
        y_ours, y_plain = ours(features), F.relu(plain(features))
    assert features.dtype == torch.bfloat16 and y_ours.dtype == torch.bfloat16
    torch.testing.assert_close(y_ours, y_plain)
    for name in ("running_mean", "running_var"):
        assert getattr(ours, name).dtype == torch.float32
        torch.testing.assert_close(getattr(ours, name), getattr(plain, name))
    assert int(ours.num_batches_tracked) == 1

    upstream = torch.randn(y_ours.shape).bfloat16()
    grads_ours = torch.autograd.grad(y_ours, (features, ours.weight, ours.bias), upstream)
    grads_plain = torch.autograd.grad(y_plain, (features, plain.weight, plain.bias), upstream)
    assert [g.dtype for g in grads_ours] == [torch.bfloat16, torch.float32, torch.float32]
    for mine, native in zip(grads_ours, grads_plain, strict=True):
        # The bf16 input gradients, rounded from float32 values computed in different orders,
        # may be one bf16 step apart: 2^-7 relative at most.
        torch.testing.assert_close(mine, native, rtol=2**-7, atol=2**-8)

    ours.eval(), plain.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = conv(x)
        y_ours, y_plain = ours(features), F.relu(plain(features))
        assert y_ours.dtype == torch.bfloat16
        torch.testing.assert_close(y_ours, y_plain)
        y_float = ours(x.repeat(1, 2, 1, 1))
    assert y_float.dtype == torch.float32


def test_lightning_sync_plugin_keeps_cuda_bn_and_turns_its_sync_on():
    from normlab.norm.lightning_sync_plugin import NormSync

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), CudaBatchNorm(4, activation="relu"), nn.BatchNorm2d(4)
    )
    plugin = NormSync(group_size=2)
    synced = plugin.apply(model)
    assert type(synced[1]) is CudaBatchNorm and synced[1].sync and synced[1].group_size == 2
    assert synced[1].activation == "relu"
    assert type(synced[2]) is SyncBatchNorm
    reverted = plugin.revert(synced)
    assert type(reverted[1]) is CudaBatchNorm and not reverted[1].sync
    assert reverted[1].group_size is None and type(reverted[2]) is nn.BatchNorm2d


def test_converting_keeps_a_fused_activation_or_refuses_without_touching_the_model():
    from normlab.norm import convert_norms

    model = nn.Sequential(nn.Conv2d(3, 4, 1), CudaBatchNorm(4, activation="leaky_relu"))
    with pytest.raises(ConfigError, match=r"1 applies a fused LeakyReLU.*'bn' cannot take"):
        convert_norms(model, "bn")
    assert type(model[1]) is CudaBatchNorm  # untouched
    converted = convert_norms(model, {"name": "cuda_bn", "backend": "reference"})
    assert converted[1].activation == "leaky_relu" and converted[1].backend == "reference"
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(converted(x), F.leaky_relu(nn.BatchNorm2d(4)(model[0](x))))


def test_lightning_trains_through_the_kernels(compose_config, fast):
    """``norm=cuda_bn norm.backend=triton`` in a real run (channels_last, Lightning bf16 AMP), on
    a DenseNet small enough for Triton's interpreter (fp32 runs are covered with backend auto)."""
    from normlab.train import train

    cfg = compose_config(
        "experiment=densenet_digits",
        "norm=cuda_bn",
        "norm.backend=triton",
        "trainer.precision=bf16-mixed",
        "debug=fdr",
        "model._target_=normlab.models.densenet.DenseNet",
        "+model.growth_rate=4",
        "+model.block_config=[1,1]",
        "+model.num_init_features=8",
        "+model.stem=cifar",
        "data.image_size=8",
        *fast,
        "data.batch_size=4",
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert 0.0 <= metrics["test/acc"] <= 1.0
