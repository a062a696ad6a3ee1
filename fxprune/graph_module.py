"""The prepared model's class: a GraphModule that keeps the whole original hierarchy.

A plain ``fx.GraphModule`` keeps only the submodules and tensors its graph
references, and rebuilds itself from that subset on ``copy.deepcopy`` and on
unpickling. A prepared model must keep *everything* the original had (unused
modules, buffers, the Pruner, the original root needed by
:func:`fxprune.convert`), so this subclass adopts the full hierarchy on every
construction path: first build, deepcopy, and unpickling.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx import graph_module as _gm
from torch.package import sys_importer

__all__ = ["PreparedGraphModule", "OriginalRoot", "call_original", "call_original_graph"]


class OriginalRoot:
    """Holds the original model's root object without registering it as a submodule.

    The prepared model shares every submodule and tensor with it; keeping the
    root lets :func:`fxprune.convert` hand back an instance of the user's own
    class, with its own ``forward``.
    """

    def __init__(self, module: nn.Module):
        self.module = module


def call_original(root: OriginalRoot, args: tuple, kwargs: dict) -> Any:
    """Run the original ``forward``; the graph of a model whose own forward cannot be traced."""
    return root.module(*args, **kwargs)


def call_original_graph() -> fx.Graph:
    """``forward(*args, **kwargs)`` that runs the original model (masked at module level)."""
    g = fx.Graph()
    args = g.placeholder("*args")
    kwargs = g.placeholder("**kwargs")
    root = g.get_attr("_fxprune_original")
    g.output(g.call_function(call_original, (root, args, kwargs)))
    return g


class PreparedGraphModule(fx.GraphModule):
    """A GraphModule whose module tree is the original model's, masked parameters included."""

    def __init__(self, root: nn.Module | dict[str, Any], graph: fx.Graph, class_name: str = "GraphModule"):
        super().__init__(root, graph, class_name)
        if isinstance(root, nn.Module):
            adopt_hierarchy(self, root)

    def _deepcopy_init(self):
        return PreparedGraphModule.__init__

    def __reduce__(self) -> tuple[Any, ...]:
        body = self.__dict__.copy()
        python_code = self.recompile()
        import_block = _gm._format_import_block(python_code.globals, sys_importer)
        del body["_graph"]
        # Re-tracing the generated code needs only a plain Tracer, not the one that built the graph.
        body.pop("_tracer_cls", None)
        body.pop("_tracer_extras", None)
        if any(n.op == "placeholder" and n.target.startswith("*") for n in self.graph.nodes):
            # The generated code of the varargs call graph cannot be re-traced; rebuild it directly.
            return (_rebuild_call_graph, (body,))
        return (_rebuild, (body, import_block))


def _rebuild(body: dict[str, Any], import_block: str) -> PreparedGraphModule:
    forward = _gm._forward_from_src(import_block + body["_code"], {})
    return _gm._deserialize_graph_module(forward, body, graph_module_cls=PreparedGraphModule)


def _rebuild_call_graph(body: dict[str, Any]) -> PreparedGraphModule:
    return PreparedGraphModule(_gm._CodeOnlyModule(body), call_original_graph(), body.get("_graphmodule_cls_name", "GraphModule"))


def adopt_hierarchy(gm: nn.Module, root: nn.Module) -> None:
    """Make ``gm`` hold the very same children, parameters, buffers and attributes as ``root``."""
    for name, child in root._modules.items():
        _drop(gm, name)
        gm._modules[name] = child
    for name, p in root._parameters.items():
        _drop(gm, name)
        gm._parameters[name] = p
    for name, b in root._buffers.items():
        _drop(gm, name)
        gm._buffers[name] = b
    gm._non_persistent_buffers_set |= set(root._non_persistent_buffers_set)
    registered = gm._modules.keys() | gm._parameters.keys() | gm._buffers.keys()
    for name, value in root.__dict__.items():
        # a plain attribute must not shadow a registered tensor (e.g. a traced tensor constant)
        if name not in gm.__dict__ and name not in registered:
            gm.__dict__[name] = value


def _drop(gm: nn.Module, name: str) -> None:
    gm._modules.pop(name, None)
    gm._parameters.pop(name, None)
    gm._buffers.pop(name, None)
    gm.__dict__.pop(name, None)
