"""Layers that ``prepare`` inlined, put back as layers in a recorded graph.

Why: where ``prepare`` captures a block on its own (a Hugging Face MLP whose
root stays Python), it traces *through* the block's layers so that it can mask
their weights, and a layer that is not a plain ``nn.Linear`` comes out as its
arithmetic: GPT-2's ``Conv1D`` as ``size`` reads, a ``view`` to 2-D, ``addmm``
and a ``view`` back; Falcon's ``FalconLinear`` as ``x @ W.T`` (``+ b``). A
recording of such a run (:mod:`fxprune.structured.record`) sees that
arithmetic, and the channel analysis, which follows layers, not matrix
algebra, would block the channels at the ``size`` reads and leave the MLP
dense. These patterns are exactly what the layers' own ``forward`` computes,
so each is replaced by one ``call_module`` of the layer -- the node the
analysis reads for the same layer everywhere else -- and the nodes only the
pattern used are removed. Anything that does not match exactly is left as
recorded (and then blocked or reported as before).
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

__all__ = ["fold_inlined_layers"]

_MATMULS = {operator.matmul, torch.matmul}


def _weight_layer(node: object, model: nn.Module, is_leaf: Callable[[nn.Module, str], bool]) -> tuple[str, nn.Module] | None:
    """``(layer name, layer)`` when ``node`` is the masked weight of a leaf layer: ``call_module <layer>.weight``."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or not str(node.target).endswith(".weight"):
        return None
    name = str(node.target)[: -len(".weight")]
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        return None
    return (name, layer) if is_leaf(layer, name) else None


def _is_bias(node: object, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and node.target == f"{name}.bias"


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_transpose(node: object) -> bool:
    """The recorder writes ``W.T`` of a 2-D weight as ``t`` (see ``record._Recorder``)."""
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == "t"


def _replace(last: fx.Node, name: str, x: fx.Node, used: list[fx.Node], erased: set[fx.Node]) -> None:
    """Put ``call_module name (x,)`` in place of ``last`` and remove the pattern's nodes no one else reads."""
    graph = last.graph
    with graph.inserting_before(last):
        layer = graph.call_module(name, (x,))
    layer.meta.update(last.meta)
    last.replace_all_uses_with(layer)
    for node in [last, *used]:  # from the end of the pattern back to its start
        if node not in erased and not node.users:
            graph.erase_node(node)
            erased.add(node)


def _size_reads(x: fx.Node, before: fx.Node) -> list[fx.Node]:
    """The ``size`` calls on ``x`` recorded just before ``before`` (Conv1D reads its input's shape twice)."""
    out = []
    node = before.prev
    while node.op == "call_method" and node.target == "size" and node.args and node.args[0] is x and not node.users:
        out.append(node)
        node = node.prev
    return out


def _weight_reads(reads: dict[str, list[fx.Node]], name: str) -> list[fx.Node]:
    """Nodes that only inspect the weight inside the masked-weight module (``get_attr``, its ``dim``).

    ``reads`` maps a ``get_attr`` target to its nodes (built once per graph).
    """
    out = []
    for node in reads.get(f"{name}.weight", []):
        readers = list(node.users)
        if all(r.op == "call_method" and r.target == "dim" and not r.users for r in readers):
            out.extend(readers + [node])
    return out


def _fold_conv1d(addmm: fx.Node, model: nn.Module, is_leaf, reads: dict[str, list[fx.Node]],
                 erased: set[fx.Node]) -> bool:
    """``view(addmm(bias, view(x, -1, in), W), out_shape)`` of a GPT-2 ``Conv1D`` -> ``call_module``."""
    if len(addmm.args) != 3 or addmm.kwargs:
        return False
    bias, flat, weight = addmm.args
    found = _weight_layer(weight, model, is_leaf)
    if found is None or type(found[1]).__name__ != "Conv1D" or not _is_bias(bias, found[0]):
        return False
    if not (isinstance(flat, fx.Node) and flat.op == "call_method" and flat.target in ("view", "reshape")
            and isinstance(flat.args[0], fx.Node) and flat.meta.get("ndim") == 2 and len(flat.users) == 1):
        return False
    back = _only_user(addmm)
    x = flat.args[0]
    if back is None or back.op != "call_method" or back.target not in ("view", "reshape") or back.args[0] is not addmm:
        return False
    if back.meta.get("ndim") != x.meta.get("ndim"):
        return False
    _replace(back, found[0], x, [addmm, flat, *_size_reads(x, flat), weight, bias, *_weight_reads(reads, found[0])], erased)
    return True


def _fold_linear(matmul: fx.Node, model: nn.Module, is_leaf, reads: dict[str, list[fx.Node]],
                 erased: set[fx.Node]) -> bool:
    """``x @ W.T`` (``+ bias``) of an ``nn.Linear`` subclass that computes ``F.linear`` -> ``call_module``."""
    if len(matmul.args) != 2 or matmul.kwargs or not isinstance(matmul.args[0], fx.Node):
        return False
    x, wt = matmul.args
    if not _is_transpose(wt):
        return False
    weight = wt.args[0]
    found = _weight_layer(weight, model, is_leaf)
    if found is None or not isinstance(found[1], nn.Linear) or len(wt.users) != 1:
        return False
    name, layer = found
    last, used = matmul, [wt, weight]
    if layer.bias is not None:
        add = _only_user(matmul)
        if add is None or add.target not in (operator.add, "add") or len(add.args) != 2 or add.kwargs:
            return False
        if add.args[0] is not matmul or not _is_bias(add.args[1], name):
            return False
        last, used = add, [matmul, add.args[1], wt, weight]
    _replace(last, name, x, [*used, *_weight_reads(reads, name)], erased)
    return True


def fold_inlined_layers(graph: fx.Graph, model: nn.Module, is_leaf: Callable[[nn.Module, str], bool]) -> int:
    """Replace each inlined ``Conv1D`` / linear-layer pattern of ``graph`` by a call of the layer; returns how many."""
    folded, erased = 0, set()
    reads: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            reads.setdefault(str(node.target), []).append(node)
    for node in list(graph.nodes):
        if node in erased:
            continue
        if node.op == "call_function" and node.target is torch.addmm:
            folded += _fold_conv1d(node, model, is_leaf, reads, erased)
        elif (node.op == "call_function" and node.target in _MATMULS) or (
                node.op == "call_method" and node.target == "matmul"):
            folded += _fold_linear(node, model, is_leaf, reads, erased)
    return folded
