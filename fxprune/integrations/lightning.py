"""PyTorch Lightning adapter: ``trainer = Trainer(callbacks=[FxpruneCallback()])``.

The LightningModule holds a prepared model (``self.net = fxprune.prepare(...)``)
and returns its loss as usual. The callback:

* at ``on_train_start`` attaches every ``trainer.optimizers`` entry to the
  Pruner (:meth:`fxprune.Pruner.attach`): after each ``optimizer.step()``
  Lightning really runs, pruned entries are re-zeroed and step-scheduled
  pruners advance. Steps that Lightning's mixed-precision scaler skips, and
  batches that only accumulate gradients, are not counted;
* at ``on_train_epoch_start`` sets the epoch to ``trainer.current_epoch``
  (epoch-scheduled pruners update there);
* at ``on_train_end`` detaches the optimizers again.

The schedule state lives in the LightningModule's ``state_dict`` (it is the
prepared model's), so Lightning checkpoints resume it.
"""
from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # the standalone package
    from pytorch_lightning import Callback, LightningModule, Trainer  # type: ignore[no-redef]

from fxprune.pruner import Pruner, find_pruner

__all__ = ["FxpruneCallback"]


class FxpruneCallback(Callback):
    """Drive a prepared model's pruning schedule from a Lightning ``Trainer``.

    ``pruner``: the Pruner to drive; by default the one prepared model found
    inside the LightningModule (an error if there are none or several).
    """

    def __init__(self, pruner: Pruner | None = None):
        super().__init__()
        self._pruner = pruner

    def pruner(self, pl_module: LightningModule) -> Pruner:
        return self._pruner if self._pruner is not None else find_pruner(pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pruner = self.pruner(pl_module)
        for optimizer in trainer.optimizers:
            if optimizer not in pruner.optimizers:
                pruner.attach(optimizer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.pruner(pl_module).on_epoch_begin(trainer.current_epoch)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pruner = self.pruner(pl_module)
        for optimizer in trainer.optimizers:
            pruner.detach(optimizer)
        pruner.apply_masks()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> Any:
        self.on_train_end(trainer, pl_module)
