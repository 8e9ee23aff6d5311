"""Render matplotlib figures and image grids, and send them to whichever loggers can show them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchvision.utils import make_grid


def figure_to_array(figure: Figure) -> np.ndarray:
    """An H×W×3 uint8 array of the rendered figure (no pyplot, so no global backend state)."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def confusion_matrix_figure(matrix: torch.Tensor, class_names: Sequence[str]) -> Figure:
    """A labelled heat map of a confusion matrix (rows: true class, columns: predicted)."""
    matrix = matrix.detach().cpu().numpy()
    size = max(4.0, 0.45 * len(class_names) + 2.0)
    figure = Figure(figsize=(size, size), dpi=100)
    axes = figure.add_subplot()
    axes.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=class_names, rotation=90)
    axes.set_yticks(ticks, labels=class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(class_names) <= 20:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, col), count in np.ndenumerate(matrix):
            color = "white" if count > threshold else "black"
            axes.text(col, row, str(int(count)), ha="center", va="center", color=color, fontsize=7)
    figure.tight_layout()
    return figure


def image_grid(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """An H×W×3 uint8 grid of N×C×H×W images, each min-max scaled on its own for display."""
    images = images.detach().float().cpu()
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    images = (images - low) / (high - low).clamp_min(1e-8)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


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
