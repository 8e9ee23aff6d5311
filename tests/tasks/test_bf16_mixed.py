"""``trainer.precision=bf16-mixed`` on CPU (Lightning's bfloat16 autocast): every registered norm
trains in every model family, and after training the model's parameters and every norm's
running buffers are still float32 (autocast rounds activations, never state)."""

from __future__ import annotations

import math

import pytest
import torch

import normlab.train as train_entry
from normlab.norm import NORMS, is_norm

FAMILIES = ("densenet", "convnext", "retinanet", "pix2pix")
# One fast run per family with a norm of each kind (batch statistics, group statistics, none
# across the batch); the full norm × family grid is slow (about 5 s a run on an idle core).
FAST = {("densenet", "bn"), ("convnext", "ln"), ("retinanet", "gn"), ("pix2pix", "frn")}
QUIET = ["logger=csv", "callbacks.model_summary=null", "callbacks.progress_bar=null"]


def _family_overrides(family: str) -> list[str]:
    tiny = ["data.num_train=4", "data.num_val=2", "data.num_test=2", "data.batch_size=2"]
    return {
        "densenet": ["model=densenet_bc_40", "data.image_size=16", "data.batch_size=8"],
        "convnext": ["model=convnext_atto", "data.batch_size=8"],
        "retinanet": ["experiment=retinanet_digits", "model.fpn_channels=64", *tiny],
        "pix2pix": [
            "experiment=pix2pix_digits",
            "model.generator.ngf=4",
            "model.discriminator.ndf=4",
            *tiny,
        ],
    }[family]


def _grid() -> list:
    return [
        pytest.param(family, norm, marks=() if (family, norm) in FAST else pytest.mark.slow)
        for family in FAMILIES
        for norm in sorted(NORMS)
    ]


@pytest.mark.parametrize(("family", "norm"), _grid())
def test_bf16_mixed_fast_dev_run_keeps_float32_state(compose_config, monkeypatch, family, norm):
    trained = []
    fit_and_test = train_entry._fit_and_test

    seen_dtypes = set()

    def record_input(layer, args):
        if layer.training:
            seen_dtypes.add(args[0].dtype)

    def keep_module(cfg, trainer, module, *rest):
        trained.append(module)
        for layer in module.modules():
            if is_norm(layer):
                layer.register_forward_pre_hook(record_input)
        return fit_and_test(cfg, trainer, module, *rest)

    monkeypatch.setattr(train_entry, "_fit_and_test", keep_module)
    cfg = compose_config(
        "debug=fdr",
        "trainer.precision=bf16-mixed",
        f"norm={norm}",
        *_family_overrides(family),
        *QUIET,
    )
    metrics = train_entry.train(cfg)

    assert metrics and all(math.isfinite(value) for value in metrics.values()), metrics
    (module,) = trained
    norms = [layer for layer in module.modules() if is_norm(layer)]
    assert norms or norm == "none"
    # The norms were trained on what autocast's bf16 convolutions hand them.
    assert torch.bfloat16 in seen_dtypes or not norms, seen_dtypes
    wrong = {
        name: tensor.dtype
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]
        if tensor.is_floating_point() and tensor.dtype != torch.float32
    }
    assert not wrong, wrong
