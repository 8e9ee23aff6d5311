"""The training recipes the studies run: each one a conf/experiment/*.yaml, plus the words its
results.md describes it with."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from normlab.utils.hydra_run import CONFIG_DIR

# Every study runs each configuration with these seeds unless told otherwise (--seeds).
DEFAULT_SEEDS = [42, 1, 2]


@dataclass(frozen=True)
class DataRecipe:
    """A data set a study can run on (``--data <name>``) and the experiment config it trains
    there. ``suffix`` keeps the data sets' runs and reports apart: runs in
    ``logs/studies/<study><suffix>``, ``runs<suffix>.csv`` and ``results<suffix>.md``."""

    name: str
    experiment: str
    description: str
    suffix: str = ""

    @cached_property
    def config(self) -> DictConfig:
        """The experiment's composed config, as a run with no overrides would see it."""
        with initialize_config_dir(str(CONFIG_DIR), version_base=None):
            return compose("config", [f"experiment={self.experiment}"])

    def lr(self, batch: int) -> float:
        """The linear scaling rule (as in the GroupNorm paper): the experiment's learning rate
        at its own batch size, scaled to ``batch`` images per optimizer step."""
        return self.config.task.optimizer.lr * batch / self.config.data.batch_size

    def training_steps(self, batch: int) -> int:
        """Optimizer steps of a run at ``batch``: the recipe's training images and epochs."""
        if self.config.data.train_subset is None:
            raise ValueError(f"experiment={self.experiment} must set data.train_subset")
        return self.config.trainer.max_epochs * -(-self.config.data.train_subset // batch)


# The Fashion-MNIST recipe of the norm studies (conf/experiment/fashion_norm_study.yaml).
FASHION_MNIST = DataRecipe(
    "fashion_mnist",
    "fashion_norm_study",
    "DenseNet-BC (L=40, k=12) on Fashion-MNIST at 16 px: a stratified 10,000 of the training "
    "images, 1 epoch, SGD with Nesterov momentum and a one-cycle schedule, no augmentation; "
    "test accuracy on the official 10,000 test images",
)
# norm_vs_batch_size's earlier digits version (conf/experiment/densenet_digits_study.yaml).
SMALL_DENSENET_DIGITS = DataRecipe(
    "digits",
    "densenet_digits_study",
    "DenseNet-BC (L=40, k=12) on scikit-learn's digits at 16 px, 5 epochs of AdamW + one-cycle",
    suffix="_digits",
)
# accumulation_vs_batch's earlier digits version (conf/experiment/densenet_digits.yaml).
DENSENET_DIGITS = DataRecipe(
    "digits",
    "densenet_digits",
    "DenseNet-BC (L=100, k=12) on scikit-learn's digits at 28 px, 3 epochs of AdamW + "
    "one-cycle, channels_last",
    suffix="_digits",
)
