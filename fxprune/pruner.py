"""The Pruner: the one stateful object of a prepared model.

There is exactly one per prepared model, reachable as ``prepared.pruner``
(the seed's "singleton", without global state). It is an ``nn.Module``
registered on the prepared model so that its state -- the current epoch, the
number of optimizer steps (or finished batches) and each pruner's goal -- is
saved and restored by the prepared model's own ``state_dict()``, next to the
masks. Loading a mid-schedule ``state_dict`` into a freshly prepared model
therefore resumes exactly where training stopped.

Two ways to drive it, both supported:

*Hook style* (the seed's training loop)::

    for epoch in range(epochs):
        pruner.on_epoch_begin(epoch)           # raise goals per the schedule, update masks
        for x, y in loader:
            pruner.on_batch_begin()            # re-zero pruned entries
            loss = criterion(model(x), y)
            loss = pruner.on_minibatch_end(model, loss)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            pruner.on_batch_end()              # re-zero what the optimizer moved; count the step
        pruner.on_epoch_end(epoch)

*One shot*: ``pruner.prune_now()`` applies every pruner's current goal (the
target for ``schedule: oneshot``) with no loop at all; then ``convert``.

*Optimizer mode*: ``pruner.attach(optimizer, steps_per_epoch=N)`` (or
``prepare(..., optimizer=opt, steps_per_epoch=N)``) and a plain loop with no
hook call at all. A post-hook on ``optimizer.step()`` re-zeroes the pruned
entries, counts the step, sets ``epoch = step // N`` and updates the masks
where the schedule says so. A step the optimizer did not take (a
``GradScaler`` that found inf/NaN gradients skips ``optimizer.step()``) is
not counted.
"""
from __future__ import annotations

import sys
from functools import partial
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from fxprune.config import PrunerConfig, PruningConfig
from fxprune.distributed import broadcast_masks
from fxprune.errors import PruningError
from fxprune.masked import MaskedParameter
from fxprune.masks import select_masks, select_masks_per_tensor, selects_per_tensor
from fxprune.plan import PruningPlan
from fxprune.policies import POLICIES, Policy, PolicyNotReady
from fxprune.report import PrepareReport, ScheduleTable
from fxprune.rewrite import InstalledTarget
from fxprune.schedules import sparsity_at
from fxprune.zero_preserving import ZeroPreservingSteps

__all__ = ["Pruner", "find_pruner", "prepared_parameter_map"]


class Pruner(nn.Module):
    """Owns the schedule and the policies of one prepared model; drives its masks.

    ``sync_masks`` (default True): under ``torch.distributed``, broadcast new
    masks from rank 0 of ``process_group`` (None: the default group) after
    every update, so that all ranks prune the same entries; see
    :mod:`fxprune.distributed`.
    """

    def __init__(self, config: PruningConfig, plan: PruningPlan, targets: list[InstalledTarget], report: PrepareReport):
        super().__init__()
        self.config = config
        self.pruner_configs = list(plan.pruners.values())
        self.targets = targets  # plain list: the MaskedParameters are registered on the model itself
        self.prepare_report = report
        self.sync_masks = True
        self.process_group = None
        self.steps_per_epoch: int | None = None
        self._optimizers: list[_Attachment] = []
        self.register_buffer("epoch", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        self.register_buffer("goals", torch.zeros(len(self.pruner_configs), dtype=torch.float64))
        for t in targets:  # per-weight policy state (movement sums, wanda norms) goes next to its mask
            POLICIES[plan.pruners[t.pruner].policy].attach(t.masked)
        # Only policies that use gradients are called every step (magnitude's hook would be a no-op).
        self._gradient_observers = [
            (policy, t.masked) for t in targets
            for policy in [POLICIES[plan.pruners[t.pruner].policy]]
            if type(policy).observe_gradients is not Policy.observe_gradients
        ]
        self._goals_checked_at: tuple | None = None  # see update_masks()
        self._by_epoch = any(not p.by_step for p in self.pruner_configs)
        self._by_step = any(p.by_step for p in self.pruner_configs)

    # ------------------------------------------------------------------ hooks
    def on_epoch_begin(self, epoch: int) -> None:
        """Set the epoch; where the schedule raises a goal, prune up to it."""
        self.epoch.fill_(int(epoch))
        self.update_masks()

    def on_batch_begin(self, batch_id: int | None = None) -> None:
        """Re-zero pruned entries before the forward; prune step-scheduled weights due at this step."""
        self.update_masks()
        self.apply_masks()

    def on_minibatch_end(self, model: nn.Module | None = None, loss: torch.Tensor | None = None) -> Any:
        """Re-zero pruned entries after the forward; returns ``loss`` unchanged (the seed's contract)."""
        self.apply_masks()
        return loss

    def on_batch_end(self) -> None:
        """Re-zero what ``optimizer.step()`` moved (momentum, weight decay, Adam moments); count the step.

        When an optimizer is attached, its post-step hook counts steps instead
        (only the steps really taken), so this does not count again.
        """
        self.apply_masks()
        if not self._optimizers:
            self.observe_gradients()
            self.step.add_(1)
            self.update_masks()

    def on_epoch_end(self, epoch: int | None = None) -> None:
        """Make sure the epoch ends with exactly-zero pruned entries."""
        self.apply_masks()

    # --------------------------------------------------------- optimizer mode
    def attach(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        steps_per_epoch: int | None = None,
        replace: Mapping[int, nn.Parameter] | None = None,
    ) -> RemovableHandle:
        """Drive the schedule from ``optimizer.step()``: no hook calls needed in the loop.

        After every step the optimizer really takes: pruned entries are
        re-zeroed, ``step`` is counted (by the first attached optimizer only,
        so a second optimizer does not double the clock), ``epoch`` becomes
        ``step // steps_per_epoch`` and masks are updated where the schedule
        says so. At every mask update the optimizer's per-entry state
        (momentum buffers, Adam's ``exp_avg``/``exp_avg_sq``: every state
        tensor shaped like the parameter) is zeroed at the pruned entries, so
        no stale moment pushes a pruned weight again.

        ``steps_per_epoch=None`` leaves epochs to :meth:`on_epoch_begin` (what
        the trainer callbacks do); with epoch-scheduled pruners and no
        ``on_epoch_begin`` call, the first step raises :class:`PruningError`.

        ``replace`` maps ``id(old parameter) -> new parameter``; the optimizer
        is re-pointed to the new parameters (state included) before attaching.
        :func:`fxprune.prepare` uses it with :func:`prepared_parameter_map` for
        an optimizer built on the original model. Returns the hook's handle;
        :meth:`detach` is the way to stop.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"attach() expects a torch.optim.Optimizer, got {type(optimizer).__name__} "
                "(unwrap trainer wrappers: the torch optimizer is usually its .optimizer)"
            )
        if steps_per_epoch is not None and (
            isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1
        ):
            raise ValueError(f"steps_per_epoch must be a positive integer or None, got {steps_per_epoch!r}")
        if any(a.optimizer is optimizer for a in self._optimizers):
            raise PruningError("this optimizer is already attached to the pruner")
        held = [p for g in optimizer.param_groups for p in g["params"]]
        if replace is not None:
            if not {id(p) for p in held} & set(replace):
                raise PruningError(
                    "the optimizer holds no parameter of the model being prepared; build it from the "
                    "original model's parameters, or build it from prepared.parameters() after prepare()"
                )
            held = [replace.get(id(p), p) for p in held]
        if not {id(t.masked.param) for t in self.targets} & {id(p) for p in held}:
            raise PruningError(
                "the optimizer holds none of the pruned parameters: build it from prepared.parameters() "
                "(prepare() copies the model), or pass it as prepare(model, config, optimizer=opt), "
                "which re-points it to the prepared copy"
            )
        if replace is not None:  # every check passed: only now touch the optimizer
            _repoint(optimizer, replace)
        _follow_fsdp([t.masked for t in self.targets])  # masks sharded before the state is zeroed with them
        if not self._optimizers:
            self.steps_per_epoch = steps_per_epoch
        attachment = _Attachment(optimizer, ZeroPreservingSteps(optimizer, [t.masked for t in self.targets]))
        handle = optimizer.register_step_post_hook(partial(self._after_optimizer_step, attachment))
        on_load = optimizer.register_load_state_dict_post_hook(partial(self._after_optimizer_load, attachment))
        attachment.handles += [optimizer.register_step_pre_hook(attachment.before_step), handle, on_load]
        self._optimizers.append(attachment)
        if steps_per_epoch is not None and self._optimizers[0].optimizer is optimizer:
            self.epoch.fill_(int(self.step) // steps_per_epoch)
        attachment.steps.zero_state()  # state from before attach
        self.update_masks()
        self.apply_masks()
        return handle

    def detach(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Stop driving the schedule from ``optimizer`` (default: from every attached optimizer)."""
        for a in self._optimizers:
            if optimizer is None or a.optimizer is optimizer:
                a.remove()
        self._optimizers = [a for a in self._optimizers if optimizer is not None and a.optimizer is not optimizer]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The attached optimizers (not saved, not copied: attach again after loading or copying)."""
        return [a.optimizer for a in self._optimizers]

    def _after_optimizer_step(self, attachment: _Attachment, optimizer: torch.optim.Optimizer, args: tuple,
                              kwargs: dict) -> None:
        # Optimizers that handle AMP scaling themselves (fused Adam/SGD) are called by GradScaler
        # even on an overflow, with ``found_inf`` set; they skip the update and so do we.
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return
        attachment.steps.after_step()  # re-zero what the step moved (skipped where provably a no-op)
        for masked in attachment.steps.not_held:  # parameters of other optimizers, or of none
            masked.apply_mask()
        if optimizer is not self._optimizers[0].optimizer:
            return
        self.observe_gradients()
        self.step.add_(1)
        if self.steps_per_epoch is not None:
            self.epoch.fill_(int(self.step) // self.steps_per_epoch)
        elif int(self.epoch) < 0 and self._by_epoch:
            names = ", ".join(p.key_path for p in self.pruner_configs if not p.by_step)
            raise PruningError(
                f"{names} schedule(s) by epoch, but no epoch is known: pass steps_per_epoch to attach() "
                "or prepare(), call pruner.on_epoch_begin(epoch), or use step windows (end_step)"
            )
        self.update_masks()

    def _after_optimizer_load(self, attachment: _Attachment, optimizer: torch.optim.Optimizer) -> None:
        # A loaded state may come from before pruning: its moments would move pruned weights again.
        attachment.steps.zero_state()

    def _zero_optimizer_state(self, masked: list[MaskedParameter]) -> None:
        for a in self._optimizers:
            a.steps.zero_state(masked)

    # ---------------------------------------------------------- mask control
    def _time(self, p: PrunerConfig, epoch: int | None, step: int | None) -> int | None:
        spe = self.steps_per_epoch
        if p.by_step:
            return step if step is not None else (epoch * spe if epoch is not None and spe else None)
        return epoch if epoch is not None else (step // spe if step is not None and spe else None)

    def goal_at(self, epoch: int | None = None, *, step: int | None = None) -> dict[str, float]:
        """Each pruner's goal at ``epoch`` (epoch-scheduled) or ``step`` (step-scheduled); a dry run.

        With an optimizer attached with ``steps_per_epoch``, either time is
        converted to the other; otherwise a pruner whose unit is not given
        raises ``ValueError``.
        """
        goals = {}
        for p in self.pruner_configs:
            t = self._time(p, epoch, step)
            if t is None:
                unit = "step" if p.by_step else "epoch"
                raise ValueError(f"{p.key_path} is scheduled by {unit}: pass {unit}=")
            start, end, frequency = p.window
            goals[p.name] = sparsity_at(
                t,
                start=start,
                end=end,
                frequency=frequency,
                init=p.init_sparsity,
                target=p.target_sparsity,
                schedule=p.schedule,
            )
        return goals

    def schedule_table(self, n: int, *, by: str = "epoch") -> ScheduleTable:
        """Goals for epochs (``by='epoch'``) or steps (``by='step'``) ``0 .. n-1``; check a schedule first.

        A list of dicts (``{by: t, <pruner>: goal, ...}``) that ``print()`` shows as a table.
        """
        if by not in ("epoch", "step"):
            raise ValueError(f"by must be 'epoch' or 'step', got {by!r}")
        return ScheduleTable([{by: t, **self.goal_at(**{by: t})} for t in range(n)], by)

    def current_goals(self) -> dict[str, float]:
        """The goal each pruner has pruned to so far."""
        return {p.name: float(g) for p, g in zip(self.pruner_configs, self.goals)}

    def update_masks(self) -> bool:
        """Prune every pruner whose scheduled goal now exceeds its current goal; True if a mask changed.

        "Now" is the current ``epoch`` for epoch-scheduled pruners (none
        before the first epoch is set) and the current ``step`` for
        step-scheduled ones. Called several times per step by the hooks: a
        second call at the same time (and the same goals) has nothing to do.
        """
        epoch, step = int(self.epoch), int(self.step)
        if self._goals_checked_at == self._goals_key(epoch, step):
            return False
        with torch.no_grad():
            changed = self._update_masks(epoch, step)
        self._goals_checked_at = self._goals_key(epoch, step)
        return changed

    def _goals_key(self, epoch: int, step: int) -> tuple:
        # Goals follow only the clock units some pruner is scheduled by (epoch pruners ignore the step).
        # The goals buffer is replaced by .to() and rewritten by load_state_dict: its identity and version.
        goals = self._buffers["goals"]
        return (epoch if self._by_epoch else None, step if self._by_step else None, self.steps_per_epoch,
                id(goals), goals._version)

    def pending_goals(self) -> dict[str, float]:
        """The goal each pruner has *now*: what :meth:`prune_now` prunes to.

        Its schedule's goal at the current epoch (the first epoch, 0, while no
        epoch has been set) or the current step; for ``schedule: oneshot`` the
        target, whenever its window starts.
        """
        epoch = max(int(self.epoch), 0)
        goals = self.goal_at(epoch, step=int(self.step))
        for p in self.pruner_configs:
            if p.schedule == "oneshot":
                goals[p.name] = float(p.target_sparsity)
        return goals

    def prune_now(self) -> dict[str, float]:
        """Prune every pruner up to its current goal now, without a training loop; returns the goals in force.

        One-shot pruning is this one call after :func:`fxprune.prepare` (a
        ``schedule: oneshot`` pruner goes straight to its target), followed by
        :func:`fxprune.convert`. In a schedule it is the same as the hooks'
        update at the current epoch/step, so calling it mid-training changes
        nothing they would not. Masks only grow, the optimizer state of newly
        pruned entries is zeroed, and the epoch/step clock is left as it is.
        """
        with torch.no_grad():
            self._prune_to(self.pending_goals())
        return self.current_goals()

    def unapplied_goals(self) -> dict[str, tuple[float, float]]:
        """``name -> (goal now, goal pruned to)`` for every pruner whose masks lag behind its current goal."""
        pending = self.pending_goals()
        return {
            p.name: (pending[p.name], float(done))
            for p, done in zip(self.pruner_configs, self.goals)
            if pending[p.name] > float(done) + 1e-12
        }

    def _update_masks(self, epoch: int, step: int) -> bool:
        return self._prune_to(self.goal_at(epoch, step=step))  # epoch -1: before every window

    def _prune_to(self, goals: Mapping[str, float]) -> bool:
        changed: list[MaskedParameter] = []
        due = [(i, p, goals[p.name]) for i, p in enumerate(self.pruner_configs) if goals[p.name] > float(self.goals[i])]
        if due and _follow_fsdp([t.masked for t in self.targets]):
            from fxprune.fsdp import check_sharded_pruners

            check_sharded_pruners([p for _, p, _ in due])  # before any mask changes
        for i, p, goal in due:
            mine = [t for t in self.targets if t.pruner == p.name]
            group = [t.masked for t in mine]
            if _follow_fsdp(group):  # FSDP2: gather, select as here, keep the shards (fxprune.fsdp)
                from fxprune.fsdp import sharded_masks_update

                sharded_masks_update(p, mine, goal, partial(self._policy_scores, p), self.process_group)
            elif selects_per_tensor(p):
                # One tensor at a time: its scores and new mask are freed before the next is scored, so an
                # update needs the temporaries of the largest weight, not scores for the whole model.
                select_masks_per_tensor(p, group, lambda j: self._policy_scores(p, mine[j]), goal,
                                        lambda j, mask: group[j].set_mask(mask))
            else:
                scores = [self._policy_scores(p, t) for t in mine]
                for m, mask in zip(group, select_masks(p, group, scores, goal)):
                    m.set_mask(mask)
            changed.extend(group)
            self.goals[i] = goal
        if changed:
            if self.sync_masks:  # sharded masks were broadcast whole before they were cut into shards
                broadcast_masks([m for m in changed if "_fsdp_sharded" not in m.__dict__], self.process_group)
            self._zero_optimizer_state(changed)
        return bool(changed)

    def observe_gradients(self) -> None:
        """Feed the gradients of the optimizer step that just ran to gradient-based policies (movement).

        Called once per step, while ``param.grad`` still holds that step's
        gradient: by :meth:`on_batch_end` in hook style, by the optimizer
        post-hook in optimizer mode. Policies without gradient state ignore it.
        """
        if not self._gradient_observers:
            return
        with torch.no_grad():
            for policy, masked in self._gradient_observers:
                policy.observe_gradients(masked)

    def _policy_scores(self, p: PrunerConfig, t: InstalledTarget, masked: MaskedParameter | None = None) -> torch.Tensor:
        """``p``'s policy scores for ``t`` (or for ``masked``, a gathered stand-in of its weight)."""
        try:
            return POLICIES[p.policy](t.masked if masked is None else masked)
        except PolicyNotReady as e:
            raise PruningError(f"{p.key_path}: weight {t.name!r}: {e}") from None

    def apply_masks(self, *, force: bool = False) -> None:
        """Zero the stored pruned entries of every parameter that changed since the last call.

        "Changed" is read from autograd version counters, which writes through
        ``.data`` (``torch.nn.utils.vector_to_parameters``, ``p.data.copy_(...)``)
        do not move: after such a write call ``apply_masks(force=True)``.
        """
        for t in self.targets:
            if force:
                t.masked.forget_clean()
            t.masked.apply_mask()

    @property
    def float_mask_copies(self) -> bool:
        """Whether masks may keep a float copy for the per-step path on CPU (default True).

        The copy makes gradient masking and re-zeroing ~1.7x faster than the
        mask's bytes on CPU, at the memory of one more copy of the pruned
        weights; False trades that speed for the memory. Accelerators never
        use it. See :mod:`fxprune.masked`.
        """
        return all(t.masked.float_copy for t in self.targets)

    @float_mask_copies.setter
    def float_mask_copies(self, enabled: bool) -> None:
        for t in self.targets:
            t.masked.float_copy = bool(enabled)
            if not enabled:
                t.masked._keep = t.masked._keep_key = None

    # -------------------------------------------------------- module plumbing
    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # ``model.to(torch.bfloat16)`` / ``.half()`` convert floating buffers; the goals are
        # bookkeeping, not weights, and rounding them would re-trigger or skip mask updates.
        goals = self.goals
        super()._apply(fn, recurse)
        self.goals = goals.to(device=self.goals.device)
        return self

    def __getstate__(self) -> dict[str, Any]:
        # Attached optimizers belong to one training run: a copy or a pickle is not attached.
        state = self.__dict__.copy()
        state["_optimizers"] = []
        return state

    def extra_repr(self) -> str:
        goals = ", ".join(f"{k}={v:.4f}" for k, v in self.current_goals().items())
        return f"epoch={int(self.epoch)}, step={int(self.step)}, goals=({goals})"


def _follow_fsdp(masked: list[MaskedParameter]) -> bool:
    """Let every mask follow its parameter's FSDP2 sharding; True if any of them is sharded."""
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist yet
        return False
    from fxprune.fsdp import is_dtensor

    for m in masked:
        if is_dtensor(m._parameters["param"]):
            m._adopt(m._parameters["param"])
    return any("_fsdp_sharded" in m.__dict__ for m in masked)


def find_pruner(model: nn.Module) -> Pruner:
    """The Pruner of the prepared model inside ``model`` (a DDP wrapper, a LightningModule, ...)."""
    found = [m for m in model.modules() if isinstance(m, Pruner)]
    if len(found) != 1:
        raise PruningError(
            f"expected exactly one prepared model (fxprune.prepare) inside {type(model).__name__}, found {len(found)}"
        )
    return found[0]


def prepared_parameter_map(original: nn.Module, prepared: nn.Module) -> dict[int, nn.Parameter]:
    """``id(original parameter) -> the prepared copy's parameter``, matched by name (tied names included)."""
    mapping: dict[int, nn.Parameter] = {}
    for name, p in original.named_parameters(remove_duplicate=False):
        prefix, _, attr = name.rpartition(".")
        owner = prepared.get_submodule(prefix) if prefix else prepared
        q = getattr(owner, attr)
        mapping[id(p)] = q.param if isinstance(q, MaskedParameter) else q
    return mapping


@torch.no_grad()
def _repoint(optimizer: torch.optim.Optimizer, replace: Mapping[int, nn.Parameter]) -> None:
    for group in optimizer.param_groups:
        # In place: some optimizers (LBFGS) keep a reference to the list itself.
        group["params"][:] = [replace.get(id(p), p) for p in group["params"]]
    state = list(optimizer.state.items())
    optimizer.state.clear()
    for p, s in state:
        optimizer.state[replace.get(id(p), p)] = s


class _Attachment:
    """One attached optimizer: its hooks and its re-zeroing after each step."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: ZeroPreservingSteps):
        self.optimizer = optimizer
        self.steps = steps
        self.handles: list[RemovableHandle] = []

    def before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.steps.before_step()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.steps.release()
