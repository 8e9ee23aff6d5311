"""Lightning's ``trainer.sync_batchnorm=true`` for our norms. Kept out of ``normlab.norm``'s own
imports so that building a norm does not import Lightning."""

from __future__ import annotations

from lightning.pytorch.plugins.layer_sync import LayerSync
from torch import nn

from normlab.norm.sync_batchnorm import SyncBatchNorm
from normlab.norm.traits import layer_traits


class NormSync(LayerSync):
    """``trainer.sync_batchnorm=true``: every norm whose traits say it ``syncs`` and that does not
    sync by itself becomes our :class:`~normlab.norm.SyncBatchNorm` (CPU and CUDA), never torch's
    CPU-refusing class; every other norm is left alone.

    A norm class can provide its own synchronised form with a ``to_synchronised(group_size)``
    method and undo it with ``to_unsynchronised()`` (cuda_bn turns its sync mode on, so it is
    never replaced by another class). :meth:`revert` restores the original classes.
    """

    def __init__(self, group_size: int | None = None) -> None:
        self.group_size = group_size

    def _convert(self, module: nn.Module) -> nn.Module:
        if hasattr(module, "to_synchronised"):
            return module.to_synchronised(self.group_size)
        traits = layer_traits(module)
        if traits is not None and traits.syncs and traits.syncs_itself is not True:
            sync = SyncBatchNorm.from_batchnorm(module, group_size=self.group_size)
            sync.original_class = type(module)
            return sync
        for name, child in module.named_children():
            module.add_module(name, self._convert(child))
        return module

    def apply(self, model: nn.Module) -> nn.Module:
        return self._convert(model)

    def revert(self, model: nn.Module) -> nn.Module:
        if hasattr(model, "to_unsynchronised"):
            return model.to_unsynchronised()
        original = getattr(model, "original_class", None)
        if isinstance(model, SyncBatchNorm) and original is not None:
            plain = original(
                model.num_features,
                model.eps,
                model.momentum,
                model.affine,
                model.track_running_stats,
            )
            plain.load_state_dict(model.state_dict())
            plain.to(device=model.running_mean.device if model.running_mean is not None else "cpu")
            plain.train(model.training)
            return plain
        for name, child in model.named_children():
            model.add_module(name, self.revert(child))
        return model
