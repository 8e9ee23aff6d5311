"""The figures logged to wandb/TensorBoard: scaling of image grids, the confusion-matrix figure."""

import matplotlib.pyplot as plt
import numpy as np
import torch

from normlab.utils.figures import (
    confusion_matrix_figure,
    figure_to_array,
    image_grid,
    translation_grid,
)


def test_image_grid_scales_each_image_to_the_full_range():
    images = torch.stack([torch.linspace(-5, 5, 16), torch.linspace(100, 101, 16)]).view(2, 1, 4, 4)
    grid = image_grid(images, nrow=2)
    assert grid.shape == (8, 14, 3) and grid.dtype == np.uint8
    for left in (2, 8):  # each tile, inside the 2-pixel padding
        tile = grid[2:6, left : left + 4, 0]
        assert tile.min() == 0 and tile.max() == 255
    assert (grid[:2] == 255).all()  # white padding


def test_translation_grid_keeps_the_generator_range_fixed():
    inputs = torch.full((1, 1, 4, 4), -1.0)
    outputs = torch.zeros(1, 3, 4, 4)
    targets = torch.full((1, 3, 4, 4), 3.0)  # outside [-1, 1]: clipped to white
    grid = translation_grid(inputs, outputs, targets)
    assert grid.shape == (8, 20, 3)
    assert (grid[2:6, 2:6] == 0).all()
    assert (grid[2:6, 8:12] == 128).all()
    assert (grid[2:6, 14:18] == 255).all()


def test_confusion_matrix_figure_renders_without_pyplot_figures():
    open_before = plt.get_fignums()
    matrix = torch.eye(3, dtype=torch.long) * 5
    array = figure_to_array(confusion_matrix_figure(matrix, ["a", "b", "c"]))
    assert array.ndim == 3 and array.shape[2] == 3
    assert plt.get_fignums() == open_before
