"""Generated datasets (digit scenes, digit pairs): interrupted or foreign folders are never used."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from normlab.data import DigitPairsDataModule, DigitScenesDataModule
from normlab.errors import ConfigError

GENERATED = [
    pytest.param(DigitScenesDataModule, {"canvas_size": 64, "digit_size": [16, 24]}, id="scenes"),
    pytest.param(DigitPairsDataModule, {}, id="pairs"),
]
TINY = {"num_train": 6, "num_val": 3, "num_test": 3}


@pytest.mark.parametrize(("module", "options"), GENERATED)
def test_interrupted_generation_leaves_nothing_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module, options
) -> None:
    calls = {"n": 0}
    real_save = Image.Image.save

    def failing_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    dm = module(str(tmp_path), **TINY, **options)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    assert not dm.is_generated
    assert list(Path(dm.root).parent.iterdir()) == []  # no half-written folder remains
    monkeypatch.setattr(Image.Image, "save", real_save)
    dm.setup("fit")
    assert dm.is_generated and len(dm.train_set) == 6


@pytest.mark.parametrize(("module", "options"), GENERATED)
def test_foreign_folder_at_tag_is_not_used(tmp_path: Path, module, options) -> None:
    dm = module(str(tmp_path), **TINY, **options)
    Path(dm.root, "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match="delete it to regenerate"):
        dm.setup()
