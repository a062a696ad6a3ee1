"""A graph of one example run, for the channel analysis of models fx cannot trace whole.

Hugging Face models keep their root forward in Python (caches, mask
builders, ``**kwargs`` decorators): ``prepare`` captures each layer on its
own, and a residual stream that crosses from one layer to the next through
that Python code is invisible to a per-layer analysis. So, for the analysis
only, the example run is *recorded*: every torch function and tensor method
called outside the chosen leaf modules becomes a ``call_function`` /
``call_method`` node, every call of a leaf module a ``call_module`` node,
parameters and buffers read directly ``get_attr`` nodes and the example's
tensors placeholders -- an ``fx.Graph`` in the shape the analysis already
reads (:class:`~fxprune.structured.dependency._Analysis`). Tensors are
followed by identity; a tensor the run did not produce through a recorded
call (a cache's contents, say) is a placeholder too, so a channel that meets
it is blocked like one that meets a model input.

The graph describes the code path of this one run: Python branches taken on
shapes or values are specialised to the example, which is why
``convert(physical=True)`` checks the shrunk model against the masked one
on the same example (:mod:`fxprune.structured.verify`). The graph is never
compiled or run.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from fxprune.structured.inlined import fold_inlined_layers
from fxprune.trace import leaving_no_trace, output_tensors

__all__ = ["record_graph"]

# Tensor dunders as the operator functions the analysis knows; reflected ones swap their operands.
_OPERATORS: dict[str, tuple[Callable, bool]] = {
    "__add__": (operator.add, False), "__radd__": (operator.add, True), "__iadd__": (operator.iadd, False),
    "__mul__": (operator.mul, False), "__rmul__": (operator.mul, True), "__imul__": (operator.imul, False),
    "__sub__": (operator.sub, False), "__rsub__": (operator.sub, True),
    "__truediv__": (operator.truediv, False), "__rtruediv__": (operator.truediv, True),
    "__matmul__": (operator.matmul, False), "__rmatmul__": (operator.matmul, True),
    "__neg__": (operator.neg, False), "__getitem__": (operator.getitem, False),
}


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: fx.Graph, names: dict[int, str]):
        super().__init__()
        self.graph = graph
        self.names = names  # id(parameter or buffer) -> its dotted name
        self.nodes: dict[int, fx.Node] = {}
        self.alive: list[torch.Tensor] = []  # keeps ids unique while recording
        self.depth = 0  # > 0 inside a leaf module: its internals are not recorded
        self.unknown = 0

    # -- values
    def node_of(self, t: torch.Tensor) -> fx.Node:
        node = self.nodes.get(id(t))
        if node is not None:
            return node
        name = self.names.get(id(t))
        if name is not None:
            node = self.graph.get_attr(name)
        else:  # produced where the recording could not see: its channels are unknown
            node = self.graph.placeholder(f"untracked_{self.unknown}")
            self.unknown += 1
        self.bind(t, node)
        return node

    def bind(self, t: torch.Tensor, node: fx.Node) -> None:
        node.meta["ndim"] = t.dim()  # the analysis reads ranks it cannot infer (an embedding's output)
        self.nodes[id(t)] = node
        self.alive.append(t)

    def arg(self, v: Any) -> Any:
        def one(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return self.node_of(x)
            if x is None or isinstance(x, (bool, int, float, str, slice, type(Ellipsis), torch.dtype, torch.device,
                                           torch.Size)):
                return x
            return None  # objects the analysis does not read (a cache, a config)
        return pytree.tree_map(one, v)

    def bind_outputs(self, out: Any, node: fx.Node) -> None:
        if isinstance(out, torch.Tensor):
            self.bind(out, node)
        elif isinstance(out, (tuple, list)):
            for i, item in enumerate(out):
                if isinstance(item, (torch.Tensor, tuple, list)):
                    self.bind_outputs(item, self.graph.call_function(operator.getitem, (node, i)))

    # -- calls
    def __torch_function__(self, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth:
            return out
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__"):  # attribute access: only a tensor-valued one (``.T``) is an op
            if not isinstance(out, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
                return out
            src = args[0]
            if (src.dim() == 2 and out.dim() == 2 and out.shape == src.shape[::-1] and out.stride() == src.stride()[::-1]
                    and out.data_ptr() == src.data_ptr()):
                method = "t"  # ``.T`` / ``.mT`` of a matrix: what inlined layers compute with (``inlined``)
            else:
                method = getattr(func, "__qualname__", "attribute").split(".")[0]
            node = self.graph.call_method(method, (self.arg(src),))
            self.bind(out, node)
            return out
        if name == "__setitem__":  # x[i] = v: x is now the result of an op the analysis does not follow
            node = self.graph.call_function(operator.setitem, self.arg(tuple(args)))
            self.bind(args[0], node)
            return out
        if not any(isinstance(a, torch.Tensor) for a in pytree.tree_leaves((args, kwargs))) and not isinstance(
                out, torch.Tensor):
            return out
        mapped_args, mapped_kwargs = self.arg(tuple(args)), self.arg(dict(kwargs))
        if name in _OPERATORS:
            fn, swap = _OPERATORS[name]
            if swap:
                mapped_args = (mapped_args[1], mapped_args[0], *mapped_args[2:])
            node = self.graph.call_function(fn, mapped_args, mapped_kwargs)
        elif getattr(torch.Tensor, name, None) is func or (name.startswith("__") and hasattr(torch.Tensor, name)):
            node = self.graph.call_method(name, mapped_args, mapped_kwargs)
        else:
            node = self.graph.call_function(func, mapped_args, mapped_kwargs)
        if name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor):
            self.bind(args[0], node)  # in place: the tensor is now this node's result
        self.bind_outputs(out, node)
        return out

    def enter_leaf(self, module: nn.Module, name: str, args: tuple, kwargs: dict) -> None:
        if self.depth == 0:
            self._pending = (name, self.arg(tuple(args)), self.arg(dict(kwargs)))
        self.depth += 1

    def exit_leaf(self, out: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            name, args, kwargs = self._pending
            self.bind_outputs(out, self.graph.call_module(name, args, kwargs))


def record_graph(model: nn.Module, example: tuple[tuple, dict], is_leaf: Callable[[nn.Module, str], bool]) -> fx.Graph:
    """Run ``model`` once on ``example`` (eval, no grad, buffers and RNG left as they were) and record it.

    ``is_leaf(module, name)`` chooses the modules kept whole as ``call_module``
    nodes (the analysis' leaves: standard layers, proven attention and norms).
    """
    from fxprune.masked import MaskedParameter  # noqa: PLC0415 - avoid an import cycle

    graph = fx.Graph()
    names: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, MaskedParameter):
            names.setdefault(id(m.param), name)
        for attr, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None:
                names.setdefault(id(t), f"{name}.{attr}" if name else attr)
    rec = _Recorder(graph, names)
    args, kwargs = example
    flat, _ = pytree.tree_flatten((args, kwargs))
    for i, t in enumerate(flat):
        if isinstance(t, torch.Tensor) and id(t) not in rec.nodes:
            rec.bind(t, graph.placeholder(f"input_{i}"))
    handles = []
    for name, m in model.named_modules():
        if name and is_leaf(m, name):
            handles.append(m.register_forward_pre_hook(
                lambda mod, a, kw, _n=name: rec.enter_leaf(mod, _n, a, kw), with_kwargs=True))
            handles.append(m.register_forward_hook(lambda mod, a, out: rec.exit_leaf(out), always_call=True))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), leaving_no_trace(model), rec:
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    graph.output(tuple(rec.nodes[id(t)] for t in output_tensors(out) if id(t) in rec.nodes))
    fold_inlined_layers(graph, model, is_leaf)
    return graph
