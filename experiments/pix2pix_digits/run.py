"""Train `experiment=pix2pix_digits` once, timed, and write results next to this file.

    make exp-pix2pix-digits                      # or: python -m experiments.pix2pix_digits.run
    make exp-pix2pix-digits ARGS="norm=in"       # extra Hydra overrides go to the training run
    python -m experiments.pix2pix_digits.run --from-run RUN_DIR --minutes M

Writes results.md (command, machine, wall time, test L1/PSNR/SSIM, the validation curves),
curves.png and samples.png (input | output | target for test pairs, from the best checkpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from PIL import Image

from experiments.lib.command_line import single_run, write_results
from experiments.lib.jobs import machine_line
from experiments.lib.results import column, read_metrics
from normlab.runs import instantiate_data, load_run_info
from normlab.tasks import Pix2PixModule
from normlab.utils.figures import translation_grid

HERE = Path(__file__).resolve().parent
METRICS = ["l1", "psnr", "ssim"]


def plot(rows: list[dict[str, str]], path: Path) -> None:
    figure = Figure(figsize=(9, 3), dpi=120)
    for index, metric in enumerate(METRICS):
        axes = figure.add_subplot(1, 3, index + 1)
        points = column(rows, f"val/{metric}")
        axes.plot([e + 1 for e, _ in points], [v for _, v in points], marker="o")
        axes.set_xlabel("epoch")
        axes.set_title(f"val/{metric}")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def save_samples(run_dir: Path, path: Path, count: int = 8) -> None:
    """Translate the first ``count`` test pairs with the best checkpoint, as the test run did."""
    best = next((run_dir / "checkpoints").glob("epoch*.ckpt"))
    config = OmegaConf.create(load_run_info(str(best))["config"])
    datamodule = instantiate_data(config.data)
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    module = Pix2PixModule.load_from_checkpoint(best, map_location="cpu").eval()
    inputs, targets = batch["A"][:count], batch["B"][:count]
    with torch.no_grad(), module.test_time_generator() as generator:
        outputs = generator(inputs)
    Image.fromarray(translation_grid(inputs, outputs, targets)).save(path)


def main() -> None:
    run_dir, seconds, overrides = single_run("pix2pix", "pix2pix_digits", sys.argv[1:])
    rows = read_metrics(run_dir)
    plot(rows, HERE / "curves.png")
    save_samples(run_dir, HERE / "samples.png")
    test = {m: column(rows, f"test/{m}")[-1][1] for m in METRICS}
    curves = {m: column(rows, f"val/{m}") for m in METRICS}
    first, best = curves["l1"][0][1], min(v for _, v in curves["l1"])
    lines = [
        "# pix2pix_digits: results",
        "",
        "Command: `python -m normlab.train "
        + " ".join(["experiment=pix2pix_digits", *overrides])
        + "` (run by `make exp-pix2pix-digits`).",
        f"Machine: {machine_line()}.",
        f"Wall time, data generation and test included: **{seconds / 60:.1f} min**.",
        f"Validation L1 after the first epoch {first:.4f}, best {best:.4f} "
        f"(**{best / first:.2f}×** the first-epoch value).",
        "",
        "Test split (digit samples never seen in training), best checkpoint:",
        "",
        "| L1 ([-1, 1] scale) | PSNR (dB) | SSIM |",
        "|---|---|---|",
        f"| {test['l1']:.4f} | {test['psnr']:.2f} | {test['ssim']:.4f} |",
        "",
        "Validation after each epoch (`curves.png`; test samples in `samples.png`):",
        "",
        "| epoch | L1 | PSNR | SSIM |",
        "|---|---|---|---|",
        *(
            f"| {e + 1} | {l1:.4f} | {psnr:.2f} | {ssim:.4f} |"
            for (e, l1), (_, psnr), (_, ssim) in zip(
                curves["l1"], curves["psnr"], curves["ssim"], strict=True
            )
        ),
        "",
    ]
    write_results(HERE / "results.md", "\n".join(lines))


if __name__ == "__main__":
    main()
