"""calibrate(): record what flows into each pruned weight, for activation-aware policies (Wanda).

Wanda scores ``W[i, j]`` by ``|W[i, j]| * ||X_j||_2``, so it needs, for every
weight it prunes, the L2 norm of each input feature of the operations that
multiply that weight. Those operations are found by
:class:`fxprune.observe.WeightInputObserver`, the one implementation of "what
did this weight multiply" that the one-shot path uses too: it watches the
torch functions the model calls, whatever reads the weight -- ``nn.Linear`` /
``F.linear``, Hugging Face ``Conv1D``'s ``addmm``, ``x @ W.T`` (Falcon),
``W @ x`` (Mamba's ``dt_proj``), convolutions with the kernel or a view of it
(Mamba's ``conv1d``), one expert ``experts[e]`` of a stacked-experts parameter
or ``bmm`` / grouped mm over all of them (transformers 5 MoE models: the
statistics are per expert). A prepared model reads the *effective* weight a
``MaskedParameter`` returns; a forward hook on each one hands that tensor to
the observer as it is produced. Neither the graph nor the generated code is
touched, and no hook or mode stays after the call.

A weight whose input cannot be attributed to its features (an embedding
lookup, a weight transformed before it is multiplied, a weight passed to an op
the observer does not know such as ``nn.MultiheadAttention``'s fused
function, a weight -- or an expert -- never reached by the batches) is an
error naming it: Wanda would otherwise silently prune it blind. Statistics are
written only when the whole calibration succeeded.

Typical one-shot use (``schedule: oneshot`` at ``start_epoch: 0``)::

    prepared = fxprune.prepare(model, {"wanda": {"llm": {"weights": [...], "target_sparsity": 0.5,
                                                         "schedule": "oneshot"}}})
    fxprune.calibrate(prepared, batches)   # a few batches of real inputs
    prepared.pruner.on_epoch_begin(0)      # prune to the target, no retraining
    model = fxprune.convert(prepared)
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn

from fxprune.errors import PruningError
from fxprune.graph_module import PreparedGraphModule
from fxprune.observe import WeightInputObserver, WeightRead, op_name
from fxprune.policies.wanda import WandaState
from fxprune.pruner import Pruner
from fxprune.read_ops import UNATTRIBUTABLE, UnattributableRead
from fxprune.rewrite import InstalledTarget

__all__ = ["calibrate"]


def calibrate(
    prepared: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    reset: bool = True,
) -> dict[str, int]:
    """Run ``prepared`` on ``batches`` and record input-feature norms for every wanda-pruned weight.

    Each batch is passed as ``prepared(batch)`` for a tensor, ``prepared(*batch)``
    for a tuple or list and ``prepared(**batch)`` for a mapping, unless
    ``forward(prepared, batch)`` is given (e.g. ``lambda m, b: m(b[0])`` for
    ``(input, label)`` pairs). The model runs in eval mode under
    ``torch.no_grad()``; its mode is restored afterwards, and its weights and
    masks are not changed. ``reset=False`` adds to earlier calibrations
    instead of replacing them.

    The statistics are saved in the prepared model's ``state_dict()``; the
    next mask update of a wanda pruner uses them. Returns, per weight, the
    number of input vectors (tokens, positions) observed.
    """
    pruner = getattr(prepared, "pruner", None)
    if not isinstance(prepared, PreparedGraphModule) or not isinstance(pruner, Pruner):
        raise TypeError(f"calibrate() expects a model returned by fxprune.prepare(), got {type(prepared).__name__}")
    targets = [t for t in pruner.targets if isinstance(getattr(t.masked, "wanda", None), WandaState)]
    if not targets:
        policies = ", ".join(f"{p.key_path}" for p in pruner.pruner_configs)
        raise PruningError(
            f"calibrate(): no pruner of this model uses an activation-aware policy (wanda); pruners: {policies}"
        )
    if "torch.distributed.fsdp" in sys.modules:
        from torch.distributed.fsdp import FSDPModule

        if any(isinstance(m, FSDPModule) for m in prepared.modules()):
            raise PruningError(
                "calibrate(): the model is sharded with FSDP2 (fully_shard), which fxprune's activation "
                "recording does not support; calibrate the prepared model before fully_shard (the statistics "
                "stay in its state dict; the masks are computed from rank 0's, which every rank then takes)"
            )
    _check_before_running(prepared, targets)
    by_name = {t.name: t for t in targets}
    fresh = {t.name: WandaState() for t in targets}  # written into the model only if everything succeeds

    def on_read(read: WeightRead) -> None:
        try:
            fresh[read.name].record_read(read, where=f"{read.op!r} call")
        except ValueError as e:
            raise PruningError(f"calibrate(): weight {read.name!r}: {e}") from None

    observer = WeightInputObserver(prepared, {}, on_read)
    handles = [t.masked.register_forward_hook(_hand_to(observer, t.name)) for t in targets]
    was_training = prepared.training
    try:
        prepared.eval()
        with torch.no_grad(), observer:
            for batch in batches:
                if forward is not None:
                    forward(prepared, batch)
                elif isinstance(batch, Mapping):
                    prepared(**batch)
                elif isinstance(batch, (tuple, list)):
                    prepared(*batch)
                else:
                    prepared(batch)
    except UnattributableRead as e:
        if e.weight not in by_name:
            raise
        raise PruningError(
            f"calibrate(): cannot observe the input of weight {e.weight!r} ({_owners(by_name[e.weight])}): it "
            f"{e.detail}, and fxprune cannot tell which input features it multiplies; exclude it from the wanda "
            "pruner"
        ) from None
    finally:
        for h in handles:
            h.remove()
        prepared.train(was_training)

    unseen = [t.name for t in targets if fresh[t.name].seen() == 0]
    if unseen:
        raise PruningError(
            "calibrate(): the batches never reached the layer(s) reading "
            + ", ".join(repr(n) for n in unseen)
            + " (an empty batch list, a branch the inputs do not take, or a kernel outside torch -- a C++/CUDA "
            "extension -- that reads the weight unseen); exclude these weights from the wanda pruner or use other "
            "batches"
        )
    idle = {n: (s.rows == 0).nonzero().reshape(-1).tolist() for n, s in fresh.items() if s.per_expert}
    idle = {n: e for n, e in idle.items() if e}
    if idle:
        raise PruningError(
            "calibrate(): no calibration token was routed to "
            + "; ".join(f"expert(s) {e} of {n!r}" for n, e in idle.items())
            + ": Wanda would prune them blind; calibrate with more (or more varied) batches, or exclude these "
            "weights from the wanda pruner"
        )
    for t in targets if not reset else ():
        problem = t.masked.wanda.merge_problem(fresh[t.name])
        if problem:
            raise PruningError(f"calibrate(): weight {t.name!r}: {problem}; pass reset=True to start over")
    for t in targets:
        if reset:
            t.masked.wanda.reset()
        t.masked.wanda.merge(fresh[t.name])
    return {t.name: t.masked.wanda.seen() for t in targets}


def _hand_to(observer: WeightInputObserver, name: str) -> Callable:
    """Forward hook of a MaskedParameter: the effective weight it returned now stands for ``name``."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        observer.watch(name, output)

    return hook


def _owners(t: InstalledTarget) -> str:
    return ", ".join(f"attribute {attr!r} of {type(owner).__name__}" for owner, attr in t.owners) or "no owner"


def _check_before_running(gm: fx.GraphModule, targets: list[InstalledTarget]) -> None:
    """Fail before running on what is known from the plan alone: unused weights, embedding lookups in the graph."""
    for t in targets:
        if t.route == "unused":
            raise PruningError(
                f"calibrate(): weight {t.name!r} is never read by the model's forward, so it has no input "
                "to observe; exclude it from the wanda pruner"
            )
    by_name = {t.name: t for t in targets if t.route.startswith("graph")}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in by_name:
            continue
        for user in node.users:
            if user.op == "call_function" and op_name(user.target) in UNATTRIBUTABLE:
                raise PruningError(
                    f"calibrate(): cannot observe the input of weight {node.target!r}: it is used by graph node "
                    f"{user.format_node()}: {UNATTRIBUTABLE[op_name(user.target)]}; exclude it from the wanda pruner"
                )
