"""The check ``convert(physical=True)`` ends with: the shrunk model must give the masked model's outputs.

The channel analysis proves what it can and reports the rest, but a shrunk
model that crashes or drifts is the worst outcome a user can get, and it
shows only at the first forward. So before ``convert`` returns, the shrunk
model runs on an example input (``prepare``'s ``example_inputs``, kept in the
channel plan, or ``convert(..., example_inputs=...)``) and is compared with the
masked model's outputs on the same input; any difference is a
:class:`~fxprune.errors.PruningError` naming the groups whose cut breaks it.
Both models run in eval mode without gradients, and their buffers, modes
and the global RNG are put back (:func:`fxprune.trace.leaving_no_trace`), so
the check leaves no mark on either.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxprune.errors import PruningError
from fxprune.trace import leaving_no_trace, output_tensors

__all__ = ["eval_outputs", "outputs_match", "check_shrunk", "on_model_device"]


def eval_outputs(model: nn.Module, example: tuple[tuple, dict]) -> list[torch.Tensor]:
    """Every output tensor of ``model(*args, **kwargs)`` in eval mode; the model is left as it was."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), leaving_no_trace(model):
            return [t.detach().clone() for t in output_tensors(model(*example[0], **example[1]))]
    finally:
        for m, mode in modes:
            m.training = mode


def outputs_match(got: list[torch.Tensor], want: list[torch.Tensor]) -> str | None:
    """None when equal up to float summation order, else what differs."""
    if len(got) != len(want):
        return f"{len(got)} output tensors instead of {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            return f"output {i} has shape {tuple(g.shape)} instead of {tuple(w.shape)}"
        if not w.is_floating_point():
            if not torch.equal(g, w):
                return f"output {i} differs"
            continue
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        if not torch.allclose(g, w, rtol=1e-3, atol=1e-4 * scale, equal_nan=True):
            return f"output {i} differs by up to {float((g - w).abs().max()):.3g} (scale {scale:.3g})"
    return None


def check_shrunk(
    shrunk: nn.Module,
    example: tuple[tuple, dict],
    reference: list[torch.Tensor],
    removed: dict[int, torch.Tensor],
    describe: Callable[[int], str],
    shrink_one: Callable[[int], nn.Module] | None,
) -> None:
    """Raise :class:`PruningError` if ``shrunk`` does not reproduce ``reference`` on ``example``.

    ``shrink_one(gid)`` (None when the prepared model was consumed by
    ``inplace=True``) builds a model with only group ``gid`` cut, to name the
    groups at fault; ``describe(gid)`` says a group's layers.
    """
    problem = _run(shrunk, example, reference)
    if problem is None:
        return
    culprits = list(removed)
    if shrink_one is not None:
        culprits = [gid for gid in removed if _run(shrink_one(gid), example, reference) is not None] or culprits
    groups = "; ".join(f"group {gid} ({describe(gid)})" for gid in culprits)
    raise PruningError(
        f"convert(physical=True): the shrunk model does not give the masked model's outputs on the example input "
        f"({problem}); cutting {groups} breaks it. This is a gap in the channel analysis: please report it. "
        "Meanwhile exclude those layers from the channel pruner (its 'weights'), or convert with physical=False "
        "(the masked weights, unshrunk). The prepared model is unchanged"
        + ("." if shrink_one is not None else " unless inplace=True was given."),
    )


def _run(model: nn.Module, example: tuple[tuple, dict], reference: list[torch.Tensor]) -> str | None:
    try:
        got = eval_outputs(model, example)
    except Exception as e:  # noqa: BLE001 - a crash is the clearest difference of all
        return f"its forward raises {type(e).__name__}: {e}"
    return outputs_match(got, reference)


def on_model_device(example: tuple[tuple, dict], model: nn.Module) -> tuple[tuple, dict]:
    """The example's tensors on the model's device (``prepare`` may have seen them before ``model.to(...)``)."""
    param = next(iter(model.parameters()), None)
    if param is None:
        return example
    device = param.device
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) and t.device != device else t,
                           example)
