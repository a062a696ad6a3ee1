"""Masks under FSDP2 (``torch.distributed.fsdp.fully_shard``): sharded like their parameters.

The order users follow is supported as it is::

    prepared = fxprune.prepare(model, config)
    for block in prepared.blocks:
        fully_shard(block)
    fully_shard(prepared)
    opt = torch.optim.AdamW(prepared.parameters())
    prepared.pruner.attach(opt, steps_per_epoch=n)     # or the hooks

``fully_shard`` replaces every parameter by a DTensor holding this rank's
shard (``Shard(0)`` by default) and, around each unit's forward, swaps in the
gathered ("unsharded") tensor. fxprune follows it:

* **Masks (and any policy state shaped like the weight, e.g. movement
  scores) become DTensors with the parameter's mesh and placements**, the
  first time a masked parameter meets its sharded tensor (a mask update, a
  forward, a state-dict load). Every rank holds only its shard of each mask,
  so masks shrink with the weights, and everything done with masks between
  steps -- re-zeroing pruned weights after ``optimizer.step()``, zeroing the
  optimizer's moments at mask updates, masking gradients -- runs on the local
  shards with the code of the single-process path (DTensor elementwise ops).
* **The forward multiplies nothing.** The gathered weight is a copy of shards
  whose pruned entries are exactly zero: each unit re-zeroes its shards (if
  anything wrote to them since) in a forward pre-hook that runs before FSDP's
  all-gather. **Gradients are masked once reduced**: a callback queued at
  the start of each backward runs after FSDP's own final callback and masks
  every sharded gradient in place (masking after the reduce-scatter equals
  masking before it, bit for bit: the reduction is a sum).
* **Mask updates gather, one weight at a time** (``full_tensor()``): the
  policy scores the full weight, :func:`fxprune.masks.select_masks` picks
  the full mask exactly as on one process, rank 0's result is broadcast and
  each rank keeps its shard. ``scope: global`` needs the scores of all of a
  pruner's weights at once, so it gathers them all (transiently, at mask
  updates only: one full copy of those weights per rank).
* **Units the traced graph inlines** (fx traces through a block's forward,
  so the block's own forward -- and FSDP's hooks on it -- would never run)
  are given a forward of their own: see :mod:`fxprune.fsdp_units`.

Not supported (a :class:`~fxprune.errors.PruningError` says so):
``pattern: channel`` pruners, :func:`fxprune.calibrate` (Wanda) on a sharded
model, and :func:`fxprune.convert` of a sharded model: gather a full state
dict into an unsharded prepared model first (:func:`gather_prepared`).
"""
from __future__ import annotations

import copy
import weakref
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils import _pytree as pytree

from fxprune.errors import PruningError
from fxprune.masked import MaskedParameter

if TYPE_CHECKING:  # pragma: no cover
    from fxprune.config import PrunerConfig
    from fxprune.rewrite import InstalledTarget

__all__ = ["is_sharded", "full_mask", "gather_prepared", "adopt_fully_shard"]


def is_dtensor(t: object) -> bool:
    """True for a DTensor (what ``fully_shard`` makes of a parameter)."""
    return isinstance(t, DTensor)


def is_sharded(masked: MaskedParameter) -> bool:
    """True once the mask of ``masked`` is a DTensor sharded like its FSDP2 parameter."""
    return isinstance(masked.__dict__.get("_buffers", {}).get("mask"), DTensor)


def _shard_like(t: torch.Tensor, param: DTensor) -> DTensor:
    # Every rank holds the same full tensor (masks are kept equal across ranks), so each cuts its own
    # shard: no communication.
    return distribute_tensor(t.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


@torch.no_grad()
def follow_sharding(masked: MaskedParameter, param: torch.Tensor) -> bool:
    """Called by :class:`~fxprune.masked.MaskedParameter` whenever its parameter object changed.

    If ``param`` is a DTensor (FSDP2 sharded it), shard the mask and every
    buffer of the policy state shaped like the weight the same way; returns
    False (hook ``param`` as usual). If the masks are sharded and ``param``
    is a plain tensor, it is FSDP's gathered copy, swapped in for a unit's
    forward and backward: returns True, leave it alone.
    """
    if not isinstance(param, DTensor):
        return is_sharded(masked)
    shape = tuple(param.shape)
    new = []  # every shard cut and checked before any buffer is replaced
    for owner in masked.modules():
        for name, buf in owner._buffers.items():
            if buf is None or isinstance(buf, DTensor) or tuple(buf.shape) != shape:
                continue
            sharded = _shard_like(buf, param)
            if sharded.to_local().shape != param.to_local().shape:
                raise PruningError(
                    f"{getattr(masked, '_fxprune_name', 'a pruned weight')}: its FSDP2 shard has shape "
                    f"{tuple(param.to_local().shape)} but the mask's shard would have "
                    f"{tuple(sharded.to_local().shape)} (placements {param.placements})"
                )
            new.append((owner, name, sharded))
    for owner, name, sharded in new:
        owner._buffers[name] = sharded
    masked.__dict__["_fsdp_sharded"] = True  # read by MaskedParameter's forward and re-zeroing
    masked._keep = masked._keep_key = None
    masked._has_pruned = masked._any_pruned()
    return False


def unsharded_weight(masked: MaskedParameter, param: torch.Tensor) -> torch.Tensor:
    """The forward's weight under FSDP2: the gathered tensor itself (its shards were re-zeroed)."""
    if isinstance(param, DTensor):
        raise PruningError(
            f"{getattr(masked, '_fxprune_name', 'a pruned weight')} is read while sharded: the forward of the "
            "fully_shard unit that holds it did not run. Apply fully_shard to the prepared model's root as well "
            "as to its blocks, and read weights only inside their unit's forward"
        )
    return param


# ----------------------------------------------------------------------------- mask updates
def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_mask(masked: MaskedParameter) -> torch.Tensor:
    """The whole mask of one weight on every rank (a collective when sharded)."""
    return _full(masked.mask.detach())


def _gathered_view(masked: MaskedParameter) -> MaskedParameter:
    """An unsharded stand-in for scoring: the full weight, mask and policy state, no hooks."""
    view = MaskedParameter(nn.Parameter(_full(masked.param.detach()), requires_grad=False))
    view.mask.copy_(full_mask(masked))
    for name, child in masked.named_children():  # policy state (movement, wanda): shallow copy, full buffers
        state = copy.copy(child)
        state.__dict__["_buffers"] = {k: None if v is None else _full(v) for k, v in child._buffers.items()}
        view._modules[name] = state
    if "_fxprune_name" in masked.__dict__:
        view.__dict__["_fxprune_name"] = masked.__dict__["_fxprune_name"]
    return view


def _broadcast_full(masks: list[torch.Tensor], group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    # Every rank computed the same masks from the same gathered scores; rank 0's are made the rule anyway,
    # as fxprune.distributed does for DDP, so that no float quirk can give ranks different shards.
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return masks
    flat = torch.cat([m.reshape(-1) for m in masks]).to(torch.uint8)
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast(flat, src=src, group=group)
    out, offset = [], 0
    for m in masks:
        out.append(flat[offset: offset + m.numel()].reshape(m.shape).to(torch.bool))
        offset += m.numel()
    return out


def check_sharded_pruners(pruners: Sequence[PrunerConfig]) -> None:
    """Raise :class:`PruningError` for a pruner whose pattern has no sharded mask update."""
    for pruner in pruners:
        if getattr(pruner, "pattern", "unstructured") == "channel":
            raise PruningError(
                f"{pruner.key_path}: pattern 'channel' is not supported on a model sharded with FSDP2 "
                "(fully_shard); prune channels before sharding, or use an unstructured or N:M pattern"
            )


def sharded_masks_update(
    pruner: PrunerConfig,
    targets: Sequence[InstalledTarget],
    goal: float,
    scores_of: Callable[[InstalledTarget, MaskedParameter], torch.Tensor],
    group: dist.ProcessGroup | None = None,
) -> None:
    """Prune one pruner's sharded weights to ``goal``: gather, select as on one process, keep the shards.

    ``scores_of(target, view)`` runs the pruner's policy on the gathered view.
    Local and N:M selections gather one weight at a time; ``scope: global``
    gathers all of them (the threshold is over all of them).
    """
    from fxprune.masks import select_masks

    check_sharded_pruners([pruner])
    batches = [list(targets)] if getattr(pruner, "scope", "local") == "global" else [[t] for t in targets]
    for batch in batches:
        views = [_gathered_view(t.masked) for t in batch]
        scores = [scores_of(t, v) for t, v in zip(batch, views)]
        masks = _broadcast_full(select_masks(pruner, views, scores, goal), group)
        del views, scores
        for t, mask in zip(batch, masks):
            param = t.masked._parameters["param"]
            if isinstance(param, DTensor):
                t.masked.set_mask(_shard_like(mask, param))
            else:  # an unsharded weight of a partly sharded model
                t.masked.set_mask(mask)


# ----------------------------------------------------------------------------- training-time hooks
def _fsdp_units(root: nn.Module) -> list[tuple[str, nn.Module]]:
    from torch.distributed.fsdp import FSDPModule

    return [(name, m) for name, m in root.named_modules() if isinstance(m, FSDPModule)]


def _managed_by(units: list[tuple[str, nn.Module]], targets: Sequence[InstalledTarget]) -> dict[int, list]:
    """id(unit) -> the masked parameters whose FSDP parameter group is that unit's (the innermost unit)."""
    owned: dict[int, list] = {id(m): [] for _, m in units}
    paths = sorted(units, key=lambda u: -len(u[0]))
    for t in targets:
        where = t.name
        for path, unit in paths:
            if path == "" or where == path or where.startswith(path + "."):
                owned[id(unit)].append(t.masked)
                break
    return owned


def _rezero_before_gather(masked: list[MaskedParameter], module: nn.Module, args: Any, kwargs: Any) -> None:
    # Runs before FSDP's own pre-forward (it is prepended after it): shards written since the last
    # re-zeroing (an optimizer step with no pruner hook after it, a write by the user) are made clean
    # before they are gathered. A no-op version check per weight otherwise.
    for m in masked:
        m.apply_mask()


class _GradientMasking:
    """Masks the reduced (sharded) gradients after each backward, once FSDP has written them."""

    def __init__(self, masked: list[MaskedParameter]):
        self.masked = [weakref.ref(m) for m in masked]
        self.task = -1

    def after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        for t in pytree.tree_leaves(output):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(self.on_backward)

    def on_backward(self, grad: torch.Tensor) -> None:
        # The output's hook runs after FSDP's own pre-backward hook on it, which queued FSDP's final
        # callback (the one that finishes the reduce-scatters): this one is queued after it.
        task = torch._C._current_graph_task_id()
        if task != self.task:
            self.task = task
            torch.autograd.Variable._execution_engine.queue_callback(self.mask_gradients)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        for ref in self.masked:
            m = ref()
            if m is None or m._grad_mask is None:
                continue
            param = m._parameters["param"]
            if isinstance(param, DTensor) and param.grad is not None:
                m._grad_mask.after_accumulate(param)  # in place, stamped as the hooks do on one process


def adopt_fully_shard(prepared: nn.Module) -> None:
    """Make a prepared model that ``fully_shard`` wrapped run correctly; idempotent, called at its forward.

    Shards the masks, gives inlined units a forward of their own
    (:func:`fxprune.fsdp_units.call_inlined_units`), re-zeroes each unit's
    shards before its all-gather, and masks the reduced gradients.
    """
    from fxprune.fsdp_units import call_inlined_units
    from fxprune.pruner import find_pruner

    if prepared.__dict__.get("_fxprune_fsdp_adopted"):
        return
    pruner = find_pruner(prepared)
    targets = pruner.targets
    for t in targets:
        t.masked._adopt(t.masked._parameters["param"])
    units = _fsdp_units(prepared)
    call_inlined_units(prepared, [path for path, _ in units if path])
    owned = _managed_by(units, targets)
    for _, unit in units:
        mine = owned[id(unit)]
        if mine:
            unit.register_forward_pre_hook(partial(_rezero_before_gather, mine), prepend=True, with_kwargs=True)
    masking = _GradientMasking([t.masked for t in targets])
    prepared.register_forward_hook(masking.after_forward)
    prepared.__dict__["_fxprune_fsdp_masking"] = masking
    prepared.__dict__["_fxprune_fsdp_adopted"] = True


def gather_prepared(sharded: nn.Module, unsharded: nn.Module) -> nn.Module:
    """Load the full state of a sharded prepared model into ``unsharded`` (a fresh ``fxprune.prepare``).

    A collective (every rank calls it); afterwards ``unsharded`` holds the
    full weights, masks and pruner state on every rank, ready for
    :func:`fxprune.convert`. Returns ``unsharded``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    unsharded.load_state_dict(full)
    return unsharded
