"""Unknown config-group options on the command line are refused in one line naming the options
(the entry point's wiring is checked in tests/reliability/test_bad_configs.py)."""

from __future__ import annotations

import pytest

from normlab.errors import ConfigError
from normlab.group_options import group_options, refuse_unknown_options
from normlab.utils.hydra_run import CONFIG_DIR, config_groups_help


def test_options_are_the_group_files():
    assert {"bn", "gn", "ln", "syncbn"} <= set(group_options(CONFIG_DIR / "norm"))
    assert "densenet_digits" in group_options(CONFIG_DIR / "experiment")


@pytest.mark.parametrize(
    ("arguments", "group", "option"),
    [
        (["norm=nope"], "norm", "nope"),
        (["model=densenet_bc_40", "experiment=nope"], "experiment", "nope"),
        (["-m", "norm=bn,nope"], "norm", "nope"),  # any value of a sweep
        (["+experiment=nope"], "experiment", "nope"),
        (["task/optimizer=nope"], "task/optimizer", "nope"),  # nested groups too
    ],
)
def test_an_unknown_option_is_named_with_the_group_options(arguments, group, option):
    with pytest.raises(ConfigError) as error:
        refuse_unknown_options(arguments)
    message = str(error.value)
    assert "\n" not in message
    options = ", ".join(group_options(CONFIG_DIR / group))
    assert message == (f"{group}={option!r}: no such config in conf/{group}/; options: {options}")


@pytest.mark.parametrize(
    "arguments",
    [
        ["norm=gn", "model=densenet_bc_40", "experiment=densenet_digits", "seed=3"],
        ["-m", "norm=bn,gn,ln", "data.batch_size=2,8"],
        ["experiment=null", "~debug", "model.head_norm={name:gn,num_groups:16}"],
        ["hydra/launcher=local", "norm.eps=1e-3"],  # Hydra's groups are Hydra's to check
        ["--config-dir", "/my/conf", "norm=mine"],  # options may come from elsewhere
        ["norm=bn,"],  # not an override Hydra can parse: Hydra reports it
    ],
)
def test_known_options_and_what_conf_cannot_judge_pass(arguments):
    refuse_unknown_options(arguments)


def test_help_lists_the_groups_to_choose_from_not_the_folders_of_config_parts():
    lines = dict(line.split(": ", 1) for line in config_groups_help().splitlines())
    assert "model/retinanet" not in lines  # retinanet/common.yaml: shared by the retinanet models
    assert not any(group.startswith("hydra") for group in lines)
    models = sorted(path.stem for path in (CONFIG_DIR / "model").glob("*.yaml"))
    assert lines["model"] == ", ".join(models)
    assert {"paths", "extras", "task/optimizer", "norm"} <= set(lines)
