"""prepare(): load config -> plan -> trace -> rewrite -> attach the Pruner.

By default the input model is never modified: ``prepare`` works on a deep
copy, and every check that can fail on the config or the weight names runs
before the copy is made. The prepared model is a
:class:`~fxprune.graph_module.PreparedGraphModule` that owns the copy's
parameters (so build the optimizer from ``prepared.parameters()``).

``inplace=True`` skips the copy, for models whose second copy would not fit:
the input model object itself is rewritten (its weights move into
:class:`~fxprune.masked.MaskedParameter` modules, the very same
``nn.Parameter`` objects) and becomes the prepared model's original root;
``convert(prepared, inplace=True)`` hands that same object back. The checks
still run before anything is touched, and a ``prepare`` that fails after
the rewrite started puts the model back as it was.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.optim import Optimizer

from fxprune.config import ONESHOT_ONLY_POLICIES, PruningConfig, load_config
from fxprune.errors import ConfigError, TraceError
from fxprune.graph_module import (
    OriginalRoot,
    PreparedGraphModule,
    adopt_hierarchy,
    call_original_graph,
    remove_captured_forwards,
)
from fxprune.plan import make_plan
from fxprune.pruner import Pruner, prepared_parameter_map
from fxprune.report import PrepareReport
from fxprune.rewrite import install_masks, remove_leaf_hooks, restore_parameters
from fxprune.trace import CaptureResult, capture_model, output_tensors, record_calls

__all__ = ["prepare", "TraceFallbackWarning"]

_RESERVED = ("pruner", "_fxprune_original")


class TraceFallbackWarning(UserWarning):
    """Part of the model could not be traced and is masked at module level instead."""


def prepare(
    model: nn.Module,
    config: str | os.PathLike | Mapping[str, Any] | PruningConfig,
    *,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Iterable[str | type] | None = None,
    optimizer: Optimizer | None = None,
    steps_per_epoch: int | None = None,
    example_inputs: Any = None,
    inplace: bool = False,
) -> PreparedGraphModule:
    """Return a pruning-ready copy of ``model``: masked parameters plus ``prepared.pruner``.

    ``concrete_args`` is passed to the tracer (specialize inputs such as flags
    used in control flow); ``leaf_modules`` (module names or classes) are kept
    as leaves and masked at module level. Submodules that cannot be traced
    become leaves automatically; see ``prepared.pruner.prepare_report``.

    ``example_inputs`` (a tuple of positional arguments, a dict of keyword
    arguments, ``(args, kwargs)`` as a tuple of a tuple and a dict, or a single
    argument) enables the per-submodule fallback: where a module's own forward
    is untraceable (most Hugging Face models' root), its children are traced
    one by one, specialized to how the example run calls them, instead of
    masking everything below it at module level. The prepared model is then
    checked against the original on the example (in eval mode); if they
    differ, that capture is dropped and the report says why.

    ``optimizer`` (built on ``model``'s parameters) turns on optimizer mode:
    it is re-pointed to the prepared copy's parameters (state included) and
    attached with ``prepared.pruner.attach(optimizer, steps_per_epoch=...)``,
    so a plain loop prunes with no hook call; see :meth:`fxprune.Pruner.attach`.

    ``inplace=True`` rewrites ``model`` itself instead of a copy (no second
    copy of the weights): ``model`` is consumed -- use the returned prepared
    model, whose parameters are ``model``'s own parameter objects, and get
    ``model`` back, pruned, from ``convert(prepared, inplace=True)``. The
    example run's check then compares with outputs of ``model`` taken before
    the rewrite (the default compares with a copy).
    """
    if steps_per_epoch is not None and optimizer is None:
        raise TypeError("steps_per_epoch is only used with optimizer=; or call prepared.pruner.attach(opt, ...)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare() expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, PreparedGraphModule):
        raise TypeError("this model is already prepared; convert() it first or prepare the original")
    cfg = load_config(config)
    for p in cfg.pruners:
        if p.policy in ONESHOT_ONLY_POLICIES:
            raise ConfigError(
                f"policy {p.policy!r} rewrites the remaining weights once from calibration data and has no "
                "training-time masks: use fxprune.oneshot(model, config, calibration) instead of prepare()",
                p.key_path,
                cfg.source,
            )
    plan = make_plan(model, cfg)
    for name in _RESERVED:
        if hasattr(model, name):
            raise TraceError(f"the model already has an attribute {name!r}, which fxprune needs on the prepared model")

    owners = {alias.rpartition(".")[0] for t in plan.targets for alias in t.aliases}
    if any(getattr(p, "pattern", "unstructured") == "channel" for p in cfg.pruners):
        leaf_modules = _with_norm_leaves(model, leaf_modules, owners)
    example = None if example_inputs is None else split_example(example_inputs)
    reference = _reference_outputs(model, example) if inplace and example is not None else None
    built: list[tuple[nn.Module, list]] = []  # (root, targets) of the rewrite in force, for _undo
    try:
        gm, report = _rewrite(model, cfg, plan, owners, concrete_args, leaf_modules, example, reference, inplace, built)
        if optimizer is not None:
            gm.pruner.attach(optimizer, steps_per_epoch=steps_per_epoch, replace=prepared_parameter_map(model, gm))
    except BaseException:
        if inplace and built:  # a failure after the rewrite started: give the user's model back as it was
            _undo(*built[-1])
        raise
    gm.train(model.training)
    if report.fallback_leaves or not report.traced:
        warnings.warn(f"fxprune: partial trace of {type(model).__name__}\n{report}", TraceFallbackWarning, stacklevel=2)
    if example is None and report.traced:
        _warn_if_checkpointing_unseen(model)
    return gm


def _rewrite(
    model: nn.Module,
    cfg: PruningConfig,
    plan: Any,
    owners: set[str],
    concrete_args: dict[str, Any] | None,
    leaf_modules: Iterable[str | type] | None,
    example: tuple[tuple, dict] | None,
    reference: list | str | None,
    inplace: bool,
    built: list[tuple[nn.Module, list]],
) -> tuple[PreparedGraphModule, PrepareReport]:
    """Capture and rewrite (twice if the example run's check drops the per-submodule capture), attach the
    Pruner and the channel plan: the prepared model and its report."""
    gm, work, targets, captured = _build(model, plan, owners, concrete_args, leaf_modules, example, inplace)
    built.append((work, targets))
    dropped = None
    if example is not None and len(captured.captures) > 1:
        dropped = _verify(gm, model, example, reference)
        if dropped is not None:  # the per-submodule capture is wrong for this model: fall back to module level
            if inplace:
                _undo(*built.pop())
            gm, work, targets, captured = _build(model, plan, owners, concrete_args, leaf_modules, None, inplace)
            built.append((work, targets))
    root = captured.root
    modules = captured.routes() if len(captured.captures) > 1 or captured.uncaptured else {}
    if dropped is not None:
        modules = {"<root>": f"python ({root.reason}); per-submodule capture dropped: {dropped}"}
    report = PrepareReport(
        traced=root.graph is not None,
        fallback_leaves=dict(root.leaves),
        root_error=root.reason,
        routes={t.name: t.route for t in targets},
        pruners={p: plan.names_of(p) for p in plan.pruners},
        modules=modules,
    )
    gm.pruner = Pruner(cfg, plan, targets, report)
    channel_pruners = [p.name for p in cfg.pruners if getattr(p, "pattern", "unstructured") == "channel"]
    if channel_pruners:  # pattern: channel -- analyse channel dependencies once (fxprune.structured)
        from fxprune.structured import attach_channel_plan

        attach_channel_plan(gm, channel_pruners, example)
    return gm, report


def _with_norm_leaves(model: nn.Module, leaf_modules: Iterable[str | type] | None,
                      owners: set[str]) -> list[str | type]:
    """Channel pruning keeps normalization modules whole in the graph (fx leaves), so that the channel plan can
    make them compute over the kept channels (:mod:`fxprune.structured.norms`); one that owns a pruned weight
    stays as it was."""
    from fxprune.structured.norms import norm_spec

    out = list(leaf_modules or ())
    for name, m in model.named_modules():
        if name and name not in owners and norm_spec(m) is not None:
            out.append(name)
    return out


def _undo(root: nn.Module, targets: list) -> None:
    """Put an in-place rewritten model back as it was: its own parameters (no mask was applied yet), no
    hooks, no captured forwards."""
    restore_parameters(targets)
    remove_leaf_hooks(root)
    remove_captured_forwards(root)


def _reference_outputs(model: nn.Module, example: tuple[tuple, dict]) -> list[torch.Tensor] | str:
    """The model's outputs on the example in eval mode, before an in-place rewrite (or why it failed)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            return [t.detach().clone() for t in output_tensors(model(*example[0], **example[1]))]
    except Exception as e:  # noqa: BLE001 - reported by _verify as the reason the capture is dropped
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]
    finally:
        model.train(was)


def _warn_if_checkpointing_unseen(model: nn.Module) -> None:
    """A graph traced without an example run cannot know where a forward checkpoints (timm's ViT does it only
    on a branch fx does not take): say so where the usual flags say checkpointing is on."""
    flagged = [name or "<root>" for name, m in model.named_modules()
               if getattr(m, "grad_checkpointing", False) is True or getattr(m, "gradient_checkpointing", False) is True]
    if flagged:
        warnings.warn(
            f"fxprune: activation checkpointing is enabled in {', '.join(flagged[:3])}"
            f"{' ...' if len(flagged) > 3 else ''}, but without example_inputs fxprune cannot see where the "
            "forward checkpoints, and a traced graph may run the checkpointed part without recomputing it "
            "(more memory, same results). Pass prepare(..., example_inputs=...) to keep it.",
            TraceFallbackWarning,
            stacklevel=3,
        )


def _build(
    model: nn.Module,
    plan: Any,
    owners: set[str],
    concrete_args: dict[str, Any] | None,
    leaf_modules: Iterable[str | type] | None,
    example: tuple[tuple, dict] | None,
    inplace: bool = False,
) -> tuple[PreparedGraphModule, nn.Module, list, CaptureResult]:
    """Copy (unless ``inplace``), capture and rewrite: the prepared model (without its Pruner), its root
    (``model`` itself or its copy), targets, captures."""
    work = model if inplace else copy.deepcopy(model)
    calls = None if example is None else record_calls(work, *example)
    attrs_before = set(work.__dict__)
    captured = capture_model(work, owners, concrete_args=concrete_args, leaf_modules=leaf_modules, calls=calls)
    class_name = type(model).__name__
    if captured.root.graph is not None:
        gm = PreparedGraphModule(work, captured.root.graph, class_name=class_name)
        for name in set(work.__dict__) - attrs_before:  # tensor constants the tracer put on the root
            del work.__dict__[name]
    else:
        gm = PreparedGraphModule({"_fxprune_original": OriginalRoot(work)}, call_original_graph(), class_name=class_name)
        adopt_hierarchy(gm, work)
    gm.__dict__["_fxprune_original"] = OriginalRoot(work)
    gm._present_original_signature()
    targets = install_masks(gm, work, plan, captured)
    return gm, work, targets, captured


def split_example(example: Any) -> tuple[tuple, dict]:
    """``example_inputs`` as ``prepare`` takes them (a tuple of args, a dict of kwargs, ``(args, kwargs)``, a tensor)."""
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, tuple):
        if len(example) == 2 and isinstance(example[0], tuple) and isinstance(example[1], dict):
            return example[0], dict(example[1])
        return example, {}
    return (example,), {}


@torch.no_grad()
def _verify(
    gm: PreparedGraphModule, original: nn.Module, example: tuple[tuple, dict], want: list | str | None = None
) -> str | None:
    """Compare the prepared model (all masks still ones) with the original, in eval mode.

    Returns why they differ, or ``None``. A Python forward that reads a
    captured child's weight directly, or a call the capture mis-specialized,
    shows up here instead of in the user's training run. ``want``: the
    original's outputs taken before an in-place rewrite; otherwise a copy of
    the original is run (never the user's own object: its mode and buffers
    stay as they are).
    """
    if isinstance(want, str):
        return want
    was = gm.training
    gm.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            got = output_tensors(gm(*example[0], **example[1]))
        if want is None:
            reference = copy.deepcopy(original)
            reference.eval()
            with torch.random.fork_rng(devices=[]):
                want = output_tensors(reference(*example[0], **example[1]))
    except Exception as e:  # noqa: BLE001 - any failure means the capture is unusable
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]
    finally:
        gm.train(was)
    if len(got) != len(want):
        return f"{len(got)} output tensors instead of {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5):
            return f"output {i} differs from the original model's"
    return None
