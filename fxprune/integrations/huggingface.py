"""Hugging Face adapter: ``Trainer(..., callbacks=[FxpruneTrainerCallback()])``.

The Trainer's model is (or contains) a prepared model whose forward returns
the loss the Trainer expects (``{"loss": ..., "logits": ...}``). Transformers
models usually reach fxprune through the per-submodule fallback, which is
fine here: the callback only needs ``prepared.pruner``. The callback:

* at ``on_train_begin`` attaches the Trainer's torch optimizer (unwrapped
  from accelerate's ``AcceleratedOptimizer``) to the Pruner
  (:meth:`fxprune.Pruner.attach`): after each ``optimizer.step()`` really
  taken, pruned entries are re-zeroed and step-scheduled pruners advance.
  ``pruner.step`` counts those steps, so it can lag ``state.global_step``
  (which also counts steps the AMP scaler skipped);
* at ``on_epoch_begin`` sets the epoch to ``floor(state.epoch)`` (a resumed
  run starts mid-epoch);
* at ``on_train_end`` detaches the optimizer.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from transformers import TrainerCallback

from fxprune.pruner import Pruner, find_pruner

__all__ = ["FxpruneTrainerCallback"]


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    # accelerate wraps the optimizer (AcceleratedOptimizer.optimizer); hooks go on the real one.
    while not type(optimizer).__module__.startswith("torch.") and isinstance(
        getattr(optimizer, "optimizer", None), torch.optim.Optimizer
    ):
        optimizer = optimizer.optimizer
    return optimizer


class FxpruneTrainerCallback(TrainerCallback):
    """Drive a prepared model's pruning schedule from a ``transformers.Trainer``.

    ``pruner``: the Pruner to drive; by default the one prepared model found
    inside the Trainer's model.
    """

    def __init__(self, pruner: Pruner | None = None):
        self._pruner = pruner
        self._attached: torch.optim.Optimizer | None = None

    def _find(self, model: torch.nn.Module | None) -> Pruner:
        if self._pruner is None:
            if model is None:
                raise ValueError("FxpruneTrainerCallback: the Trainer passed no model; give the pruner explicitly")
            self._pruner = find_pruner(model)
        return self._pruner

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        pruner = self._find(model)
        if optimizer is None:
            raise ValueError("FxpruneTrainerCallback: the Trainer passed no optimizer to on_train_begin")
        opt = _torch_optimizer(optimizer)
        if opt not in pruner.optimizers:
            pruner.attach(opt)
        self._attached = opt

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        self._find(model).on_epoch_begin(math.floor((state.epoch or 0.0) + 1e-9))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        pruner = self._find(model)
        if self._attached is not None:
            pruner.detach(self._attached)
            self._attached = None
        pruner.apply_masks()
