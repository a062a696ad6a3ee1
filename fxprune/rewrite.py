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

from fxprune.masked import MaskedParameter
from fxprune.plan import PruningPlan

__all__ = ["InstalledTarget", "install_masks", "LeafMasks", "restore_parameters", "remove_leaf_hooks"]


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

    def enter(self, module: nn.Module, args: tuple) -> None:
        for owner, attr, masked in self.entries:
            owner.__dict__[attr] = masked()
        self._sync_rnns()

    def exit(self, module: nn.Module, args: tuple, output: object) -> None:
        for owner, attr, _ in self.entries:
            owner.__dict__.pop(attr, None)
        self._sync_rnns()

    def _sync_rnns(self) -> None:
        # RNNs read a cached list of their weights rather than the attributes.
        for owner in {id(o): o for o, _, _ in self.entries}.values():
            if isinstance(owner, nn.RNNBase):
                owner._flat_weights = [_tensor_of(owner, n) for n in owner._flat_weights_names]


def _tensor_of(owner: nn.Module, attr: str):
    if attr in owner.__dict__:
        return owner.__dict__[attr]
    value = getattr(owner, attr, None)
    return value.param if isinstance(value, MaskedParameter) else value


def install_masks(gm: fx.GraphModule, root: nn.Module, plan: PruningPlan, graph: bool) -> list[InstalledTarget]:
    """Move every planned parameter into a MaskedParameter and rewire its readers.

    ``gm`` and ``root`` share all submodules; root-level parameters are
    attached to both. ``graph`` is False when the graph is a single call of
    ``root`` (untraceable forward): then ``root`` is the one leaf.
    """
    # 1. Which get_attr nodes read which target (resolved before anything moves).
    params = [root.get_parameter(t.name) for t in plan.targets]
    targets = [
        InstalledTarget(name=t.name, pruner=t.pruner, masked=MaskedParameter(p), owners=[])
        for t, p in zip(plan.targets, params)
    ]
    by_param = {id(p): it for p, it in zip(params, targets)}
    readers: list[tuple[fx.Node, InstalledTarget]] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = _resolve(gm, node.target)
            if obj is not None and id(obj) in by_param:
                readers.append((node, by_param[id(obj)]))

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
    g = gm.graph
    for node, it in readers:
        with g.inserting_before(node):
            call = g.call_module(it.name, ())
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        g.erase_node(node)
        it.route = "graph"

    # 4. Leaves that read pruned parameters themselves get LeafMasks hooks.
    owned: dict[int, list[tuple[nn.Module, str, MaskedParameter, InstalledTarget]]] = {}
    for it in targets:
        for owner, attr in it.owners:
            owned.setdefault(id(owner), []).append((owner, attr, it.masked, it))
    leaves: dict[int, nn.Module] = {}
    if graph:
        for node in g.nodes:
            if node.op == "call_module":
                m = gm.get_submodule(node.target)
                if not isinstance(m, MaskedParameter):
                    leaves[id(m)] = m
    else:
        leaves[id(root)] = root
    for leaf in leaves.values():
        entries = [e for sub in leaf.modules() for e in owned.get(id(sub), [])]
        if not entries:
            continue
        hooks = LeafMasks([(o, a, m) for o, a, m, _ in entries])
        leaf.register_forward_pre_hook(hooks.enter)
        leaf.register_forward_hook(hooks.exit, always_call=True)
        for *_, it in entries:
            it.route = "graph+module" if it.route.startswith("graph") else "module"
    g.lint()
    gm.recompile()
    return targets


def restore_parameters(targets: list[InstalledTarget]) -> None:
    """Fold masks into plain parameters at every owner (the inverse of :func:`install_masks`)."""
    original_order: dict[int, tuple[nn.Module, list[str]]] = {}
    for it in targets:
        folded = nn.Parameter(it.masked.folded(), requires_grad=it.masked.param.requires_grad)
        for (owner, attr), order in zip(it.owners, it.orders):
            owner.__dict__.pop(attr, None)
            owner._modules.pop(attr, None)
            owner._parameters[attr] = folded
            original_order.setdefault(id(owner), (owner, order))  # first record: taken before any move
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
