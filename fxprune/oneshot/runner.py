"""Run a model block by block: capture what each block is called with, replay blocks on stored inputs.

Sequential calibration needs, for every block, the arguments the model passes
it (attention masks, position embeddings, cache positions: these often differ
per layer, e.g. Gemma's sliding-window and global layers) and the hidden
states entering the first block. :func:`capture_calls` gets both from one run
of the calibration batches in which no block computes: each block's
``forward`` is replaced, for the duration of the run only, by a recorder that
stores its arguments and hands its input hidden states straight back (shaped
like the block's real output, learned by running the first block once). The
last block stops the run with a private exception unless the weights after
the blocks must be observed too. Caches are switched off in what is stored
(``use_cache=False``, cache objects replaced by ``None``).

:func:`run_block` then replays one block on the stored inputs, and
:func:`replay_tail` runs the model once more with every block answering from
the stored final hidden states, so that weights after the blocks (a head)
see the inputs that really reach them. Every patched ``forward`` is removed in
a ``finally``: nothing stays on the model.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from fxprune.errors import PruningError

__all__ = ["BlockCall", "Captured", "call_model", "capture_calls", "move_calls", "run_block", "replay_tail", "hidden_of"]


class _StopForward(Exception):
    """Raised by the last block's recorder: the rest of the model is not needed."""


@dataclass
class BlockCall:
    """How a block was called in one batch, its hidden-states input left out."""

    args: tuple
    kwargs: dict
    hidden_key: str | None  # None: hidden states are the first positional argument

    def call(self, block: nn.Module, hidden: torch.Tensor) -> Any:
        if self.hidden_key is None:
            return block(hidden, *self.args, **self.kwargs)
        return block(*self.args, **{**self.kwargs, self.hidden_key: hidden})


@dataclass
class Captured:
    """The first block's input per batch and every block's calls per batch, blocks in call order."""

    hidden: list[torch.Tensor]
    order: list[int]  # block indices in the order the model calls them
    calls: dict[int, list[BlockCall]] = field(default_factory=dict)
    template: Any = None  # the first block's real output on batch 0 (its structure)


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` / ``model(*batch)`` / ``model(**batch)``, with ``use_cache=False`` where accepted."""
    extra = {}
    try:
        accepts = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    if accepts and not (isinstance(batch, Mapping) and "use_cache" in batch):
        extra["use_cache"] = False
    if isinstance(batch, Mapping):
        return model(**batch, **extra)
    if isinstance(batch, (tuple, list)):
        return model(*batch, **extra)
    return model(batch, **extra)


def _no_cache(value: Any) -> Any:
    return None if "Cache" in type(value).__name__ else value


def _scrub(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs = {k: (False if k == "use_cache" else _no_cache(v)) for k, v in kwargs.items()}
    return tuple(_no_cache(a) for a in args), kwargs


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states in a block's output (a tensor, or the first item of a tuple/list/mapping)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping) and output:
        first = next(iter(output.values()))
        if isinstance(first, torch.Tensor):
            return first
    raise PruningError(f"a block returned {type(output).__name__}, not hidden states (a tensor or a tuple starting with one)")


def _like(template: Any, hidden: torch.Tensor) -> Any:
    """``template`` (a block's output) with its hidden states replaced."""
    if isinstance(template, torch.Tensor):
        return hidden
    if isinstance(template, (tuple, list)):
        return type(template)([hidden, *template[1:]]) if type(template) in (tuple, list) else type(template)(hidden, *template[1:])
    first = next(iter(template))
    return type(template)(**{**template, first: hidden})


@contextlib.contextmanager
def _patched(blocks: list[nn.Module], make: Callable[[int, nn.Module], Callable]) -> Iterator[None]:
    saved = [b.__dict__.get("forward", None) for b in blocks]
    try:
        for i, b in enumerate(blocks):
            b.forward = make(i, b)
        yield
    finally:
        for b, old in zip(blocks, saved):
            if old is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = old


def _hidden_key(block: nn.Module) -> str | None:
    try:
        params = list(inspect.signature(block.forward).parameters)
    except (TypeError, ValueError):
        return None
    return params[0] if params else None


def capture_calls(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    batches: list[Any],
    *,
    needed: set[int],
    run_tail: bool,
) -> Captured:
    """One run of ``batches`` with every block replaced by a recorder; see the module docstring.

    ``needed`` are the blocks that hold weights to prune: one of them that
    never runs is an error. ``run_tail`` lets the run go past the last block.
    """
    modules = [m for _, m in blocks]
    originals = [type(m).forward.__get__(m) if "forward" not in m.__dict__ else m.__dict__["forward"] for m in modules]
    keys = [_hidden_key(m) for m in modules]
    captured = Captured(hidden=[], order=[])
    state: dict[str, Any] = {}

    def make(i: int, block: nn.Module) -> Callable:
        def recorder(*args, **kwargs):
            seen = state["seen"]
            if i in seen:
                raise PruningError(
                    f"block {blocks[i][0]!r} runs more than once per forward; sequential calibration needs each "
                    "block called once: pass sequential=False or set sequential_targets"
                )
            if args:
                hidden, rest, key = args[0], args[1:], None
            else:
                key = keys[i] if keys[i] in kwargs else next(iter(kwargs), None)
                if key is None:
                    raise PruningError(f"block {blocks[i][0]!r} was called without arguments")
                hidden = kwargs[key]
                kwargs = {k: v for k, v in kwargs.items() if k != key}
                rest = args
            if not isinstance(hidden, torch.Tensor):
                raise PruningError(f"block {blocks[i][0]!r}: its first argument is {type(hidden).__name__}, not hidden states")
            rest, kwargs = _scrub(rest, kwargs)
            if not seen:
                captured.hidden.append(hidden)
                if captured.template is None:
                    captured.template = originals[i](hidden, *rest, **kwargs) if key is None else originals[i](
                        *rest, **{**kwargs, key: hidden}
                    )
            else:
                prev = state["returned"]
                if not (hidden is prev or (hidden.shape == prev.shape and torch.equal(hidden, prev))):
                    raise PruningError(
                        f"the model changes the hidden states between block {blocks[seen[-1]][0]!r} and block "
                        f"{blocks[i][0]!r}, so the blocks cannot be replayed one after the other; set "
                        "sequential_targets or pass sequential=False"
                    )
            seen.append(i)
            captured.calls.setdefault(i, []).append(BlockCall(rest, kwargs, key))
            state["returned"] = hidden
            if len(seen) == len(modules) and not run_tail:
                raise _StopForward
            return _like(captured.template, hidden)

        return recorder

    with _patched(modules, make):
        for b, batch in enumerate(batches):
            state["seen"] = []
            try:
                call_model(model, batch)
            except _StopForward:
                pass
            seen = state["seen"]
            if b == 0:
                captured.order = list(seen)
            elif seen != captured.order:
                raise PruningError(
                    f"calibration batch {b} runs the blocks in another order (or a different subset) than batch 0; "
                    "sequential calibration needs the same path for every batch: pass sequential=False"
                )
    if not batches:
        raise PruningError("the calibration iterable yielded no batches")
    missing = sorted(needed - set(captured.order))
    if missing:
        raise PruningError(
            "block(s) " + ", ".join(repr(blocks[i][0]) for i in missing) + " never run on the calibration batches, so "
            "their weights have no inputs to calibrate on; exclude them or use other batches"
        )
    return captured


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor], memo: dict[int, Any]) -> Any:
    """``value`` (a tensor, or plain tuples/lists/dicts of them) with ``fn`` applied to every tensor.

    ``memo`` maps a tensor's id to its result, so a tensor shared by several
    arguments (one attention mask for every block) stays shared.
    """
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = fn(value)
        return memo[id(value)]
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
        return type(value)(map_tensors(v, fn, memo) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn, memo) for k, v in value.items()}
    return value


def _to(value: Any, device: torch.device | None, memo: dict[int, Any]) -> Any:
    return value if device is None else map_tensors(value, lambda t: t.to(device), memo)


def _cast_floating(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.to(dtype) if t.is_floating_point() else t


def move_calls(captured: Captured, device: torch.device | None) -> None:
    """Move every stored argument and hidden state to ``device`` (shared tensors stay shared)."""
    if device is None:
        return
    memo: dict[int, Any] = {}
    captured.hidden = [_to(h, device, memo) for h in captured.hidden]
    for i, calls in captured.calls.items():
        captured.calls[i] = [BlockCall(_to(c.args, device, memo), _to(c.kwargs, device, memo), c.hidden_key) for c in calls]


def run_block(
    block: nn.Module,
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
    after_each: Callable[[], None] | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[torch.Tensor]:
    """The block's output hidden states for every batch, one at a time.

    With ``dtype`` (see :mod:`fxprune.oneshot.precision`) the stored inputs and
    floating arguments are cast to it for the call and the output back to the
    stored hidden states' dtype.
    """
    for x, call in zip(hidden, calls):
        if dtype is None:
            out = hidden_of(call.call(block, x))
        else:
            memo: dict[int, Any] = {}
            cast = _cast_floating(dtype)
            cast = BlockCall(map_tensors(call.args, cast, memo), map_tensors(call.kwargs, cast, memo), call.hidden_key)
            out = hidden_of(cast.call(block, x.to(dtype))).to(x.dtype)
        if after_each is not None:
            after_each()
        yield out


def replay_tail(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    batches: list[Any],
    final: list[torch.Tensor],
    template: Any,
    after_each: Callable[[], None] | None = None,
) -> None:
    """Run ``batches`` through the model with every block answering ``final[batch]`` (for the layers after them)."""
    modules = [m for _, m in blocks]
    current: dict[str, int] = {}

    def make(i: int, block: nn.Module) -> Callable:
        def answer(*args, **kwargs):
            out = final[current["batch"]]
            ref = args[0] if args else next(iter(kwargs.values()))
            return _like(template, out.to(ref.device) if isinstance(ref, torch.Tensor) else out)

        return answer

    with _patched(modules, make):
        for b, batch in enumerate(batches):
            current["batch"] = b
            call_model(model, batch)
            if after_each is not None:
                after_each()
