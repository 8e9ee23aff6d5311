"""Every data module family takes its loading arguments (batch size, workers, seed) from one base,
so each refuses a bad one with the same one-line message and reports undecodable samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from normlab.data import DigitPairsDataModule, DigitScenesDataModule, DigitsDataModule
from normlab.data.bad_samples import SkipUndecodable
from normlab.data.datamodule import SplitDataModule
from normlab.ranges import ArgumentError


class _Files(list):
    """The least a dataset read under ``on_bad_sample=skip`` offers: items and their files."""

    def sample_file(self, index: int) -> str:
        return self[index]


FAMILIES = [
    pytest.param(lambda root, **kw: DigitsDataModule(**kw), id="classification"),
    pytest.param(lambda root, **kw: DigitPairsDataModule(root, **kw), id="aligned"),
    pytest.param(lambda root, **kw: DigitScenesDataModule(root, **kw), id="coco"),
]


@pytest.mark.parametrize("build", FAMILIES)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0, got -1"),
        ({"seed": "x"}, "seed must be an integer, got 'x'"),
    ],
)
def test_every_family_refuses_the_same_bad_loader_argument_alike(
    tmp_path: Path, build, kwargs: dict, message: str
) -> None:
    with pytest.raises(ArgumentError) as error:
        build(tmp_path, **kwargs)
    assert str(error.value) == message


@pytest.mark.parametrize("build", FAMILIES)
def test_every_family_keeps_its_loader_arguments_and_reports_at_teardown(
    tmp_path: Path, build, monkeypatch: pytest.MonkeyPatch
) -> None:
    dm = build(tmp_path, batch_size=3, num_workers=0, pin_memory=1, seed=7)
    assert isinstance(dm, SplitDataModule)
    assert (dm.batch_size, dm.num_workers, dm.pin_memory, dm.seed) == (3, 0, True, 7)
    reported: list[str] = []
    monkeypatch.setattr(SkipUndecodable, "report", lambda self: reported.append(self.split))
    dm.val_set = SkipUndecodable(_Files(["a.png", "b.png"]), "val")
    dm.teardown("validate")
    assert reported == ["val"]
