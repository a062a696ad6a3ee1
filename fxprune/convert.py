"""convert(): fold masks into plain weights and hand back the user's own model class.

The result is the original model object (a deep copy of it made by
``prepare``, or the user's own object after ``prepare(..., inplace=True)``)
with every masked parameter put back as a plain ``nn.Parameter`` whose
pruned entries are zeroed in place (the very parameter object the prepared
model trained, so folding copies no weight): no fxprune module, buffer or
hook is left, its ``state_dict()`` has exactly the original keys, and tied
weights stay tied.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import nn

from fxprune.errors import PruningError
from fxprune.graph_module import PreparedGraphModule, remove_captured_forwards
from fxprune.masked import MaskedParameter
from fxprune.pruner import Pruner
from fxprune.report import PRUNED_RECORD
from fxprune.rewrite import LeafMasks, remove_leaf_hooks, restore_parameters
from fxprune.structured.norms import KEEP, remove_masked_norms

__all__ = ["convert", "UnappliedGoalWarning"]


class UnappliedGoalWarning(UserWarning):
    """``convert`` was called while a pruner's masks lag behind its current goal (e.g. never updated).

    The usual cause is a one-shot config converted without a training loop
    and without :meth:`fxprune.Pruner.prune_now`: the result would silently be
    the dense model.
    """


def convert(
    prepared: PreparedGraphModule,
    *,
    inplace: bool = False,
    physical: bool = False,
    semi_structured: bool = False,
    kernels: str = "dense",
    example_inputs: Any = None,
) -> nn.Module:
    """Return the pruned model as an instance of the original class.

    By default ``prepared`` is left intact (it is deep-copied first), so it can
    still be compared with the result or trained further; ``inplace=True``
    skips that copy to save memory and leaves ``prepared`` unusable.
    Warns with :class:`UnappliedGoalWarning` when a pruner's masks lag behind
    its current goal (see :meth:`fxprune.Pruner.prune_now`).
    ``physical=True`` also cuts the channels removed by ``pattern: channel``
    pruners out of the layers (see :mod:`fxprune.structured.shrink`): the
    result is smaller and faster, gives the masked model's outputs, and no
    longer has the original shapes. Before it is returned it runs on an
    example input and must give the masked model's outputs, else a
    :class:`PruningError` names the channel groups at fault (see
    :mod:`fxprune.structured.verify`): ``example_inputs`` (as ``prepare`` takes
    them), or by default the ``example_inputs`` given to ``prepare``; with
    neither, the check is skipped with a warning.
    ``semi_structured=True`` (CUDA only) stores the Linear weights of 2:4
    pruners as ``torch.sparse.to_sparse_semi_structured`` tensors for sparse
    tensor cores (see :mod:`fxprune.semi_structured`); without CUDA it raises.
    ``kernels="auto"`` then times each Linear/Conv2d on ``example_inputs`` and
    swaps in a sparse CSR/BSR module where that is measurably faster on this
    CPU (:func:`fxprune.sparsify_kernels`); ``"dense"`` (default) swaps nothing.
    """
    if kernels not in ("dense", "auto"):
        raise ValueError(f"kernels must be 'dense' or 'auto', got {kernels!r}")
    if kernels == "auto" and example_inputs is None:
        raise TypeError("convert(kernels='auto') times each layer on example_inputs=; pass an input of the "
                        "batch shape you will run")
    if not isinstance(prepared, PreparedGraphModule) or not isinstance(getattr(prepared, "pruner", None), Pruner):
        raise TypeError(f"convert() expects a model returned by fxprune.prepare(), got {type(prepared).__name__}")
    if any("_fsdp_sharded" in t.masked.__dict__ for t in prepared.pruner.targets):
        raise PruningError(
            "convert() needs the whole model, and this one is sharded by FSDP2 (fully_shard): gather it into an "
            "unsharded prepared model first, e.g. fxprune.fsdp.gather_prepared(sharded, fxprune.prepare(model, config))"
        )
    channel_plan = prepared.__dict__.get("_fxprune_channels")
    if physical and channel_plan is None:
        raise PruningError(
            "convert(physical=True) removes the channels pruned by a 'pattern: channel' pruner, "
            "and this model has none; add 'pattern: channel' to a pruner or use physical=False"
        )
    if semi_structured:  # fxprune.semi_structured: 2:4 Linear weights as torch sparse semi-structured tensors
        from fxprune.semi_structured import check_semi_structured_available, semi_structured_candidates

        check_semi_structured_available()
        sparse_names = semi_structured_candidates(prepared.pruner.targets, prepared.pruner.pruner_configs)
        if not sparse_names:
            raise PruningError("convert(semi_structured=True): no weight is pruned with pattern '2:4' (or N:4, N <= 2)")
    _warn_unapplied(prepared.pruner)
    if physical:  # the masked model's outputs, before anything changes (inplace=True consumes it)
        from fxprune.prepare import split_example
        from fxprune.structured.verify import eval_outputs, on_model_device

        example = channel_plan.example if example_inputs is None else split_example(example_inputs)
        reference = None
        if example is not None:
            example = on_model_device(example, prepared)
            try:
                reference = eval_outputs(prepared, example)
            except Exception as e:  # noqa: BLE001 - the kept example no longer fits the model: say so, go on
                warnings.warn(
                    f"convert(physical=True): the masked model does not run on the example input ({type(e).__name__}: "
                    f"{e}), so the shrunk model is not checked; pass convert(..., example_inputs=...)",
                    UserWarning,
                    stacklevel=2,
                )
                example = None
    model = prepared if inplace else copy.deepcopy(prepared)
    root = model._fxprune_original.module
    if physical:
        from fxprune.structured.shrink import removed_channels

        removed = removed_channels(model.__dict__["_fxprune_channels"])  # read before the masks are folded
    restore_parameters(model.pruner.targets)
    narrowed = remove_masked_norms(root)  # fxprune.structured.norms: plain norms again
    if narrowed and not physical:
        warnings.warn(
            f"convert(physical=False): {len(narrowed)} normalization(s) of pruned channel streams "
            f"({', '.join(narrowed[:3])}{', ...' if len(narrowed) > 3 else ''}) computed their statistics over "
            "the kept channels in the prepared model; unshrunk, they count the pruned channels again, so the "
            "result does not give the masked model's outputs. Use convert(physical=True)",
            UserWarning,
            stacklevel=2,
        )
    remove_leaf_hooks(root)
    remove_captured_forwards(root)  # children captured on their own get their class's forward back
    # Root-level tensors may have been replaced on the prepared model (e.g. by .to()).
    for name in root._buffers:
        root._buffers[name] = model._buffers.get(name, root._buffers[name])
    for name, p in root._parameters.items():
        if name in model._parameters:
            root._parameters[name] = model._parameters[name]
    root.train(model.training)
    _verify_clean(root)
    # Which weights were pruned, for sparsity_report: a plain tuple of names, not a module, buffer or hook.
    root.__dict__[PRUNED_RECORD] = tuple(t.name for t in model.pruner.targets)
    if semi_structured:
        from fxprune.semi_structured import to_semi_structured

        to_semi_structured(root, sparse_names)
    if physical:
        from fxprune.structured.shrink import shrink

        plan = model.__dict__["_fxprune_channels"]
        changed = shrink(root, plan, removed)
        _check_shrunk(prepared, root, plan, removed, example, reference, inplace)
        from fxprune.structured.hf_config import update_hf_config

        mismatches = update_hf_config(root, plan, changed)  # a Hugging Face config states the new sizes
        if mismatches:
            warnings.warn(
                f"convert(physical=True): the shrunk model's config cannot describe its new shapes (e.g. "
                f"{'; '.join(mismatches[:2])}), so from_pretrained of a save_pretrained copy would not load it; "
                "layers were cut unevenly. Save it whole (torch.save(model)) instead",
                UserWarning,
                stacklevel=2,
            )
    if kernels == "auto":
        from fxprune.kernels import sparsify_kernels

        root = sparsify_kernels(root, example_inputs)
    return root


def _warn_unapplied(pruner: Pruner) -> None:
    lagging = pruner.unapplied_goals()
    if not lagging:
        return
    keys = {p.name: p.key_path for p in pruner.pruner_configs}
    lines = [
        f"{keys[name]}: goal {goal:.4f} now, but its masks "
        + ("were never updated" if done == 0 else f"are at {done:.4f}")
        for name, (goal, done) in lagging.items()
    ]
    warnings.warn(
        "fxprune.convert: the model is converted with less sparsity than its schedule asks for now:\n  "
        + "\n  ".join(lines)
        + "\ncall prepared.pruner.prune_now() first to apply the current goals (one-shot pruning without a "
        "training loop), or drive the schedule with pruner.on_epoch_begin(epoch) / pruner.attach(optimizer)",
        UnappliedGoalWarning,
        stacklevel=3,
    )


def _check_shrunk(prepared, root, plan, removed, example, reference, inplace: bool) -> None:
    """Run the shrunk model on the example and compare with the masked one (fxprune.structured.verify)."""
    if not removed:
        return
    if example is None:
        warnings.warn(
            "convert(physical=True): the shrunk model was not checked against the masked model, because there "
            "is no example input: pass prepare(..., example_inputs=...) or convert(..., example_inputs=...)",
            UserWarning,
            stacklevel=3,
        )
        return
    from fxprune.structured.shrink import shrink
    from fxprune.structured.verify import check_shrunk

    # Groups whose norms compute over kept channels (fxprune.structured.norms): an unshrunk copy counts the
    # pruned channels again, so they are cut in every trial and a group is blamed only if adding it breaks.
    narrowed = {gid for *_, gid in plan.norms.values() if gid in removed}

    def shrink_one(gid: int) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alone = convert(prepared)
        shrink(alone, plan, {g: removed[g] for g in {gid} | narrowed})
        return alone

    def describe(gid: int) -> str:
        layers = plan.channels.groups[gid].layers()
        return ", ".join(layers[:4]) + (f", ... (+{len(layers) - 4})" if len(layers) > 4 else "")

    check_shrunk(root, example, reference, removed, describe, None if inplace else shrink_one)


def _verify_clean(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not isinstance(m, (MaskedParameter, Pruner)), f"fxprune module left at {name!r}"
        assert KEEP not in m._buffers, f"masked norm left at {name!r}"
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            assert not any(isinstance(getattr(h, "__self__", None), LeafMasks) for h in hooks.values()), name
