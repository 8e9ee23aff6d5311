"""The wandb logger of ``logger=wandb``: Lightning's, less one setting that only makes noise."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger``, except that it does not pass ``anonymous`` on to
    ``wandb.init`` unless asked to: Lightning always passes it, and wandb (>= 0.19) ignores the
    setting and prints "The anonymous setting has no effect" for every run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            del self._wandb_init["anonymous"]
