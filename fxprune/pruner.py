"""The Pruner: the one stateful object of a prepared model.

There is exactly one per prepared model, reachable as ``prepared.pruner``
(the seed's "singleton", without global state). It is an ``nn.Module``
registered on the prepared model so that its state -- the current epoch, the
number of finished batches and each pruner's goal -- is saved and restored by
the prepared model's own ``state_dict()``, next to the masks. Loading a
mid-schedule ``state_dict`` into a freshly prepared model therefore resumes
exactly where training stopped.

Hooks follow the seed's training loop::

    for epoch in range(epochs):
        pruner.on_epoch_begin(epoch)           # raise goals per the schedule, update masks
        for x, y in loader:
            pruner.on_batch_begin()            # re-zero pruned entries
            loss = criterion(model(x), y)
            loss = pruner.on_minibatch_end(model, loss)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            pruner.on_batch_end()              # re-zero what the optimizer moved
        pruner.on_epoch_end(epoch)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxprune.config import PruningConfig
from fxprune.masks import select_masks
from fxprune.plan import PruningPlan
from fxprune.policies import POLICIES
from fxprune.report import PrepareReport
from fxprune.rewrite import InstalledTarget
from fxprune.schedules import sparsity_at

__all__ = ["Pruner"]


class Pruner(nn.Module):
    """Owns the schedule and the policies of one prepared model; drives its masks."""

    def __init__(self, config: PruningConfig, plan: PruningPlan, targets: list[InstalledTarget], report: PrepareReport):
        super().__init__()
        self.config = config
        self.pruner_configs = list(plan.pruners.values())
        self.targets = targets  # plain list: the MaskedParameters are registered on the model itself
        self.prepare_report = report
        self.register_buffer("epoch", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        self.register_buffer("goals", torch.zeros(len(self.pruner_configs), dtype=torch.float64))

    # ------------------------------------------------------------------ hooks
    def on_epoch_begin(self, epoch: int) -> None:
        """Set the epoch; where the schedule raises a goal, prune up to it."""
        self.epoch.fill_(int(epoch))
        self.update_masks()

    def on_batch_begin(self, batch_id: int | None = None) -> None:
        """Re-zero pruned entries before the forward (free when nothing moved them)."""
        self.apply_masks()

    def on_minibatch_end(self, model: nn.Module | None = None, loss: torch.Tensor | None = None) -> Any:
        """Re-zero pruned entries after the forward; returns ``loss`` unchanged (the seed's contract)."""
        self.apply_masks()
        return loss

    def on_batch_end(self) -> None:
        """Re-zero what ``optimizer.step()`` moved (momentum, weight decay, Adam moments)."""
        self.apply_masks()
        self.step += 1

    def on_epoch_end(self, epoch: int | None = None) -> None:
        """Make sure the epoch ends with exactly-zero pruned entries."""
        self.apply_masks()

    # ---------------------------------------------------------- mask control
    def goal_at(self, epoch: int) -> dict[str, float]:
        """Each pruner's goal at ``epoch`` per its schedule (a dry run: changes nothing)."""
        return {
            p.name: sparsity_at(
                epoch,
                start=p.start_epoch,
                end=p.end_epoch,
                frequency=p.frequency,
                init=p.init_sparsity,
                target=p.target_sparsity,
                schedule=p.schedule,
            )
            for p in self.pruner_configs
        }

    def schedule_table(self, epochs: int) -> list[dict[str, float]]:
        """Goals for epochs ``0 .. epochs-1``; print it to check a schedule before training."""
        return [{"epoch": e, **self.goal_at(e)} for e in range(epochs)]

    def current_goals(self) -> dict[str, float]:
        """The goal each pruner has pruned to so far."""
        return {p.name: float(g) for p, g in zip(self.pruner_configs, self.goals)}

    @torch.no_grad()
    def update_masks(self) -> None:
        """Prune every pruner whose scheduled goal at the current epoch exceeds its current goal."""
        epoch = int(self.epoch)
        if epoch < 0:
            return
        goals = self.goal_at(epoch)
        for i, p in enumerate(self.pruner_configs):
            goal = goals[p.name]
            if goal <= float(self.goals[i]):
                continue
            group = [t.masked for t in self.targets if t.pruner == p.name]
            scores = [POLICIES[p.policy](m) for m in group]
            for m, mask in zip(group, select_masks(p, group, scores, goal)):
                m.set_mask(mask)
            self.goals[i] = goal

    def apply_masks(self) -> None:
        """Zero the stored pruned entries of every parameter that changed since the last call."""
        for t in self.targets:
            t.masked.apply_mask()

    def extra_repr(self) -> str:
        goals = ", ".join(f"{k}={v:.4f}" for k, v in self.current_goals().items())
        return f"epoch={int(self.epoch)}, step={int(self.step)}, goals=({goals})"
