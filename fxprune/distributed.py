"""Masks under ``torch.distributed``: one mask per weight on every rank.

Data-parallel training (``DistributedDataParallel``) keeps the *weights* of all
ranks equal because gradients are all-reduced, so a deterministic policy such
as magnitude computes the same masks everywhere. That is not guaranteed in
general: a data-dependent policy scores with rank-local batches, and any
non-determinism (a weight that diverged, a float reduction in another order)
would give ranks different masks -- and a model that silently differs per rank.
So after every mask update the :class:`~fxprune.pruner.Pruner` broadcasts the
new masks from rank 0 (:func:`broadcast_masks`; turn it off with
``pruner.sync_masks = False`` when the ranks hold *different* models, e.g.
pipeline stages). :func:`check_masks_consistent` is the independent check: it
compares a checksum of every mask across ranks and names the weights that
differ.

Under FSDP2 (``fully_shard``) masks are sharded like their parameters and
updated by :mod:`fxprune.fsdp`, which broadcasts each whole mask before
cutting it into shards; :func:`broadcast_masks` is for unsharded masks.

Everything here is a no-op when ``torch.distributed`` is not initialized or
has a single rank, so the Pruner calls it unconditionally.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Sequence

import torch
import torch.distributed as dist

from fxprune.errors import PruningError
from fxprune.masked import MaskedParameter

if TYPE_CHECKING:  # pragma: no cover
    from fxprune.pruner import Pruner

__all__ = ["is_distributed", "broadcast_masks", "mask_checksums", "check_masks_consistent"]


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _comm_device(like: torch.Tensor, group: dist.ProcessGroup | None) -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU (and CUDA) tensors.
    if dist.get_backend(group) == "nccl" and like.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device


@torch.no_grad()
def broadcast_masks(masked: Sequence[MaskedParameter], group: dist.ProcessGroup | None = None) -> None:
    """Overwrite the masks of ``masked`` on every rank with those of the group's first rank.

    All ranks must call it with the same parameters in the same order (the
    Pruner does, at the same scheduled updates). Masks travel as one packed
    ``uint8`` tensor: one collective per update however many weights, and no
    reliance on a backend's support for ``bool`` tensors.
    """
    if not masked or not is_distributed(group):
        return
    flat = torch.cat([m.mask.reshape(-1) for m in masked]).to(torch.uint8)
    flat = flat.to(_comm_device(flat, group))
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast(flat, src=src, group=group)
    offset = 0
    for m in masked:
        n = m.mask.numel()
        new = flat[offset : offset + n].reshape(m.mask.shape).to(device=m.mask.device, dtype=torch.bool)
        offset += n
        if not torch.equal(new, m.mask):
            m.set_mask(new)


def _digest(mask: torch.Tensor) -> int:
    data = mask.detach().to("cpu", torch.uint8).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little")  # fits int64


def mask_checksums(pruner: Pruner) -> dict[str, int]:
    """A checksum of each weight's mask, by weight name (equal checksums: equal masks, in practice).

    A mask sharded by FSDP2 (:mod:`fxprune.fsdp`) is gathered first, so this
    is a collective when the model is sharded.
    """
    return {t.name: _digest(_whole(t.masked)) for t in pruner.targets}


def _whole(masked: MaskedParameter) -> torch.Tensor:
    if "_fsdp_sharded" in masked.__dict__:
        from fxprune.fsdp import full_mask

        return full_mask(masked)
    return masked.mask


def check_masks_consistent(pruner: Pruner, group: dist.ProcessGroup | None = None) -> None:
    """Raise :class:`PruningError` naming every weight whose mask differs between ranks.

    A collective: every rank of ``group`` must call it. Returns at once
    without communication when not distributed.
    """
    if not is_distributed(group):
        return
    sums = mask_checksums(pruner)
    local = torch.tensor(list(sums.values()), dtype=torch.int64)
    local = local.to(_comm_device(local, group))
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered).cpu()
    differ = [name for i, name in enumerate(sums) if not bool((table[:, i] == table[0, i]).all())]
    if differ:
        ranks = [r for r in range(table.shape[0]) if not torch.equal(table[r], table[0])]
        raise PruningError(
            f"masks differ between ranks (ranks {ranks} vs rank 0) for {len(differ)} weight(s): "
            + ", ".join(differ[:10])
            + (" ..." if len(differ) > 10 else "")
            + "; keep pruner.sync_masks = True so that updates are broadcast from rank 0"
        )
