"""The prepared model's class: a GraphModule that keeps the whole original hierarchy.

A plain ``fx.GraphModule`` keeps only the submodules and tensors its graph
references, and rebuilds itself from that subset on ``copy.deepcopy`` and on
unpickling. A prepared model must keep *everything* the original had (unused
modules, buffers, the Pruner, the original root needed by
:func:`fxprune.convert`), so this subclass adopts the full hierarchy on every
construction path: first build, deepcopy, and unpickling.
"""
from __future__ import annotations

import inspect
import sys
import warnings
from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx import graph_module as _gm
from torch.package import sys_importer

__all__ = ["PreparedGraphModule", "OriginalRoot", "call_original", "call_original_graph", "CapturedForward",
           "install_captured_forward", "remove_captured_forwards"]


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
        self._present_original_signature()

    def recompile(self):  # type: ignore[override]
        python_code = super().recompile()
        self._present_original_signature()
        return python_code

    def _present_original_signature(self) -> None:
        """Make ``inspect.signature(self.forward)`` the original model's.

        The generated ``forward`` is ``(*args, **kwargs)`` when the root runs as
        Python, and a traced one names only its placeholders; but Trainer's
        ``remove_unused_columns``, Lightning and accelerate read the model's
        signature to decide which inputs to pass. The class is this instance's
        own (``GraphModule`` makes one per instance), so each recompile sets it
        again on the new function.
        """
        original = self.__dict__.get("_fxprune_original")
        forward = type(self).__dict__.get("forward")
        if original is None or forward is None:
            return
        try:
            signature = inspect.signature(original.module.forward)
        except (TypeError, ValueError):  # a forward without a readable signature: keep the generated one
            return
        forward.__signature__ = _unbound(signature)

    def train(self, mode: bool = True) -> "PreparedGraphModule":
        # The original root is not a child (its children are ours), but a graph that calls its
        # forward (an untraceable root) must see the same mode.
        super().train(mode)
        original = self.__dict__.get("_fxprune_original")
        if original is not None:
            original.module.training = mode
        return self

    def _call_impl(self, *args: Any, **kwargs: Any) -> Any:
        # fully_shard (FSDP2) changes the model's class: the first call after it lets the masks follow the
        # sharding before any hook of FSDP runs and before the forward is looked up (fxprune.fsdp).
        if id(type(self)) != self.__dict__.get("_fxprune_seen_class"):  # an id: the class may not pickle
            self.__dict__["_fxprune_seen_class"] = id(type(self))
            if "torch.distributed.fsdp" in sys.modules:
                from torch.distributed.fsdp import FSDPModule

                if isinstance(self, FSDPModule):
                    from fxprune.fsdp import adopt_fully_shard

                    adopt_fully_shard(self)
        return super()._call_impl(*args, **kwargs)

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


def _unbound(signature: inspect.Signature) -> inspect.Signature:
    """The bound method's signature with a leading positional-only ``self``, for the class's function."""
    names = set(signature.parameters)
    name = next(n for n in ("self", "_self", "__self") if n not in names)
    first = inspect.Parameter(name, inspect.Parameter.POSITIONAL_ONLY)
    return signature.replace(parameters=[first, *signature.parameters.values()])


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


class CapturedForward:
    """The instance-level ``forward`` of a submodule captured on its own (per-submodule fallback).

    The parent's forward stays Python and calls ``self.child(...)``; Python
    finds this object in the child's instance ``__dict__`` before the class's
    ``forward``, so the child runs its graph while keeping its class, its
    methods and its hooks. The generated code is run with the child itself as
    ``self``, so it always reads the child's current submodules and tensors
    (after ``.to()``, ``load_state_dict``, deepcopy). The graph is specialized
    to the call seen in the example run (see :class:`fxprune.trace.CallSpec`);
    a call that does not fit runs the class's own ``forward`` instead, with the
    child's weights masked at module level by ``fallback`` (a
    :class:`fxprune.rewrite.LeafMasks`), and warns once.

    Only the source code is pickled and deep-copied; the function is compiled
    again on load. :func:`remove_captured_forwards` undoes the installation.
    """

    def __init__(
        self, module: nn.Module, graph: fx.Graph, spec: Any, fallback: Any, constants: list[str], output_type: type | None
    ):
        self.module = module
        self.output_type = output_type  # fx returns a ModelOutput as a plain dict; give the caller its type back
        self.spec = spec
        self.fallback = fallback
        self.constants = constants  # non-persistent buffers holding the graph's tensor constants
        python_code = graph.python_code(root_module="self")
        self.code = _gm._format_import_block(python_code.globals, sys_importer) + python_code.src
        self.missed = 0  # calls that did not fit the spec
        self._compile()

    def _compile(self) -> None:
        self._fn = _gm._forward_from_src(self.code, {})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = self.spec.match(self.module, args, kwargs)
        if tensors is not None:
            out = self._fn(self.module, *tensors)
            return out if self.output_type is None else self.output_type(**out)
        if not self.missed:
            warnings.warn(
                f"fxprune: {type(self.module).__name__} was captured for calls like the example run's, and this "
                f"call differs: {self.spec.difference(args, kwargs)}. It runs its Python forward instead, still "
                "masked (at module level; slower, same result). To avoid it, pass prepare(..., example_inputs=...) "
                "called the way training calls the model (the same keyword arguments, e.g. attention_mask and "
                "labels as your Trainer/collator sends them)",
                stacklevel=2,
            )
        self.missed += 1
        self.fallback.enter(self.module, args)
        try:
            return type(self.module).forward(self.module, *args, **kwargs)
        finally:
            self.fallback.exit(self.module, args, None)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_fn"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._compile()

    def __repr__(self) -> str:
        return f"CapturedForward({type(self.module).__name__}, {len(self.spec.tensor_names())} tensor input(s))"


def install_captured_forward(module: nn.Module, forward: CapturedForward, constants: dict[str, Any]) -> None:
    """Make ``forward`` the module's forward; its tensor constants become non-persistent buffers."""
    for name, value in constants.items():
        module.register_buffer(name, value, persistent=False)
    module.__dict__["forward"] = forward


def remove_captured_forwards(model: nn.Module) -> None:
    """Give every module of ``model`` its class's ``forward`` back and drop the graphs' constants."""
    for m in model.modules():
        captured = m.__dict__.get("forward")
        if isinstance(captured, CapturedForward):
            del m.__dict__["forward"]
            for name in captured.constants:
                m._buffers.pop(name, None)
                m._non_persistent_buffers_set.discard(name)
