"""calibrate(): record what flows into each pruned weight, for activation-aware policies (Wanda).

Wanda scores ``W[i, j]`` by ``|W[i, j]| * ||X_j||_2``, so it needs, for every
weight it prunes, the L2 norm of each input feature of the operation that
consumes that weight. Where that operation is depends on how the weight is
masked (see :mod:`fxprune.rewrite`):

- *graph route*: the masked-parameter node feeds a ``linear`` or ``convNd``
  call in an fx graph (the root's, or that of a child traced on its own when
  the root could not be). A forward hook on the ``MaskedParameter`` remembers
  the effective-weight tensor it returns, and a ``TorchFunctionMode`` records
  the input of the linear/conv call that receives that very tensor. Neither
  the graph nor the generated code is touched.
- *module route*: the weight is read inside a leaf module (a Hugging Face
  model whose root ``forward`` is untraceable is one leaf). A forward pre-hook
  on the owning ``nn.Linear``, ``nn.Conv1d/2d/3d`` or Hugging Face ``Conv1D``
  sees the input; the hooks are removed afterwards.

A weight whose input cannot be attributed to its features (an embedding
lookup, a weight read by a Python-level leaf such as ``nn.MultiheadAttention``,
a weight never reached by the batches) is an error naming it: Wanda would
otherwise silently prune it blind.

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
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fxprune.errors import PruningError
from fxprune.graph_module import PreparedGraphModule
from fxprune.policies.wanda import WandaState, feature_sq_sums
from fxprune.pruner import Pruner
from fxprune.rewrite import InstalledTarget

__all__ = ["calibrate"]

_CONV_FNS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
# Reads of a weight that do not compute with it (shape queries): nothing to observe.
_METADATA_METHODS = {"size", "dim", "numel"}
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}



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
    _check_graph_consumers(prepared, targets)
    hooks = _module_recorders(targets)
    if reset:
        for t in targets:
            t.masked.wanda.reset()

    # Graph-route weights (in the root graph or in a child traced on its own) are seen where the
    # effective weight a MaskedParameter just returned is passed to a linear/conv call.
    live: dict[int, tuple[InstalledTarget, torch.Tensor]] = {}
    handles = [module.register_forward_pre_hook(fn, with_kwargs=True) for module, fn in hooks]
    handles += [
        t.masked.register_forward_hook(_remember_output(t, live)) for t in targets if t.route.startswith("graph")
    ]
    was_training = prepared.training
    try:
        prepared.eval()
        with torch.no_grad(), _WeightInputs(live):
            for batch in batches:
                if forward is not None:
                    forward(prepared, batch)
                elif isinstance(batch, Mapping):
                    prepared(**batch)
                elif isinstance(batch, (tuple, list)):
                    prepared(*batch)
                else:
                    prepared(batch)
                live.clear()
    finally:
        live.clear()
        for h in handles:
            h.remove()
        prepared.train(was_training)

    unseen = [t.name for t in targets if int(t.masked.wanda.rows) == 0]
    if unseen:
        raise PruningError(
            "calibrate(): the batches never reached the layer(s) reading "
            + ", ".join(repr(n) for n in unseen)
            + " (an empty batch list, a branch the inputs do not take, or a leaf module that reads the weight "
            "without calling its layer); exclude these weights from the wanda pruner or use other batches"
        )
    return {t.name: int(t.masked.wanda.rows) for t in targets}


# ----------------------------------------------------------------- graph route
def _check_graph_consumers(gm: fx.GraphModule, targets: list[InstalledTarget]) -> None:
    """Fail before running when the root graph uses a wanda weight in a way whose input is not its features."""
    by_name = {t.name: t for t in targets if t.route.startswith("graph")}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in by_name:
            continue
        t = by_name[node.target]
        for user in node.users:
            if user.op == "call_method" and user.target in _METADATA_METHODS:
                continue
            if user.op == "call_function" and user.target is getattr and user.args[1] in _METADATA_ATTRS:
                continue
            fn = user.target if user.op == "call_function" else None
            if fn is F.linear or fn in _CONV_FNS:
                weight_arg = user.args[1] if len(user.args) > 1 else user.kwargs.get("weight")
                if weight_arg is node:
                    continue
            raise PruningError(
                f"calibrate(): cannot observe the input of weight {t.name!r}: it is used by graph node "
                f"{user.format_node()}, and only the weight argument of linear and conv1d/2d/3d calls has "
                "inputs that map to its features (embeddings, matmuls and transformed weights do not); "
                "exclude it from the wanda pruner"
            )


def _remember_output(t: InstalledTarget, live: dict[int, tuple[InstalledTarget, torch.Tensor]]) -> Callable:
    """Forward hook of a MaskedParameter: remember the effective-weight tensor it returned (by identity)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        live[id(output)] = (t, output)  # the reference keeps the id from being reused within the batch

    return hook


class _WeightInputs(TorchFunctionMode):
    """Sees every linear/conv call; records the input of those whose weight is a remembered effective weight."""

    def __init__(self, live: dict[int, tuple[InstalledTarget, torch.Tensor]]):
        super().__init__()
        self.live = live

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.live and (func is F.linear or func in _CONV_FNS):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            hit = self.live.get(id(weight))
            if hit is not None and hit[1] is weight:
                t = hit[0]
                x = args[0] if args else kwargs["input"]
                kind = "linear" if func is F.linear else "conv"
                groups = (args[6] if len(args) > 6 else kwargs.get("groups", 1)) if kind == "conv" else 1
                _record(t, kind, x, t.masked.param.shape, groups, f"{func.__name__} call")
        return func(*args, **kwargs)


# ---------------------------------------------------------------- module route
def _layer_kind(module: nn.Module) -> str | None:
    """The consumer kind of a layer whose ``weight`` multiplies its input's features, or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    # Hugging Face Conv1D (GPT-2 and relatives): x @ W with W [in, out]. Matched by name so that
    # transformers is never imported here.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return "conv1d_hf"
    return None


def _module_recorders(targets: list[InstalledTarget]) -> list[tuple[nn.Module, Callable]]:
    """Forward pre-hooks on the layers that own module-route weights."""
    hooks: list[tuple[nn.Module, Callable]] = []
    for t in targets:
        if t.route == "unused":
            raise PruningError(
                f"calibrate(): weight {t.name!r} is never read by the model's forward, so it has no input "
                "to observe; exclude it from the wanda pruner"
            )
        if "module" not in t.route:
            continue
        for owner, attr in t.owners:
            kind = _layer_kind(owner)
            if t.route != "module" and kind in ("linear", "conv"):
                continue  # read by a graph too: its F.linear/conv calls are seen by _WeightInputs
            if attr != "weight" or kind is None:
                raise PruningError(
                    f"calibrate(): cannot observe the input of weight {t.name!r}: it is read inside a leaf module, "
                    f"as attribute {attr!r} of {type(owner).__name__}, and only the 'weight' of nn.Linear, "
                    "nn.Conv1d/2d/3d and Hugging Face Conv1D layers has inputs that map to its features; "
                    "exclude it from the wanda pruner"
                )
            hooks.append((owner, _layer_hook(t, kind, owner)))
    return hooks


def _layer_hook(t: InstalledTarget, kind: str, owner: nn.Module) -> Callable:
    where = f"{type(owner).__name__} layer"
    groups = getattr(owner, "groups", 1)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        _record(t, kind, x, t.masked.param.shape, groups, where)

    return hook


def _record(t: InstalledTarget, kind: str, x: torch.Tensor, shape: torch.Size, groups: int, where: str) -> None:
    sq, rows = feature_sq_sums(kind, x, shape, groups)
    try:
        t.masked.wanda.record(sq, rows, out_dim=1 if kind == "conv1d_hf" else 0, where=where)
    except ValueError as e:
        raise PruningError(f"calibrate(): weight {t.name!r}: {e}") from None
