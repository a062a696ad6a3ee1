"""Parameter nodes -> masked-parameter modules.

Before (``nn.Linear`` traced through)::

    def forward(self, x):
        fc_weight = self.fc.weight
        fc_bias = self.fc.bias
        linear = torch._C._nn.linear(x, fc_weight, fc_bias)

After::

    def forward(self, x):
        fc_weight = self.fc.weight()          # MaskedParameter: param * mask
        fc_bias = self.fc.bias
        linear = torch._C._nn.linear(x, fc_weight, fc_bias)

The parameter moves into a :class:`~fxprune.masked.MaskedParameter` that
takes its place under the same name (``fc.weight`` -> ``fc.weight.param`` and
``fc.weight.mask`` in the ``state_dict``); tied parameters share one. A leaf
module whose forward reads pruned parameters itself (a fallback leaf,
``nn.MultiheadAttention``, an RNN) gets a pair of forward hooks that show it the
masked tensors for the duration of its call: the module-level route.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from fxprune.graph_module import CapturedForward, install_captured_forward
from fxprune.masked import MaskedParameter
from fxprune.plan import PruningPlan
from fxprune.trace import Capture, CaptureResult

__all__ = ["InstalledTarget", "install_masks", "LeafMasks", "original_parameter_order", "restore_parameters", "remove_leaf_hooks"]


@dataclass
class InstalledTarget:
    """One pruned parameter in the prepared model: its masked module and where it was attached."""

    name: str
    pruner: str
    masked: MaskedParameter
    owners: list[tuple[nn.Module, str]]  # every (module, attribute) that held the parameter
    route: str = "unused"  # 'graph', 'module', 'graph+module' or 'unused' (not read by forward)
    # per owner, its parameter names in their original order (restored by convert, so state_dict keys keep it)
    orders: list[list[str]] = field(default_factory=list)


class LeafMasks:
    """Forward hooks of a leaf module: masked weights are visible only while it runs.

    The pre-hook puts ``param * mask`` in the owner's instance ``__dict__``
    (which attribute lookup consults before ``nn.Module.__getattr__``); the
    post-hook, registered with ``always_call=True``, removes it even if the
    forward raised.
    """

    def __init__(self, entries: list[tuple[nn.Module, str, MaskedParameter]]):
        self.entries = entries
        # RNNs read a cached list of their weights rather than the attributes.
        self.rnns = [o for o in {id(o): o for o, _, _ in entries}.values() if isinstance(o, nn.RNNBase)]

    def enter(self, module: nn.Module, args: tuple) -> None:
        # Nested calls (a Python forward around a leaf that masks the same weights) set each weight
        # once: only the outermost enter sets it, and only its exit removes it.
        placed = []
        for owner, attr, masked in self.entries:
            if attr not in owner.__dict__:
                owner.__dict__[attr] = masked()
                placed.append((owner, attr))
        self.__dict__.setdefault("_placed", []).append(placed)
        self._sync_rnns()

    def exit(self, module: nn.Module, args: tuple, output: object) -> None:
        stack = self.__dict__.get("_placed")
        for owner, attr in stack.pop() if stack else []:
            owner.__dict__.pop(attr, None)
        self._sync_rnns()

    def _sync_rnns(self) -> None:
        for owner in self.rnns:
            owner._flat_weights = [_tensor_of(owner, n) for n in owner._flat_weights_names]


def _tensor_of(owner: nn.Module, attr: str):
    if attr in owner.__dict__:
        return owner.__dict__[attr]
    value = getattr(owner, attr, None)
    return value.param if isinstance(value, MaskedParameter) else value


def install_masks(gm: fx.GraphModule, root: nn.Module, plan: PruningPlan, capture: CaptureResult) -> list[InstalledTarget]:
    """Move every planned parameter into a MaskedParameter and rewire its readers.

    ``gm`` and ``root`` share all submodules; root-level parameters are
    attached to both. ``capture`` says which modules run a graph: the root's
    graph is ``gm``'s own (when the root forward is untraceable ``gm`` is a
    single call of ``root``); each captured child runs its graph as its
    instance-level forward (:class:`~fxprune.graph_module.CapturedForward`).

    Which weights get module-level hooks, and where: a graph's leaves mask
    every weight below them; a module whose forward stays Python (the root or
    a fallback leaf) masks the weights below it except those inside captured
    children, which mask their own. Weights a graph reads are never shown as
    plain tensors to a Python forward that is running around that graph.
    """
    graphs: list[tuple[nn.Module, fx.Graph, Capture]] = []
    if capture.root.graph is not None:
        graphs.append((gm, gm.graph, capture.root))
    graphs += [(c.module, c.graph, c) for c in capture.subgraphs()]

    # 1. Which get_attr nodes read which target (resolved before anything moves).
    params = [root.get_parameter(t.name) for t in plan.targets]
    targets = [
        InstalledTarget(name=t.name, pruner=t.pruner, masked=MaskedParameter(p), owners=[])
        for t, p in zip(plan.targets, params)
    ]
    for it in targets:  # the name mask selection uses in its errors and warnings
        it.masked._fxprune_name = it.name
    by_param = {id(p): it for p, it in zip(params, targets)}
    readers: list[tuple[int, fx.Node, InstalledTarget, tuple[int, str]]] = []
    for i, (base, g, _) in enumerate(graphs):
        for node in g.nodes:
            if node.op == "get_attr":
                obj = _resolve(base, node.target)
                if obj is not None and id(obj) in by_param:
                    prefix, _, attr = node.target.rpartition(".")
                    owner = base.get_submodule(prefix) if prefix else base
                    readers.append((i, node, by_param[id(obj)], (id(owner), attr)))

    # 2. Attach each MaskedParameter under every name of its parameter.
    for t, it in zip(plan.targets, targets):
        seen: set[tuple[int, str]] = set()
        for alias in t.aliases:
            prefix, _, attr = alias.rpartition(".")
            owners = [gm, root] if not prefix else [root.get_submodule(prefix)]
            for owner in owners:
                if (id(owner), attr) in seen:
                    continue
                seen.add((id(owner), attr))
                order = list(owner._parameters)
                del owner._parameters[attr]
                owner._modules[attr] = it.masked
                if owner is not gm:
                    it.owners.append((owner, attr))
                    it.orders.append(order)

    # 3. Graph readers call the MaskedParameter instead.
    read_by: list[set[tuple[int, str]]] = [set() for _ in graphs]
    for i, node, it, pair in readers:
        g = graphs[i][1]
        with g.inserting_before(node):
            call = g.call_module(node.target, ())
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        g.erase_node(node)
        it.route = "graph"
        read_by[i].add(pair)
    graph_read = set().union(*read_by)

    # 4. Module-level hooks (see the docstring for where).
    owned: dict[int, list[tuple[nn.Module, str, MaskedParameter, InstalledTarget]]] = {}
    for it in targets:
        for owner, attr in it.owners:
            owned.setdefault(id(owner), []).append((owner, attr, it.masked, it))
    own_graph = {id(c.module) for c in capture.subgraphs()}
    python = {id(c.module) for c in capture.python()}

    def entries_below(start: nn.Module, skip: set[tuple[int, str]]):
        return [e for m in _walk(start, own_graph) for e in owned.get(id(m), []) if (id(e[0]), e[1]) not in skip]

    hooked: dict[int, tuple[nn.Module, list]] = {}
    if capture.root.graph is None:
        hooked[id(root)] = (root, entries_below(root, graph_read))
    for base, g, _ in graphs:
        for node in g.nodes:
            if node.op == "call_module":
                m = base.get_submodule(node.target)
                if not isinstance(m, MaskedParameter) and id(m) not in hooked:
                    hooked[id(m)] = (m, entries_below(m, graph_read if id(m) in python else set()))
    # Each module below a hooked one masks the weights below it too, for calls made outside the hooked
    # module's call: activation checkpointing re-runs a submodule during backward (an
    # nn.MultiheadAttention reads out_proj.weight without calling out_proj, so owners alone are not enough).
    below: dict[int, tuple[nn.Module, list]] = {}
    for leaf, entries in hooked.values():
        shown = {(id(e[0]), e[1]) for e in entries}
        for m in _walk(leaf, own_graph):
            if m is leaf or id(m) in hooked:
                continue
            mine = below.setdefault(id(m), (m, []))[1]
            have = {(id(e[0]), e[1]) for e in mine}
            mine += [e for e in entries_below(m, set()) if (id(e[0]), e[1]) in shown - have]
    for leaf, entries in list(hooked.values()) + list(below.values()):
        if not entries:
            continue
        hooks = LeafMasks([(o, a, m) for o, a, m, _ in entries])
        leaf.register_forward_pre_hook(hooks.enter)
        leaf.register_forward_hook(hooks.exit, always_call=True)
        for *_, it in entries:
            it.route = "graph+module" if it.route.startswith("graph") else "module"

    # 5. Captured children run their graph as their forward.
    for i, (base, g, cap) in enumerate(graphs):
        g.lint()
        if base is gm:
            gm.recompile()
            continue
        others = graph_read - read_by[i]
        fallback = LeafMasks([(o, a, m) for o, a, m, _ in entries_below(base, others)])
        forward = CapturedForward(base, g, cap.spec, fallback, list(cap.constants), cap.output_type)
        install_captured_forward(base, forward, cap.constants)
    if capture.root.graph is None:
        gm.recompile()
    return targets


def _walk(start: nn.Module, stop: set[int]):
    """``start`` and the modules below it, not entering modules in ``stop`` (other than ``start``)."""
    seen = {id(start)}
    stack = [start]
    while stack:
        m = stack.pop()
        yield m
        for child in m._modules.values():
            if child is None or isinstance(child, MaskedParameter) or id(child) in seen or id(child) in stop:
                continue
            seen.add(id(child))
            stack.append(child)


def original_parameter_order(targets: list[InstalledTarget]) -> dict[int, tuple[nn.Module, list[str]]]:
    """``id(owner) -> (owner, its parameter names in their original order)`` for every owner of a target.

    The first record of an owner was taken before any of its parameters moved, so it is complete.
    """
    order: dict[int, tuple[nn.Module, list[str]]] = {}
    for it in targets:
        for (owner, _), names in zip(it.owners, it.orders):
            order.setdefault(id(owner), (owner, names))
    return order


def restore_parameters(targets: list[InstalledTarget]) -> None:
    """Fold masks into plain parameters at every owner (the inverse of :func:`install_masks`).

    In place: each owner gets the masked module's own parameter object back,
    its pruned entries zeroed, so no weight is copied.
    """
    original_order = original_parameter_order(targets)
    for it in targets:
        folded = it.masked.fold_into_parameter()
        for owner, attr in it.owners:
            owner.__dict__.pop(attr, None)
            owner._modules.pop(attr, None)
            owner._parameters[attr] = folded
    for owner, order in original_order.values():
        for name in order + [n for n in list(owner._parameters) if n not in order]:
            if name in owner._parameters:
                owner._parameters[name] = owner._parameters.pop(name)


def remove_leaf_hooks(model: nn.Module) -> None:
    """Drop every LeafMasks hook from ``model``'s modules."""
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), LeafMasks)]:
                del hooks[key]
                m._forward_hooks_always_called.pop(key, None)


def _resolve(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
