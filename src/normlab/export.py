"""Export a checkpoint's inference network: ``python -m normlab.export ckpt_path=...``.

Loads a checkpoint of ``normlab.train``, builds the task's inference network, folds its norms into
its convolutions (``fold_norms=true``, :mod:`normlab.norm.fold`), writes it as TorchScript or ONNX,
runs the written file on the example batch and reports how far each step moved the outputs (see
``conf/export.yaml``). ``fold_norms`` and :class:`FoldReport` are importable from here too.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from normlab.errors import ConfigError
from normlab.norm.fold import FoldReport, fold_norms, max_difference, run_example
from normlab.runs import (
    check_data_fits,
    chosen_weights,
    exit_on_config_error,
    instantiate_data,
    load_run_info,
    load_trained_module,
)
from normlab.utils.dependency_warnings import quiet_dependency_warnings
from normlab.utils.hydra_run import CONFIG_DIR, register_resolvers
from normlab.validation import name_config_keys

__all__ = ["FORMATS", "FoldReport", "export", "fold_norms", "main"]

log = logging.getLogger("normlab.export")
register_resolvers()
quiet_dependency_warnings()

FORMATS = ("torchscript", "onnx")


def _export_torchscript(network: nn.Module, example_inputs: tuple, path: Path) -> Any:
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export; TorchScript files still load in
        # C++ (libtorch) and in Python without the model's code, which is why this format exists.
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
        traced = torch.jit.trace(network, example_inputs, check_trace=False)
        traced.save(str(path))
        loaded = torch.jit.load(str(path))
    return run_example(loaded, example_inputs)


def _check_onnx_installed() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"format=onnx needs {' and '.join(missing)}: pip install {' '.join(missing)} "
            "(or pip install -e '.[export]')"
        )


def _export_onnx(network: nn.Module, example_inputs: tuple, path: Path) -> Any:
    # The batch axis of every input is left free (AUTO: unless the network's code fixes it), so
    # the file takes one image as well as the example batch; the report's batch_size says which.
    batch_free = tuple({0: torch.export.Dim.AUTO} for _ in example_inputs)
    torch.onnx.export(
        network, example_inputs, str(path), external_data=False, dynamic_shapes=batch_free
    )
    if importlib.util.find_spec("onnxruntime") is None:
        log.warning("onnxruntime is not installed: the exported file's outputs are not checked")
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {
        node.name: tensor.detach().cpu().numpy()
        for node, tensor in zip(session.get_inputs(), example_inputs, strict=True)
    }
    return [torch.from_numpy(array) for array in session.run(None, feeds)]


def _onnx_batch_size(path: Path) -> str | list[int | str]:
    """The batch size an ONNX file takes, from its inputs' declared shapes: "any" when every
    input's batch axis is free, else each input's ("any" or the one size it takes)."""
    import onnx

    inputs = onnx.load(str(path), load_external_data=False).graph.input
    # A free axis has a name (dim_param), a fixed one a value.
    sizes = [
        "any"
        if node.type.tensor_type.shape.dim[0].dim_param
        else node.type.tensor_type.shape.dim[0].dim_value
        for node in inputs
    ]
    return "any" if all(size == "any" for size in sizes) else sizes


def _output_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    ckpt = Path(cfg.ckpt_path)
    # <run>/checkpoints/<name>.ckpt → <run>/export/<name>
    return ckpt.parent.parent / "export" / ckpt.stem


def _model_targets(model_cfg: DictConfig) -> str | dict[str, str]:
    """The model's ``_target_``; for a task of several networks (pix2pix's generator and
    discriminator), each network's."""
    if "_target_" in model_cfg:
        return model_cfg._target_
    return {
        name: node._target_
        for name, node in model_cfg.items()
        if isinstance(node, DictConfig) and "_target_" in node
    }


def _first_batch(datamodule: pl.LightningDataModule) -> Any:
    datamodule.setup("validate")
    return next(iter(datamodule.val_dataloader()))


@name_config_keys
def export(cfg: DictConfig) -> dict[str, Any]:
    """Export the inference network of ``cfg.ckpt_path``; return the report written with it."""
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ConfigError(
            "ckpt_path must be set: python -m normlab.export ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r} is not one of: {', '.join(FORMATS)}")
    if cfg.format == "onnx":
        _check_onnx_installed()
    pl.seed_everything(cfg.seed, workers=True)
    info = load_run_info(cfg.ckpt_path, cfg.get("imports"))
    weights = chosen_weights(cfg.ckpt_path, info, cfg.get("weights"))
    trained = OmegaConf.create(info["config"])
    module = load_trained_module(cfg.ckpt_path, trained, weights).eval()
    datamodule = instantiate_data(cfg.data if cfg.get("data") else trained.data)
    check_data_fits(cfg.ckpt_path, trained, datamodule)
    network, example_inputs = module.inference_network(_first_batch(datamodule))
    network.eval()
    reference = run_example(network, example_inputs)

    fold_report = None
    exported_network = network
    if cfg.fold_norms:
        exported_network, fold_report = fold_norms(network, example_inputs)
    folded_difference = max_difference(reference, run_example(exported_network, example_inputs))

    output_dir = _output_dir(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / ("model.pt" if cfg.format == "torchscript" else "model.onnx")
    if cfg.format == "torchscript":
        exported_output = _export_torchscript(exported_network, example_inputs, path)
    else:
        exported_output = _export_onnx(exported_network, example_inputs, path)

    report: dict[str, Any] = {
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        "trained_at_git_sha": info["git_sha"],
        "task": trained.task._target_,
        "model": _model_targets(trained.model),
        "norm": trained.norm.name,
        "network": type(network).__name__,
        "weights": weights,
        "format": cfg.format,
        "exported_file": str(path.resolve()),
        "example_input_shapes": [list(t.shape) for t in example_inputs],
        "batch_size": _onnx_batch_size(path) if cfg.format == "onnx" else None,
        "fold_norms": bool(cfg.fold_norms),
        "max_abs_difference_folded": folded_difference,
        "max_abs_difference_exported": (
            None if exported_output is None else max_difference(reference, exported_output)
        ),
        "folding": fold_report.to_dict() if fold_report is not None else None,
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "report.md").write_text(_markdown(report, fold_report))
    print(f"exported: {path}\nreport:   {output_dir / 'report.md'}")
    return report


def _markdown(report: dict[str, Any], fold_report: FoldReport | None) -> str:
    exported = report["max_abs_difference_exported"]
    model = report["model"]
    if isinstance(model, dict):
        model = ", ".join(f"{name} `{target}`" for name, target in model.items())
    else:
        model = f"`{model}`"
    lines = [
        f"# Export of `{Path(report['checkpoint']).name}`",
        "",
        f"- checkpoint: `{report['checkpoint']}` (trained at git {report['trained_at_git_sha']})",
        f"- task: `{report['task']}`, model: {model}, norm: `{report['norm']}`, weights: "
        f"{report['weights']}",
        f"- exported: `{report['exported_file']}` ({report['format']}, network "
        f"`{report['network']}`, example input {report['example_input_shapes']}"
        + (f", batch size {report['batch_size']})" if report["batch_size"] else ")"),
        "- max |output − checkpoint model's eval output| on the example batch: "
        f"{report['max_abs_difference_folded']:.3g} after folding, "
        + (
            f"{exported:.3g} from the exported file"
            if exported is not None
            else "exported file not run"
        ),
        "",
    ]
    if fold_report is None:
        lines.append("Norms were not folded (fold_norms=false).")
    else:
        lines += ["## Folding", "", fold_report.to_markdown()]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        export(cfg)
    except Exception as error:
        exit_on_config_error(error)


if __name__ == "__main__":
    main()
