"""Which input vectors did each weight multiply? Observed at the torch-function level, whatever way the model reads it.

Activation-aware pruning (Wanda's feature norms, SparseGPT's ``X Xᵀ``) needs,
for every pruned weight, the inputs it was multiplied with. Forward hooks on
``nn.Linear`` see only one way of reading a weight; real models also call
``torch.addmm(b, x, W)`` with ``W`` stored ``[in, out]`` (Hugging Face
``Conv1D``), ``x @ W.T`` (Falcon), ``W @ x`` on a weight whose layer is never
called (Mamba's ``dt_proj``), ``F.linear(x, experts[e])`` / ``bmm`` /
grouped mm on one stacked ``[experts, out, in]`` parameter (transformers 5
MoE models), convolutions with a reshaped kernel (Mamba's ``conv1d``). So
:class:`WeightInputObserver` is a ``TorchFunctionMode``: it sees every torch
function call, recognises the watched weights among the arguments by tensor
identity and memory (a view, slice or expert of one shares its storage), and
hands each multiplying call to a handler of :mod:`fxprune.read_ops`.

Between the weight and the multiplying op there may be layout ops (views,
``.T``, ``[e]``, ``.to(dtype)``, ``.contiguous()``) and gathers (``W[ids]``,
MoE's batched mm). Views are found by storage; copies and gathers are
followed: their result is remembered, with where each of its dimensions sits
in the weight, for as long as it lives. Any other op that computes with a
watched weight (an embedding lookup, ``W * s``, an op this module does not
know) is a :class:`~fxprune.errors.PruningError` naming the weight and the op:
a calibration that silently missed a read would prune blind. Calls that only
ask about a weight (``.shape``, ``.dtype``, ``.size()``: nothing tensor-valued
comes back) are not reads.

Usage::

    def on_read(read):                      # one call per op call (per expert for batched expert ops)
        h[read.name] += read.rows().T @ read.rows()
    with WeightInputObserver(block, {"mlp.fc.weight": block.mlp.fc.weight}, on_read) as obs:
        block(x)
    obs.rows_seen                            # {"mlp.fc.weight": 4096}

Nothing is installed on the module: after ``__exit__`` (also on an
exception) the mode is gone and every remembered tensor is released.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fxprune.errors import PruningError
from fxprune.masked import MaskedParameter
from fxprune.read_ops import READ_OPS, UNATTRIBUTABLE, Alias, Gathered, unattributable
from fxprune.weight_read import WeightRead

__all__ = ["WeightInputObserver", "WeightRead", "op_name"]

#: Ops whose result has the same elements as their first argument in the same logical order.
_COPY_OPS = {"contiguous", "clone", "to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda",
             "_to_copy"}
#: Ops that take only shape / dtype / device from an argument in any position.
_SHAPE_ONLY = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
               "new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided", "grad"}
#: Ops that take only shape / dtype from their second argument.
_AS_OPS = {"expand_as", "view_as", "reshape_as", "type_as"}
_GATHER_OPS = {"__getitem__", "index_select"}


def op_name(func: Callable) -> str:
    """A torch function's name as the read-op table spells it: ``linear``, ``matmul``, ``T`` (property), ``ns::op``."""
    if isinstance(func, torch._ops.OpOverload):
        name = func.name()
    elif isinstance(func, torch._ops.OpOverloadPacket):
        name = func._qualified_op_name
    else:
        name = getattr(func, "__name__", None) or repr(func)
        if name == "__get__":  # a Tensor property such as .T or .shape
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        return name
    namespace, _, base = name.partition("::")
    return base if namespace == "aten" else name


class _Entry:
    """A tensor standing for (part of) a watched weight: its memory geometry and where its dims sit in the weight."""

    __slots__ = ("alive", "alias", "size", "stride", "offset", "lo", "hi", "dtype")

    def __init__(self, t: torch.Tensor, alias: Alias, alive: Callable[[], bool]):
        self.alive, self.alias, self.dtype = alive, alias, t.dtype
        self.size, self.stride, self.offset = tuple(t.shape), tuple(t.stride()), t.storage_offset()
        self.lo, self.hi = _span(t)

    def locate(self, t: torch.Tensor) -> Alias:
        """The alias of ``t``, a tensor on this entry's memory."""
        if t is not None and tuple(t.shape) == self.size and tuple(t.stride()) == self.stride \
                and t.storage_offset() == self.offset:
            return self.alias
        base = self.alias
        problem = None
        if t.dtype != self.dtype:
            problem = f"its memory is reinterpreted as {t.dtype}"
        mine = sorted((d for d in range(len(self.size)) if self.size[d] > 1 and self.stride[d] > 0),
                      key=lambda d: -self.stride[d])
        dims, used, partial = [], set(), base.partial
        for k in range(t.dim()):
            if t.shape[k] == 1 or t.stride(k) == 0:
                dims.append(None)
                continue
            match = [d for d in mine if self.stride[d] == t.stride(k) and d not in used]
            if not match:
                problem = problem or "it is read through a view that merges or splits its dimensions"
                dims.append(None)
                continue
            used.add(match[0])
            dims.append(match[0])
            partial |= t.shape[k] != self.size[match[0]]
        index, rest = {}, t.storage_offset() - self.offset
        for d in mine:
            index[d], rest = divmod(rest, self.stride[d])
        if rest or any(index[d] >= self.size[d] for d in mine):
            problem = problem or "it is read through a view this module cannot map onto its dimensions"
        partial |= any(index[d] for d in used)
        # Compose with what this entry's own dimensions stand for in the weight.
        selected = dict(base.selected)
        out_dims = []
        for d in dims:
            out_dims.append(None if d is None else base.dims[d])
        for d in mine:
            if d in used:
                continue
            what = base.dims[d]
            if isinstance(what, Gathered):
                selected[what.root_dim] = int(what.ids.reshape(-1)[index[d]])
            elif what is not None:
                selected[what] = index[d]
        return Alias(base.name, base.root_shape, tuple(out_dims), tuple(sorted(selected.items())), partial,
                     problem or base.problem)


def _span(t: torch.Tensor) -> tuple[int, int]:
    lo = t.storage_offset()
    return lo, lo + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, fake tensors: never watched
        return 0


class WeightInputObserver:
    """Context manager: while active, every read of one of ``weights`` calls ``on_read(WeightRead)``.

    ``weights`` maps names (used in :class:`WeightRead` and errors) to the
    tensors the model will read. Tensors that stand for a weight only during
    the run -- the masked effective weight a prepared model computes each
    forward -- are added with :meth:`watch`. ``rows_seen`` counts the input
    vectors observed per name (0: never read).
    """

    def __init__(self, module: nn.Module, weights: Mapping[str, torch.Tensor],
                 on_read: Callable[[WeightRead], None]):
        for name, w in weights.items():
            if not isinstance(w, torch.Tensor):
                raise TypeError(f"WeightInputObserver: weight {name!r} is a {type(w).__name__}, not a tensor")
        self.module = module
        self.on_read = on_read
        self.rows_seen: dict[str, int] = {name: 0 for name in weights}
        self._weights = dict(weights)
        self._entries: dict[int, list[_Entry]] = {}
        self._mode: _ReadMode | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "WeightInputObserver":
        if self._mode is not None:
            raise RuntimeError("WeightInputObserver is already active")
        self._entries = {}
        for name, w in self._weights.items():
            self._add(w, self._root_alias(name, w), strong=True)
        self._mode = _ReadMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        mode, self._mode = self._mode, None
        self._entries = {}
        if mode is not None:
            mode.__exit__(*exc)

    def watch(self, name: str, tensor: torch.Tensor) -> None:
        """From now on (until exit, or until ``tensor`` is freed) ``tensor`` also stands for weight ``name``."""
        self.rows_seen.setdefault(name, 0)
        ptr = _storage(tensor)
        if any(e.alive() and e.alias.name == name and e.size == tuple(tensor.shape)
               and e.offset == tensor.storage_offset() for e in self._entries.get(ptr, ())):
            return  # already watched (an unmasked weight is its own effective weight every call)
        self._add(tensor, self._root_alias(name, tensor), strong=False)

    @staticmethod
    def _root_alias(name: str, w: torch.Tensor) -> Alias:
        if w.numel() == 0 or _storage(w) == 0:
            raise PruningError(f"WeightInputObserver: weight {name!r} has no data to watch (empty or on 'meta')")
        return Alias(name, w.shape, tuple(range(w.dim())))

    def _add(self, t: torch.Tensor, alias: Alias, strong: bool) -> None:
        ptr = _storage(t)
        bucket = self._entries.setdefault(ptr, [])
        if strong:
            entry = _Entry(t, alias, _always)
        else:
            def dead(_ref, bucket=bucket):
                if entry in bucket:
                    bucket.remove(entry)
            ref = weakref.ref(t, dead)
            entry = _Entry(t, alias, lambda: ref() is not None)
        bucket.append(entry)

    # ------------------------------------------------------------------ lookup
    def _alias(self, t: torch.Tensor) -> Alias | None:
        bucket = self._entries.get(_storage(t)) if t.numel() else None
        if not bucket:
            return None
        lo, hi = _span(t)
        for entry in bucket:
            if entry.alive() and entry.lo <= lo and hi <= entry.hi:
                return entry.locate(t)
        return None

    def _entry_of(self, t: torch.Tensor) -> _Entry | None:
        lo, hi = _span(t)
        for entry in self._entries.get(_storage(t), ()):
            if entry.alive() and entry.lo <= lo and hi <= entry.hi:
                return entry
        return None

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        if any(isinstance(a, MaskedParameter) for a in args) or any(
                isinstance(v, MaskedParameter) for v in kwargs.values()):
            # A masked-parameter module passed to a torch function stands for its effective weight.
            args = tuple(a() if isinstance(a, MaskedParameter) else a for a in args)
            kwargs = {k: v() if isinstance(v, MaskedParameter) else v for k, v in kwargs.items()}
        hits: dict[int, tuple[Any, Alias]] = {}
        for position, t in _tensor_args(args, kwargs):
            alias = self._alias(t)
            if alias is not None:
                hits[id(t)] = (position, alias)
        if not hits:
            return func(*args, **kwargs)
        name = op_name(func)
        handler = READ_OPS.get(name)
        if handler is not None:
            reads = handler(name, args, kwargs, lambda t: hits.get(id(t), (None, None))[1])
            for read in reads:
                self.rows_seen[read.name] = self.rows_seen.get(read.name, 0) + read.n_rows
                self.on_read(read)
            return func(*args, **kwargs)
        first = next(iter(hits.values()))[1]
        if name in UNATTRIBUTABLE:
            raise unattributable(first, name, UNATTRIBUTABLE[name])
        out = func(*args, **kwargs)
        self._follow(name, args, kwargs, hits, out)
        return out

    def _follow(self, name: str, args: tuple, kwargs: dict, hits: dict, out: Any) -> None:
        """Remember the results of a non-multiplying op on a watched weight, or fail if they cannot be followed."""
        results = [t for t in _flat_tensors(out)]
        if not results or name in _SHAPE_ONLY:
            return  # metadata
        positions = {p for p, _ in hits.values()}
        if name in _AS_OPS and 0 not in positions:
            return  # x.expand_as(W): W gives only a shape
        source = args[0] if args and isinstance(args[0], torch.Tensor) and id(args[0]) in hits else None
        if name == "copy_" and len(args) > 1 and id(args[1]) in hits:
            self._add(args[0], hits[id(args[1])][1], strong=False)  # buf.copy_(W): buf now holds W
            return
        for t in results:
            entry = self._entry_of(t) if _storage(t) else None
            if entry is not None:
                if not entry.alive is _always:  # a view keeps a followed copy's memory alive: follow it too
                    self._add(t, entry.locate(t), strong=False)
                continue
            if source is not None and name in _COPY_OPS and t.shape == source.shape:
                self._add(t, hits[id(source)][1], strong=False)
            elif source is not None and name in _GATHER_OPS:
                self._add(t, _gathered(name, args, kwargs, hits[id(source)][1]), strong=False)
            else:
                alias = next(iter(hits.values()))[1]
                raise unattributable(alias, name, "the op computes a new tensor from the weight before it is "
                                                  "multiplied, and the observer cannot follow that op")


def _always() -> bool:
    return True


def _gathered(name: str, args: tuple, kwargs: dict, alias: Alias) -> Alias:
    """The alias of ``W[ids]`` / ``index_select(W, 0, ids)``: its dim 0 gathers W's dim 0 at ``ids``."""
    if name == "index_select":
        dim, index = (args[1] if len(args) > 1 else kwargs["dim"]), (args[2] if len(args) > 2 else kwargs["index"])
        rest_ok = dim in (0, -len(args[0].shape))
    else:
        index = args[1]
        rest = ()
        if isinstance(index, tuple):
            index, rest = (index[0] if index else None), index[1:]
        rest_ok = all(r == slice(None) or r is Ellipsis for r in rest)
    if isinstance(index, list):
        index = torch.tensor(index)
    ok = rest_ok and isinstance(index, torch.Tensor) and index.dim() == 1
    if ok and index.dtype == torch.bool:
        index = index.nonzero().reshape(-1)
    if not ok or index.is_floating_point() or not alias.dims:
        raise unattributable(alias, name, "it is indexed in a way other than picking whole experts (W[ids])")
    first = alias.dims[0]
    if isinstance(first, Gathered):
        first = Gathered(first.root_dim, first.ids.reshape(-1)[index.to(first.ids.device)])
    elif first is not None:
        first = Gathered(first, index)
    return Alias(alias.name, alias.root_shape, (first,) + tuple(alias.dims[1:]), alias.selected, alias.partial,
                 alias.problem)


def _tensor_args(args: tuple, kwargs: dict):
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            yield i, a
        elif isinstance(a, (list, tuple)):
            for j, b in enumerate(a):
                if isinstance(b, torch.Tensor):
                    yield (i, j), b
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            yield k, v


def _flat_tensors(out: Any):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for o in out:
            yield from _flat_tensors(o)


class _ReadMode(TorchFunctionMode):
    """The mode itself: everything is delegated to the observer (the mode is off while it runs)."""

    def __init__(self, observer: WeightInputObserver):
        super().__init__()
        self.observer = observer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.observer._dispatch(func, args, kwargs or {})
