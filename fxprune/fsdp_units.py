"""Give each ``fully_shard`` unit that the traced graph inlines a forward of its own.

fx traces through user blocks: the prepared model's ``forward`` reads
``self.blocks[0].fc1.weight()`` and computes the block's ops itself, and the
block's ``forward`` never runs. FSDP2 gathers a unit's shards in that
unit's forward pre-hook and frees them in its post-hook, so a unit whose
forward never runs is never gathered. This pass moves the nodes of each such
unit (known from the tracer's ``nn_module_stack``) into a graph of their own,
installed as the unit's instance-level ``forward``, and calls the unit where
they were. Before (``blocks.0`` sharded)::

    def forward(self, x):
        blocks_0_fc_weight_1 = getattr(self.blocks, "0").fc.weight()
        blocks_0_fc_bias = getattr(self.blocks, "0").fc.bias
        linear = torch._C._nn.linear(x, blocks_0_fc_weight_1, blocks_0_fc_bias)
        relu = torch.relu(linear)
        ...

After::

    def forward(self, x):
        _0 = getattr(self.blocks, "0")(x)        # FSDP's hooks run here
        getitem = _0[0]
        ...

    # blocks.0's forward (run with the block as ``self``):
    def forward(self, x):
        fc_weight_1 = self.fc.weight()
        fc_bias = self.fc.bias
        linear = torch._C._nn.linear(x, fc_weight_1, fc_bias)
        relu = torch.relu(linear)
        return (relu,)

Units nested in units are outlined recursively. A unit whose nodes do not
form one contiguous run (a block called twice) cannot be given one forward:
that is a :class:`~fxprune.errors.PruningError` naming it.
:func:`fxprune.graph_module.remove_captured_forwards` (used by ``convert``)
removes these forwards like the per-submodule captures.
"""
from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx import graph_module as _gm
from torch.package import sys_importer

from fxprune.errors import PruningError
from fxprune.graph_module import CapturedForward

__all__ = ["OutlinedForward", "call_inlined_units"]


class OutlinedForward(CapturedForward):
    """A unit's forward made of the nodes the parent's graph inlined; called with exactly their inputs."""

    def __init__(self, module: nn.Module, graph: fx.Graph):  # noqa: D107 - no spec: the parent calls it
        self.module = module
        self.output_type = None
        self.spec = None
        self.fallback = None
        self.constants: list[str] = []
        self.missed = 0
        python_code = graph.python_code(root_module="self")
        self.code = _gm._format_import_block(python_code.globals, sys_importer) + python_code.src
        self._compile()

    def __call__(self, *args: Any) -> Any:
        return self._fn(self.module, *args)

    def __repr__(self) -> str:
        return f"OutlinedForward({type(self.module).__name__})"


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path.startswith(prefix + ".")


def _unit_of(node: fx.Node, prefix: str, units: set[str]) -> str | None:
    """The outermost unit strictly below ``prefix`` whose forward produced ``node`` (None: the parent's)."""
    if node.op in ("placeholder", "output"):
        return None
    full = None
    if node.op in ("get_attr", "call_module"):
        full = node.target if prefix == "" else f"{prefix}.{node.target}"
    stack = node.meta.get("nn_module_stack") or {}
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        if path in units and path != prefix and _under(path, prefix):
            if full is not None and not full.startswith(path + "."):
                return None  # reads something outside the unit: the parent passes it in
            return path
    if full is not None:  # no stack recorded (a node fxprune inserted): go by what it reads
        inside = [u for u in units if u != prefix and _under(u, prefix) and full.startswith(u + ".")]
        return min(inside, key=len) if inside else None
    return None


def _outline(graph: fx.Graph, prefix: str, units: set[str], root: nn.Module) -> bool:
    """Outline every unit directly below ``prefix`` in ``graph`` (targets relative to ``prefix``)."""
    runs: list[tuple[str, list[fx.Node]]] = []
    for node in graph.nodes:
        unit = _unit_of(node, prefix, units)
        if unit is None:
            continue
        if runs and runs[-1][0] == unit and _contiguous(runs[-1][1][-1], node):
            runs[-1][1].append(node)
        else:
            runs.append((unit, [node]))
    seen: set[str] = set()
    for unit, _ in runs:
        if unit in seen:
            raise PruningError(
                f"fully_shard unit {unit!r} runs in more than one place of the prepared model's traced forward "
                "(a module called twice, or interleaved with its parent's code), so it cannot be given one forward "
                f"for FSDP's hooks; prepare the model with leaf_modules=[{unit!r}] to keep its Python forward"
            )
        seen.add(unit)
    for unit, nodes in runs:
        _outline_run(graph, prefix, unit, nodes, units, root)
    return bool(runs)


def _contiguous(last: fx.Node, node: fx.Node) -> bool:
    # Nodes between two nodes of a unit may only be attribute reads (no inputs: the parent evaluates them
    # before calling the unit and passes them in).
    cur = last.next
    while cur is not node:
        if cur.op != "get_attr":
            return False
        cur = cur.next
    return True


def _outline_run(graph: fx.Graph, prefix: str, unit: str, nodes: list[fx.Node], units: set[str], root: nn.Module) -> None:
    inside = set(nodes)
    inputs: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    rel = unit if prefix == "" else unit[len(prefix) + 1:]
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {a: sub.placeholder(a.name) for a in inputs}
    for n in nodes:
        new = sub.node_copy(n, lambda x: env[x])
        if n.op in ("get_attr", "call_module"):
            new.target = n.target[len(rel) + 1:]
        env[n] = new
    sub.output(tuple(env[o] for o in outputs))
    _outline(sub, unit, units, root)
    sub.lint()
    module = root.get_submodule(unit)
    module.__dict__["forward"] = OutlinedForward(module, sub)
    with graph.inserting_after(nodes[-1]):
        call = graph.call_module(rel, tuple(inputs))
    anchor = call
    for i, o in enumerate(outputs):
        with graph.inserting_after(anchor):
            anchor = graph.call_function(operator.getitem, (call, i))
        o.replace_all_uses_with(anchor, delete_user_cb=lambda user: user not in inside)
    for n in reversed(nodes):
        graph.erase_node(n)


def call_inlined_units(prepared: fx.GraphModule, unit_paths: list[str]) -> bool:
    """Outline the units among ``unit_paths`` that the prepared model's graph inlines; True if any was.

    Units the graph already calls as modules (leaves, children captured on
    their own) are left as they are.
    """
    units = set(unit_paths)
    if not units or not _outline(prepared.graph, "", units, prepared):
        return False
    prepared.graph.lint()
    # recompile() puts its call wrapper on the model's class, which fully_shard replaced by a subclass of
    # the GraphModule's: a second wrapper there would call the first one forever. Keep only the forward.
    cls = type(prepared)
    before = {name for name in ("__call__", "_wrapped_call") if name in vars(cls)}
    prepared.recompile()
    for name in ("__call__", "_wrapped_call"):
        if name not in before and name in vars(cls):
            delattr(cls, name)
    return True
