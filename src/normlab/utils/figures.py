"""Render matplotlib figures, image grids and histograms, and send them to whichever loggers can
show them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchmetrics.utilities.plot import plot_confusion_matrix
from torchvision.utils import draw_bounding_boxes, make_grid


def figure_to_array(figure: Figure) -> np.ndarray:
    """An H×W×3 uint8 array of the rendered figure (no pyplot, so no global backend state)."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def confusion_matrix_figure(matrix: torch.Tensor, class_names: Sequence[str]) -> Figure:
    """A labelled heat map of a confusion matrix (rows: true class, columns: predicted), drawn by
    torchmetrics on a figure of our own (no pyplot figure is left open); counts are written into
    the cells up to 20 classes, where they still fit."""
    size = max(4.0, 0.45 * len(class_names) + 2.0)
    figure = Figure(figsize=(size, size), dpi=100)
    plot_confusion_matrix(
        matrix.detach().cpu(),
        ax=figure.add_subplot(),
        add_text=len(class_names) <= 20,
        labels=list(class_names),
        cmap="Blues",
    )
    figure.tight_layout()
    return figure


def image_grid(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """An H×W×3 uint8 grid of N×C×H×W images, each min-max scaled on its own for display."""
    grid = make_grid(
        images.detach().float().cpu(),
        nrow=nrow,
        padding=2,
        pad_value=1.0,
        normalize=True,
        scale_each=True,
    )
    return _to_uint8(grid)


def log_image(
    loggers: Sequence[Logger], key: str, image: np.ndarray, step: int, caption: str | None = None
) -> None:
    """Log an H×W×3 uint8 image to every logger that displays images (wandb, TensorBoard)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            extra = {"caption": [caption]} if caption else {}
            logger.log_image(key=key, images=[image], step=step, **extra)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")


def log_histograms(
    loggers: Sequence[Logger], histograms: Mapping[str, torch.Tensor], step: int
) -> None:
    """Log the distribution of each 1-D tensor to every logger that displays distributions:
    ``wandb.Histogram`` for wandb, ``add_histogram`` for TensorBoard."""
    values = {key: tensor.detach().double().cpu().numpy() for key, tensor in histograms.items()}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.log_metrics({k: wandb.Histogram(v) for k, v in values.items()}, step=step)
        elif isinstance(logger, TensorBoardLogger):
            for key, array in values.items():
                logger.experiment.add_histogram(key, array, global_step=step)


def _wandb_box_group(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    scores: torch.Tensor | None = None,
) -> dict:
    """One wandb ``boxes`` group (pixel coordinates) with class names and optional scores."""
    box_data = []
    for index, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist(), strict=True)):
        x0, y0, x1, y1 = box
        entry = {
            "position": {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1},
            "domain": "pixel",
            "class_id": int(label),
            "box_caption": class_names[label],
        }
        if scores is not None:
            score = float(scores[index])
            entry["box_caption"] = f"{class_names[label]} {score:.2f}"
            entry["scores"] = {"score": score}
        box_data.append(entry)
    return {"box_data": box_data, "class_labels": dict(enumerate(class_names))}


def draw_detections(
    image: torch.Tensor,
    prediction: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    class_names: Sequence[str],
) -> torch.Tensor:
    """A 3×H×W uint8 image with ground truth (green) and predictions (red, "class score")."""
    canvas = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    if canvas.shape[0] == 1:
        canvas = canvas.expand(3, -1, -1)
    if len(target["boxes"]):
        canvas = draw_bounding_boxes(
            canvas,
            target["boxes"].cpu(),
            labels=[class_names[i] for i in target["labels"].tolist()],
            colors="lime",
        )
    if len(prediction["boxes"]):
        captions = [
            f"{class_names[label]} {score:.2f}"
            for label, score in zip(
                prediction["labels"].tolist(), prediction["scores"].tolist(), strict=True
            )
        ]
        canvas = draw_bounding_boxes(
            canvas, prediction["boxes"].cpu(), labels=captions, colors="red"
        )
    return canvas


def log_detections(
    loggers: Sequence[Logger],
    key: str,
    images: Sequence[torch.Tensor],
    predictions: Sequence[dict[str, torch.Tensor]],
    targets: Sequence[dict[str, torch.Tensor]],
    class_names: Sequence[str],
    step: int,
) -> None:
    """Images with predicted and ground-truth boxes: as interactive box overlays in wandb (one
    toggle per group, class names, score slider), drawn into a grid for TensorBoard."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            arrays = [
                (image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255)
                .round()
                .astype(np.uint8)
                for image in images
            ]
            boxes = [
                {
                    "predictions": _wandb_box_group(
                        p["boxes"].cpu(), p["labels"].cpu(), class_names, p["scores"].cpu()
                    ),
                    "ground_truth": _wandb_box_group(
                        t["boxes"].cpu(), t["labels"].cpu(), class_names
                    ),
                }
                for p, t in zip(predictions, targets, strict=True)
            ]
            logger.log_image(key=key, images=arrays, step=step, boxes=boxes)
        elif isinstance(logger, TensorBoardLogger):
            drawn = [
                draw_detections(image, p, t, class_names)
                for image, p, t in zip(images, predictions, targets, strict=True)
            ]
            size = max(d.shape[1] for d in drawn), max(d.shape[2] for d in drawn)
            padded = torch.stack(
                [
                    torch.nn.functional.pad(d, (0, size[1] - d.shape[2], 0, size[0] - d.shape[1]))
                    for d in drawn
                ]
            )
            grid = make_grid(padded, nrow=4, padding=2, pad_value=255)
            logger.experiment.add_image(
                key, grid.permute(1, 2, 0).numpy(), global_step=step, dataformats="HWC"
            )


def translation_grid(
    inputs: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor
) -> np.ndarray:
    """An H×W×3 uint8 grid with one row per sample: input | output | target.

    Images are in [-1, 1] (a Tanh generator's range) and shown on that fixed scale, so a washed-out
    output looks washed out; 1-channel images are shown in grey.
    """

    def to_rgb(images: torch.Tensor) -> torch.Tensor:
        images = images.detach().float().cpu()
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    rows = torch.stack([to_rgb(inputs), to_rgb(outputs), to_rgb(targets)], dim=1).flatten(0, 1)
    grid = make_grid(rows, nrow=3, padding=2, pad_value=1.0, normalize=True, value_range=(-1, 1))
    return _to_uint8(grid)


def _to_uint8(grid: torch.Tensor) -> np.ndarray:
    """A 3×H×W grid in [0, 1] as the H×W×3 uint8 array loggers take."""
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
