"""``compile=true debug=fdr`` in every model family: a compiled fast dev run of DenseNet, ConvNeXt,
RetinaNet and pix2pix trains, validates and tests, with the networks compiled in place and their
state-dict keys those of an uncompiled run (slow: inductor's warm-up is tens of seconds a
family on 2 cores)."""

from __future__ import annotations

import math

import pytest
from test_bf16_mixed import FAMILIES, QUIET, _family_overrides

import normlab.train as train_entry

# A norm with batch statistics and buffers, one with per-sample statistics, per family.
NORMS = {"densenet": "bn", "convnext": "ln", "retinanet": "gn", "pix2pix": "bn"}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_fast_dev_run_of_each_family(compose_config, monkeypatch, family):
    trained = []
    fit_and_test = train_entry._fit_and_test

    def keep_module(cfg, trainer, module, *rest):
        trained.append(module)
        return fit_and_test(cfg, trainer, module, *rest)

    monkeypatch.setattr(train_entry, "_fit_and_test", keep_module)
    cfg = compose_config(
        "debug=fdr", "compile=true", f"norm={NORMS[family]}", *_family_overrides(family), *QUIET
    )
    metrics = train_entry.train(cfg)

    assert metrics and all(math.isfinite(value) for value in metrics.values()), metrics
    (module,) = trained
    networks = [getattr(module, name) for name in module.network_names]
    assert networks and all(net._compiled_call_impl is not None for net in networks)
    assert not any("_orig_mod" in key for key in module.state_dict())
