"""normlab.eval and normlab.export refuse a file that is not a readable normlab checkpoint, and
data the checkpoint's model was not trained for, with one line naming the file or the mismatch
(exit 2, no traceback, nothing evaluated)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from cli import run_module

# The tests' own fixture writers (tests/ is on sys.path: it holds the root conftest.py).
from data_files import make_cifar, write_png
from normlab.eval import evaluate
from normlab.export import export
from normlab.runs import exit_on_config_error
from tiny_runs import compose_run, tiny_checkpoint, with_ema_weights

ERROR = "normlab: configuration error: "
ENTRY_POINTS = {"eval": evaluate, "export": export}


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A DenseNet-BC-40 trained two steps on 1-channel, 16-px, 10-class digits."""
    return tiny_checkpoint("classification", tmp_path_factory.mktemp("digits") / "run")


def _one_error_line(entry: str, overrides: list[str], tmp_path: Path, capsys) -> str:
    """Run an entry point in this process as its main() does; return its one error line."""
    cfg = compose_run(overrides, entry, tmp_path / entry)
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


# -- what a checkpoint may make eval and export build ----------------------------------------------


def _with_payload(checkpoint: Path, path: Path, place: str, payload: dict) -> Path:
    """A copy of ``checkpoint`` whose ``place`` (dotted keys into the checkpoint) is ``payload``."""
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    *parents, last = place.split(".")
    node = stored
    for key in parents:
        node = node[key]
    node[last] = payload
    torch.save(stored, path)
    return path


# The stored training config and the hyperparameters Lightning rebuilds the task from; nested too.
PLACES = {
    "hyper_parameters.model": "hyper_parameters.model._target_",
    "normlab.config.model.norm": "model.norm._target_",
    "normlab.config.data": "data._target_",
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("place", PLACES)
def test_a_checkpoint_cannot_run_code(entry, place, digits_checkpoint, tmp_path, capsys):
    """torch.hub.load would run the hub dir's hubconf.py; builtins.open(..., "w") would empty a
    file. Both are refused, naming the key and the target, before anything is built."""
    hub = tmp_path / "hub"
    hub.mkdir()
    marker = tmp_path / "hubconf_ran"
    (hub / "hubconf.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "def entry(**kwargs):\n    return None\n"
    )
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    payloads = {
        "torch.hub.load": {
            "_target_": "torch.hub.load",
            "repo_or_dir": str(hub),
            "model": "entry",
            "source": "local",
        },
        "builtins.open": {"_target_": "builtins.open", "_args_": [str(victim), "w"]},
    }
    for target, payload in payloads.items():
        path = _with_payload(digits_checkpoint, tmp_path / "payload.ckpt", place, payload)
        line = _one_error_line(entry, [f"ckpt_path={path}"], tmp_path, capsys)
        assert f"ckpt_path={path} {PLACES[place]}={target} is not a normlab target" in line
        assert "imports=[...]" in line
    assert not marker.exists() and victim.read_text() == "keep me"


def test_lightnings_instantiator_and_a_task_class_of_another_kind_are_refused(
    digits_checkpoint, tmp_path, capsys
):
    path = _with_payload(
        digits_checkpoint, tmp_path / "i.ckpt", "hyper_parameters._instantiator", "os.system"
    )
    line = _one_error_line("eval", [f"ckpt_path={path}"], tmp_path, capsys)
    assert "hyper_parameters._instantiator=os.system is not a normlab target" in line
    # On the allow-list (conf/ names it), but not a task: refused before it is called.
    path = _with_payload(
        digits_checkpoint,
        tmp_path / "t.ckpt",
        "normlab.config.task._target_",
        "lightning.pytorch.Trainer",
    )
    line = _one_error_line("export", [f"ckpt_path={path}"], tmp_path, capsys)
    assert "task._target_=lightning.pytorch.Trainer is not a normlab task" in line


def test_the_command_line_refuses_a_code_running_checkpoint_in_one_line(
    digits_checkpoint, tmp_path
):
    hub = tmp_path / "hub"
    hub.mkdir()
    marker = tmp_path / "hubconf_ran"
    (hub / "hubconf.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\ndef entry(**kwargs):\n    return None\n"
    )
    payload = {"_target_": "torch.hub.load", "repo_or_dir": str(hub), "model": "entry"}
    payload["source"] = "local"
    path = _with_payload(
        digits_checkpoint, tmp_path / "hub.ckpt", "hyper_parameters.model", payload
    )
    result = run_module(
        "normlab.export", f"ckpt_path={path}", f"hydra.run.dir={tmp_path}/x", cwd=tmp_path
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1 and "model._target_=torch.hub.load is not a normlab target" in errors[0]
    assert not marker.exists()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("raw", "found"),
    [
        (
            {"model.features.conv0.weight": "__import__('os')"},
            "'model.features.conv0.weight': a str",
        ),
        ({"model.features.conv0.weight": {"nested": torch.zeros(1)}}, "a dict"),
        ([torch.zeros(1)], "holds a list"),
    ],
    ids=["string", "nested", "list"],
)
def test_raw_weights_other_than_tensors_are_refused(
    entry, raw, found, digits_checkpoint, tmp_path, capsys
):
    """An EMA checkpoint's raw weights (Lightning's current_model_state) are loaded into the
    model: anything but tensors by name is refused in one line, whichever weights were asked."""
    path = with_ema_weights(digits_checkpoint, tmp_path / "ema.ckpt")
    stored = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(raw, dict):
        raw = {**stored["current_model_state"], **raw}
    stored["current_model_state"] = raw
    torch.save(stored, path)
    line = _one_error_line(entry, [f"ckpt_path={path}", "weights=ema"], tmp_path, capsys)
    assert f"ckpt_path={path} current_model_state holds " in line and found in line
    assert "only tensors" in line


# -- a checkpoint on another task's data ------------------------------------------------------------


@pytest.fixture(scope="module")
def task_checkpoints(tmp_path_factory, digits_checkpoint) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tasks")
    return {
        "classification": digits_checkpoint,
        "detection": tiny_checkpoint("detection", root / "detection"),
        "pix2pix": tiny_checkpoint("pix2pix", root / "pix2pix"),
    }


SMALL_PAIRS = [f"data.num_{split}=4" for split in ("train", "val", "test")]


@pytest.mark.parametrize(
    ("task", "data", "expected"),
    [
        (
            "detection",
            ["data=digits"],
            "its task (DetectionModule) takes images with boxes, the data (DigitsDataModule) "
            "gives labelled images; data of its kind: data=coco|digit_scenes",
        ),
        (
            "pix2pix",
            ["data=digits", "data.image_size=64"],
            "its task (Pix2PixModule) takes image pairs, the data (DigitsDataModule) gives "
            "labelled images; data of its kind: data=aligned|digit_pairs|facades",
        ),
        (
            "classification",
            ["data=digit_pairs", *SMALL_PAIRS],
            "its task (ClassificationModule) takes labelled images, the data "
            "(DigitPairsDataModule) gives image pairs; data of its kind: "
            "data=cifar10|cifar100|digits|fashion_mnist|imagefolder",
        ),
        (
            # An aligned module's image size is its crop: the hint names data.crop_size.
            "pix2pix",
            ["data=digit_pairs", "data.crop_size=32", *SMALL_PAIRS],
            "its model was trained with image size 64, the data (DigitPairsDataModule) has "
            "image size 32; "
            "set data.crop_size=64",
        ),
    ],
    ids=["detection-on-digits", "pix2pix-on-digits", "classifier-on-pairs", "pix2pix-crop"],
)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_data_of_another_kind_names_the_task(
    entry, task, data, expected, task_checkpoints, tmp_path, capsys
):
    checkpoint = task_checkpoints[task]
    line = _one_error_line(entry, [f"ckpt_path={checkpoint}", *data], tmp_path, capsys)
    assert f"ckpt_path={checkpoint} does not fit the data: {expected}" in line


# -- a checkpoint trained with imports=[a user package] ---------------------------------------------

USER_PACKAGE = "usernorms_for_eval"


def test_a_user_packages_norm_and_callback_load_with_imports(tmp_path, capsys, monkeypatch):
    """Its targets are allowed only when the package is named on the command line: the
    checkpoint's own word imports nothing."""
    (tmp_path / f"{USER_PACKAGE}.py").write_text(
        "import lightning.pytorch as pl\nfrom torch import nn\n\n"
        "from normlab.norm import register_norm\n\n\n"
        '@register_norm("gn1_from_imports")\n'
        "def group_norm_one_group(num_features, eps=1e-5):\n"
        "    return nn.GroupNorm(1, num_features, eps=eps)\n\n\n"
        "class Quiet(pl.Callback):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = tiny_checkpoint(
        "classification",
        tmp_path / "run",
        f"imports=[{USER_PACKAGE}]",
        "norm=none",
        "norm.name=gn1_from_imports",
        f"+callbacks.quiet._target_={USER_PACKAGE}.Quiet",
    )
    for entry in ENTRY_POINTS:
        line = _one_error_line(entry, [f"ckpt_path={checkpoint}"], tmp_path, capsys)
        assert (
            f"was trained with imports=[{USER_PACKAGE}], and a checkpoint never imports code by "
            f"itself: name them, imports=[{USER_PACKAGE}]"
        ) in line
    given = [f"ckpt_path={checkpoint}", f"imports=[{USER_PACKAGE}]"]
    try:
        metrics = evaluate(compose_run(given, "eval", tmp_path / "eval"))
        report = export(compose_run(given, "export", tmp_path / "export"))
    finally:
        GlobalHydra.instance().clear()
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert Path(report["exported_file"]).is_file() and report["norm"] == "gn1_from_imports"
