"""normlab.eval and normlab.export refuse a file that is not a readable normlab checkpoint, and
data the checkpoint's model was not trained for, with one line naming the file or the mismatch
(exit 2, no traceback, nothing evaluated)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from cli import run_module

# The tests' own fixture writers (tests/ is on sys.path: it holds the root conftest.py).
from data_files import make_cifar, write_png
from normlab.eval import evaluate
from normlab.export import export
from normlab.runs import exit_on_config_error
from normlab.train import train
from normlab.utils.hydra_run import CONFIG_DIR

ERROR = "normlab: configuration error: "
ENTRY_POINTS = {"eval": evaluate, "export": export}


def _compose(overrides: list[str], config_name: str, output_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(output_dir.parent)
        cfg.paths.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A DenseNet-BC-40 trained two steps on 1-channel, 16-px, 10-class digits."""
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    cfg = _compose(
        [
            "model=densenet_bc_40",
            "data.image_size=16",
            "data.batch_size=8",
            "logger=csv",
            "callbacks.model_summary=null",
            "callbacks.progress_bar=null",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "test=false",
        ],
        "config",
        run_dir,
    )
    train(cfg)
    GlobalHydra.instance().clear()
    return run_dir / "checkpoints" / "last.ckpt"


def _one_error_line(entry: str, overrides: list[str], tmp_path: Path, capsys) -> str:
    """Run an entry point in this process as its main() does; return its one error line."""
    cfg = _compose(overrides, entry, tmp_path / entry)
    try:
        with pytest.raises(SystemExit) as exit_info:
            try:
                ENTRY_POINTS[entry](cfg)
            except Exception as error:
                exit_on_config_error(error)
    finally:
        GlobalHydra.instance().clear()
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith(ERROR)]
    assert exit_info.value.code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def _bad_file(kind: str, tmp_path: Path, checkpoint: Path) -> tuple[Path, str]:
    """A broken checkpoint file of ``kind`` and what the error line must say about it."""
    path = tmp_path / f"{kind}.ckpt"
    if kind == "text":
        path.write_text("epoch=3 val/acc=0.98\n")
        return path, "not a checkpoint written by torch.save"
    if kind == "empty":
        path.touch()
        return path, "the file is empty"
    data = checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "truncated or corrupt"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("kind", ["text", "empty", "truncated"])
def test_an_unreadable_checkpoint_is_named(entry, kind, digits_checkpoint, tmp_path, capsys):
    path, reason = _bad_file(kind, tmp_path, digits_checkpoint)
    line = _one_error_line(entry, [f"ckpt_path={path}"], tmp_path, capsys)
    assert f"ckpt_path={path} cannot be read: {reason}" in line


def _two_class_folder(root: Path) -> Path:
    for split in ("train", "val", "test"):
        for k, name in enumerate(("cat", "dog")):
            write_png(root / split / name / "a.png", "RGB", (20, 20), seed=k)
    return root


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("data", ["cifar10", "imagefolder", "image_size"])
def test_data_the_model_was_not_trained_for_is_named(
    entry, data, digits_checkpoint, tmp_path, capsys
):
    if data == "cifar10":  # 10 classes, but RGB
        make_cifar(tmp_path / "cifar", "cifar10", per_batch=4, n_test=6)
        overrides = [
            "data=cifar10",
            f"data.root={tmp_path / 'cifar'}",
            "data.check_integrity=false",
        ]
        expected = (
            "its model was trained with input channels 1, "
            "the data (CIFARDataModule) has input channels 3"
        )
    elif data == "imagefolder":  # the 10-class model on 2 classes
        root = _two_class_folder(tmp_path / "folder")
        overrides = ["data=imagefolder", f"data.root={root}", "data.image_size=16"]
        expected = (
            "its model was trained with classes 10, "
            "the data (ImageFolderDataModule) has classes 2 (cat, dog)"
        )
    else:
        overrides = ["data=digits", "data.image_size=32"]
        expected = (
            "trained with image size 16, "
            "the data (DigitsDataModule) has image size 32; set data.image_size=16"
        )
    line = _one_error_line(entry, [f"ckpt_path={digits_checkpoint}", *overrides], tmp_path, capsys)
    assert f"ckpt_path={digits_checkpoint} does not fit the data: " in line
    assert expected in line


def test_the_command_line_prints_one_line_for_a_truncated_checkpoint(digits_checkpoint, tmp_path):
    path, _ = _bad_file("truncated", tmp_path, digits_checkpoint)
    shutil.rmtree(tmp_path / "logs", ignore_errors=True)
    result = run_module(
        "normlab.eval",
        f"ckpt_path={path}",
        f"hydra.run.dir={tmp_path}/e",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1 and f"ckpt_path={path} cannot be read: truncated" in errors[0]
