"""Channel dependencies over an fx graph: which channels must be removed together.

Vocabulary (after Torch-Pruning's, learned not copied):

* a **channel atom** is one channel of one activation in the graph (channel 5
  of the output of ``layer1.0.conv1``);
* a **dependency** says two atoms are the same channel (residual ``add``,
  BatchNorm, ReLU, depthwise conv, the ``x * se_scale`` of squeeze-excitation,
  a concatenation's input and output slices);
* a **channel** is a connected component of atoms (see :func:`connected_components`), and a **group**
  is a connected set of channels that share an activation -- all channels of
  the layer1 residual stream of a ResNet, say. The pruner's goal is met per
  group.
* a **slice** is where a channel lives in a tensor of the model: a row of
  the producing conv's weight and bias, an entry of the BatchNorm's weight,
  bias and running statistics, a column of every consuming conv or linear (a
  block of columns after ``flatten``), a layer-scale entry.

Why exact semantics need consumers: a zeroed output row of conv+BN is not a
zero channel (BN adds its shift, an SE gate multiplies a constant, padding
makes a constant map non-constant), so "the same output as the masked model"
cannot be had by folding constants. Instead the channel pattern masks every
*weight* slice of a pruned channel -- producer rows *and* consumer columns.
Then no consumer reads the channel, the masked model's output does not depend
on it, and physical removal is exact. The price is that every consumer must
be visible: a channel read by anything the analysis cannot follow (an op it
does not know, a leaf module, the model output, a reshape, a statistic over
channels that is not a proven norm) is not pruned, and the reason is reported.
Proven normalizations (:mod:`fxprune.structured.norms`) are the exception:
the prepared model computes them over the kept channels only.

Assumption stated once: convolution activations are batched, ``(N, C, ...)``.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxprune.structured.attention import AttentionSpec, attention_spec
from fxprune.structured.head_layout import is_conv1d, projection_rows
from fxprune.structured.norms import NormMemo, NormSpec

__all__ = ["Slice", "ChannelGroup", "ChannelGraph", "TRACED_TORCH_LAYERS", "build_channel_graph", "trace_for_channels"]

# Slice kinds: how a group's channels index a tensor.
OUT = "out"  # positions along ``dim`` (rows of a producer, BN entries, layer scale)
IN = "in"  # columns of a conv / linear weight (dim 1)
IN_BLOCK = "in_block"  # flatten -> linear: channel c is columns [c*s, (c+1)*s)
IN_GROUPED = "in_grouped"  # grouped conv: input p is column p % (C/g) of the rows of block p // (C/g)
OUT_BLOCK = "out_block"  # attention heads: channel c is rows [c*s, (c+1)*s) of a projection (or bias entries)


@dataclass
class Slice:
    """Where the channels of one group live in one model tensor (parameter or buffer).

    ``channels[i]`` (a channel id of the group) sits at ``positions[i]`` along
    ``dim`` of ``tensor``; for ``in_block`` / ``out_block`` each position is a
    block of ``block`` columns / rows, for ``in_grouped`` the tensor is a conv
    weight with ``groups`` groups.
    """

    tensor: str
    dim: int
    kind: str
    channels: torch.Tensor
    positions: torch.Tensor
    block: int = 1
    groups: int = 1
    is_weight: bool = False  # a conv/linear weight (must be pruned by the group's pruner)


@dataclass
class ChannelGroup:
    """Channels that are pruned under one goal, and every tensor slice they own."""

    index: int
    channels: list[int]  # channel ids (global)
    slices: list[Slice] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)  # why it cannot be removed exactly
    cells: list[list[int]] | None = None  # grouped convs: local channel indices, equal removal per cell
    ids: torch.Tensor | None = field(default=None, repr=False)  # ``channels`` as a tensor, built on first use

    @property
    def size(self) -> int:
        return len(self.channels)

    def id_tensor(self) -> torch.Tensor:
        """:attr:`channels` as a tensor (built once)."""
        if self.ids is None:
            self.ids = torch.tensor(self.channels, dtype=torch.long)
        return self.ids

    def local(self, channels: torch.Tensor) -> torch.Tensor:
        """Global channel ids -> indices into :attr:`channels` (which is sorted)."""
        return torch.searchsorted(self.id_tensor(), channels)

    def weights(self) -> list[str]:
        return sorted({s.tensor for s in self.slices if s.is_weight})

    def layers(self) -> list[str]:
        """Owners of the weight slices, for reports."""
        return sorted({s.tensor.rpartition(".")[0] for s in self.slices if s.is_weight})


@dataclass
class ChannelGraph:
    """The result of the analysis: the groups, and the layers whose attributes follow their shapes.

    The atom-level dependency pairs are not kept: they are only needed to
    find the components, and they would be copied with every prepared model.
    """

    groups: list[ChannelGroup]
    layer_attrs: dict[str, str]  # module name -> 'conv' | 'linear' | 'bn'
    attention: dict[str, AttentionSpec] = field(default_factory=dict)  # module name -> its heads' layout
    weight_notes: dict[str, str] = field(default_factory=dict)  # weight -> the op that read it and was not followed
    # normalization module -> its layout and the channel id at each of its positions (fxprune.structured.norms)
    norms: dict[str, tuple[NormSpec, torch.Tensor]] = field(default_factory=dict)

    def to_networkx(self) -> "networkx.Graph":  # noqa: F821 - imported lazily
        """The dependency graph between groups and the tensors they cut, as a ``networkx.Graph``.

        Nodes ``("group", i)`` carry ``size`` (channels) and ``blockers``
        (why the group cannot be removed, empty if it can); nodes
        ``("tensor", name)`` carry ``is_weight``. An edge says the group's
        channels live in that tensor, with the slice's ``dim``, ``kind`` and
        ``block``. Two groups that share a tensor are pruned independently
        along different dims (a conv's output and input channels), so the
        components of this graph are what one channel decision can touch:
        ``networkx.node_connected_component(g, ("tensor", "layer1.0.conv1.weight"))``
        lists every group and tensor coupled to a layer.
        """
        import networkx as nx  # noqa: PLC0415 - only for users who ask for the graph

        g = nx.Graph()
        for grp in self.groups:
            node = ("group", grp.index)
            g.add_node(node, size=grp.size, blockers=list(grp.blockers))
            for sl in grp.slices:
                t = ("tensor", sl.tensor)
                if t not in g:
                    g.add_node(t, is_weight=sl.is_weight)
                elif sl.is_weight:
                    g.nodes[t]["is_weight"] = True
                g.add_edge(node, t, dim=sl.dim, kind=sl.kind, block=sl.block)
        return g


# --------------------------------------------------------------------- tracing
#: torch.nn layers the analysis traces into (fx keeps torch.nn modules whole by default): the transformer
#: layers and the containers that stack them, which hold nothing but Python around their children.
TRACED_TORCH_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                       nn.TransformerDecoder, nn.Transformer)


class _ChannelTracer(fx.Tracer):
    """Plain fx tracing with torch.nn layers as leaves; remembers the innermost module whose forward raised."""

    def __init__(self, leaves: set[str], attention: AttentionMemo):
        super().__init__()
        self.leaves = leaves
        self.attention = attention
        self.culprit: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from fxprune.masked import MaskedParameter  # noqa: PLC0415 - avoid an import cycle

        if isinstance(m, TRACED_TORCH_LAYERS) and qualname not in self.leaves:
            return False  # plain Python around an nn.MultiheadAttention and Linear/LayerNorm layers
        return (qualname in self.leaves or isinstance(m, MaskedParameter) or super().is_leaf_module(m, qualname)
                or is_conv1d(m) or _acts_as_linear(m) or self.attention(m) is not None
                or self.attention.norms(m) is not None)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if isinstance(m, TRACED_TORCH_LAYERS) and self.path_of_module(m) not in self.leaves:
            from fxprune.structured.multihead import layer_slow_path  # noqa: PLC0415

            forward = layer_slow_path(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.culprit is None:
                self.culprit = self.path_of_module(m)
            raise


class AttentionMemo:
    """:func:`~fxprune.structured.attention.attention_spec` of each module, proven once per analysis."""

    def __init__(self, calls: dict[int, tuple[tuple, dict]] | None = None) -> None:
        self._specs: dict[int, AttentionSpec | None] = {}
        self._alive: list[nn.Module] = []  # ids stay valid while the analysis runs
        self._calls = calls or {}  # id(module) -> how the example run called it
        self.norms = NormMemo()  # normalization modules, proven alike (leaves of the analysis too)

    def __call__(self, m: nn.Module) -> AttentionSpec | None:
        key = id(m)
        if key not in self._specs:
            self._specs[key] = attention_spec(m, self._calls.get(key))
            self._alive.append(m)
        return self._specs[key]


def _trace_with_leaves(module: nn.Module, attention: AttentionMemo, leaves: set[str] | None = None) -> fx.Graph:
    """Trace, turning each submodule whose forward cannot be traced into a leaf (it blocks its channels).

    Proven attention modules are leaves too: the analysis handles their heads.
    They are proven before tracing starts, because the proof runs the module
    and fx intercepts every module call while it traces.
    """
    for m in module.modules():
        attention(m)
        _acts_as_linear(m)  # its check runs the layer: not while fx intercepts module calls
    leaves = set(leaves or ())
    while True:
        tracer = _ChannelTracer(leaves, attention)
        try:
            return tracer.trace(module)
        except Exception:
            if not tracer.culprit or tracer.culprit in leaves or tracer.culprit in ("", "m"):
                raise
            leaves.add(tracer.culprit)


class _FirstInput(nn.Module):
    """Calls the wrapped module with its first input only, other arguments at their defaults."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.m = module

    def forward(self, x: torch.Tensor) -> Any:
        return self.m(x)


def trace_for_channels(module: nn.Module, *, first_input_only: bool = False,
                       attention: AttentionMemo | None = None, leaves: set[str] | None = None) -> fx.Graph:
    """Trace ``module`` for the analysis alone (used for submodules of an untraceable root).

    ``first_input_only`` traces ``module(x)`` with every other argument at
    its default: forwards with ``**kwargs`` (Hugging Face layers) cannot be
    traced otherwise. The plan then describes that code path; channels it
    does not reach are not analysed, and the module's own output still
    blocks its channels, so a different path could only reuse unpruned ones.
    """
    attention = attention or AttentionMemo()
    if not first_input_only:
        return _trace_with_leaves(module, attention, leaves)
    graph = _trace_with_leaves(_FirstInput(module), attention)
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            assert node.target.startswith("m."), node.target
            node.target = node.target[2:]
    return graph


# -------------------------------------------------------------------- values
@dataclass
class _Chan:
    """Channel layout of one activation: channel dim (negative), atoms, ndim if known, flattened?"""

    dim: int
    atoms: torch.Tensor
    ndim: int | None = None
    flat: bool = False  # channel-major flatten: each atom covers an unknown block of positions


@dataclass
class _ShapeOf:
    chan: _Chan


class _Opaque:
    """A tensor whose channel layout is unknown: a graph input, or the result of an op the analysis does not
    follow applied to tracked channels (``F.interpolate`` of a feature map). Combining a tracked activation
    with it elementwise blocks the activation's channels: the two may have the same channel count, and a
    shrunk activation would no longer broadcast against it."""


_OPAQUE = _Opaque()


class _GraphInput(_Opaque):
    """An input of an analysed graph: the model's own input (``module`` ``""``) or a captured submodule's."""

    def __init__(self, module: str):
        self.module = module

    def origin(self) -> str:
        return "model input" if not self.module else (
            f"input of module {self.module}, made by code the analysis cannot see")


def _untracked(x: Any) -> Any:
    """What a norm or elementwise layer gives for an input whose channels are not tracked.

    The output is as untracked as the input (a graph input -- an ``_Opaque``
    too -- stays one; a result of an op the analysis does not follow stays
    opaque), never "no tensor": adding it to a tracked stream must block that
    stream, as adding the input would.
    """
    return x if isinstance(x, _Opaque) else None


def _opaque_input(node: fx.Node, env: dict) -> Any:
    """For a node known to give a tensor but analysed as "no tensor": its first untracked input, else None.

    Ops the analysis does not model (``permute``/``expand``/``cat`` of an
    untracked tensor, say) give None, which reads as a constant; where the
    graph's ranks show the result is a tensor computed from an untracked one
    (a patch embedding behind a reshape, with a class token concatenated), it
    is as untracked as that input, so a residual add with it blocks the
    stream. Only annotated graphs (recorded, or traced with an example) know
    which nodes give tensors.
    """
    def first(v: Any) -> Any:
        if isinstance(v, _Opaque):
            return v
        if isinstance(v, (list, tuple)):
            return next((o for o in map(first, v) if o is not None), None)
        if isinstance(v, dict):
            return next((o for o in map(first, v.values()) if o is not None), None)
        return None

    for inp in node.all_input_nodes:
        found = first(env.get(inp))
        if found is not None:
            return found
    return None


@dataclass
class _Tuple:
    """A module output that is a tuple (``(context, attention weights)`` of an attention module)."""

    items: tuple


def _chans(v: Any) -> list[_Chan]:
    """Every tracked activation inside a value (for blocking what an unknown consumer reads)."""
    if isinstance(v, _Chan):
        return [v]
    if isinstance(v, _ShapeOf):
        return [v.chan]
    if isinstance(v, _Tuple):
        return [c for item in v.items for c in _chans(item)]
    if isinstance(v, (list, tuple)):
        return [c for item in v for c in _chans(item)]
    if isinstance(v, dict):
        return [c for item in v.values() for c in _chans(item)]
    return []


_UNARY_FUNCS: set[Any] = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid,
    torch.tanh, F.tanh, F.dropout, F.leaky_relu, F.elu, F.mish, F.softplus, operator.neg, torch.neg,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
}
_UNARY_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "half", "bfloat16", "to", "type_as"}
_BINARY = {operator.add, operator.mul, operator.sub, operator.truediv, operator.iadd, operator.imul,
           torch.add, torch.mul, torch.sub, torch.div}
_BINARY_METHODS = {"add", "mul", "sub", "div", "add_", "mul_"}
_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_CONVS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_LINEARS = {torch._C._nn.linear, F.linear}
_BN_DIMS = {nn.BatchNorm2d: -3, nn.BatchNorm3d: -4}


def _elementwise_extra() -> set[Any]:
    """Elementwise functions of optional packages, looked up lazily (torchvision stochastic depth)."""
    out: set[Any] = set()
    try:
        from torchvision.ops.stochastic_depth import stochastic_depth  # noqa: PLC0415

        out.add(stochastic_depth)
    except ImportError:  # pragma: no cover - torchvision is optional
        pass
    return out


def _elementwise_module_types() -> tuple[type, ...]:
    extra: list[type] = []
    try:
        from torchvision.ops import StochasticDepth  # noqa: PLC0415

        extra.append(StochasticDepth)
    except ImportError:  # pragma: no cover
        pass
    return _ELEMENTWISE_MODULES + tuple(extra)


class _Analysis:
    """One walk over one graph; atoms, dependency edges, slices and blockers accumulate here."""

    def __init__(self, root: nn.Module, tensor_of: Callable[[str], torch.Tensor | None], attention: AttentionMemo):
        self.root = root
        self.tensor_of = tensor_of  # dotted name -> tensor (None if not a tensor of the model)
        self.attention_memo = attention
        self.attention: dict[str, AttentionSpec] = {}
        self.weight_notes: dict[str, str] = {}
        self.n_atoms = 0
        self.edges: list[torch.Tensor] = []  # (2, k) pairs of coupled atoms
        self.members: list[torch.Tensor] = []  # atoms that share one activation (same group)
        self.raw_slices: list[tuple[Slice, torch.Tensor]] = []  # slice with atoms in place of channels
        self.blocked: list[tuple[torch.Tensor, str]] = []
        self.partitions: list[tuple[torch.Tensor, int]] = []  # (atoms, g): equal removal per block
        self.layer_attrs: dict[str, str] = {}
        self.norm_atoms: dict[str, torch.Tensor] = {}  # norm module -> the atoms of its first call
        self.norm_specs: dict[str, NormSpec] = {}
        self.elementwise_funcs = _UNARY_FUNCS | _elementwise_extra()
        self.elementwise_modules = _elementwise_module_types()

    # -- atoms
    def new_atoms(self, n: int) -> torch.Tensor:
        a = torch.arange(self.n_atoms, self.n_atoms + n)
        self.n_atoms += n
        self.members.append(a)
        return a

    def couple(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.edges.append(torch.stack([a, b]))

    def block(self, atoms: torch.Tensor, reason: str) -> None:
        self.blocked.append((atoms, reason))

    def add_slice(self, name: str, dim: int, kind: str, atoms: torch.Tensor, positions: torch.Tensor | None = None,
                  *, is_weight: bool = False, block: int = 1, groups: int = 1) -> None:
        pos = torch.arange(len(atoms)) if positions is None else positions
        s = Slice(name, dim, kind, atoms, pos, block=block, groups=groups, is_weight=is_weight)
        self.raw_slices.append((s, atoms))

    # -- walking
    def run(self, graph: fx.Graph, prefix: str) -> None:
        env: dict[fx.Node, Any] = {}
        for node in graph.nodes:
            try:
                env[node] = value = self.visit(node, env, prefix)
                if isinstance(value, _Chan) and value.ndim is None and "ndim" in node.meta:  # a recorded run's
                    env[node] = _Chan(value.dim, value.atoms, node.meta["ndim"], value.flat)
                elif value is None and "ndim" in node.meta and node.op.startswith("call_"):
                    env[node] = _opaque_input(node, env)
            except _Unsupported as e:
                tracked = any(_chans(env.get(inp)) for inp in node.all_input_nodes)
                self.block_inputs(node, env, e.reason)
                env[node] = _OPAQUE if tracked else None

    def block_inputs(self, node: fx.Node, env: dict[fx.Node, Any], reason: str) -> None:
        for inp in node.all_input_nodes:
            v = env.get(inp)
            if isinstance(v, _Param):  # a weight read by something not followed: it will not be in a group
                self.weight_notes.setdefault(v.name, reason)
            for c in _chans(v):
                self.block(c.atoms, reason)

    def visit(self, node: fx.Node, env: dict[fx.Node, Any], prefix: str) -> Any:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        where = f"node {node.name!r} ({node.op} {target})"
        if node.op == "placeholder":
            return _GraphInput(prefix.rstrip("."))
        if node.op == "output":
            self.block_inputs(node, env, "model output: reaches the output of the traced graph (its size is part of "
                                         "the interface)" if not prefix else
                              f"output of module {prefix.rstrip('.')}: reaches the output of its traced graph, "
                              "read by code the analysis cannot see")
            return None
        if node.op == "get_attr":
            return _Param(prefix + node.target)
        if node.op == "call_module":
            m = self.root.get_submodule(prefix + node.target)
            from fxprune.masked import MaskedParameter  # noqa: PLC0415 - avoid an import cycle

            if isinstance(m, MaskedParameter):
                return _Param(prefix + node.target)
            return self.visit_module(node, m, prefix + node.target, env)
        if node.op == "call_function":
            return self.visit_function(node, node.target, env, where)
        if node.op == "call_method":
            return self.visit_method(node, env, where)
        raise _Unsupported(f"node kind {node.op}")

    # ---------------------------------------------------------------- modules
    def visit_module(self, node: fx.Node, m: nn.Module, name: str, env: dict[fx.Node, Any]) -> Any:
        args = [env.get(a) if isinstance(a, fx.Node) else a for a in node.args]
        x = args[0] if args else None
        if any(isinstance(a, _Tuple) for a in args):
            raise _Unsupported(f"module {name} reads a tuple output the analysis does not follow")
        spec = self.attention_memo(m)
        if spec is not None:
            kwargs = {k: env.get(v) if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
            first = _first_parameter(m)
            if not args and first in kwargs:  # called as self_attn(hidden_states=h, ...)
                x = kwargs.pop(first)
            others = [c for a in args[1:] + list(kwargs.values()) for c in _chans(a)]
            if others:
                raise _Unsupported(f"attention {name} attends over a second tracked input (cross-attention)")
            return self.attention_heads(x, spec, name)
        if isinstance(m, nn.MultiheadAttention):
            return self.multihead_heads(node, m, name, env)
        if isinstance(m, self.elementwise_modules):
            return x if isinstance(x, _Chan) else _untracked(x)
        if isinstance(m, nn.Flatten):
            return self.flatten(x, m.start_dim, m.end_dim)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and type(m).forward in (
            nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward
        ) and m.padding_mode == "zeros":
            return self.conv(x, name + ".weight", name + ".bias" if m.bias is not None else None, m.groups,
                             len(m.kernel_size), f"module {name}")
        if _acts_as_linear(m):
            return self.linear(x, name + ".weight", name + ".bias" if m.bias is not None else None, f"module {name}")
        if is_conv1d(m):
            return self.conv1d(x, name)
        if type(m) in _BN_DIMS or isinstance(m, nn.BatchNorm1d):
            if not isinstance(x, _Chan):
                return _untracked(x)
            want = _BN_DIMS.get(type(m))
            if want is None:  # BatchNorm1d: (N, C) or (N, C, L)
                want = -1 if x.ndim == 2 else (-2 if x.ndim == 3 else None)
            if want != x.dim or len(x.atoms) != m.num_features:
                raise _Unsupported(f"{type(m).__name__} {name}: cannot tell that it normalizes the tracked channel dim")
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, attr, None) is not None:
                    self.add_slice(f"{name}.{attr}", 0, OUT, x.atoms)
            self.layer_attrs[name] = "bn"
            return x
        norm = self.attention_memo.norms(m)
        if norm is not None:
            return self.norm_module(x, norm, name)
        if isinstance(m, nn.Embedding) and type(m).forward is nn.Embedding.forward:
            return self.embedding(name + ".weight", m.max_norm, f"module {name}")
        if isinstance(m, nn.LayerNorm):
            return self.layer_norm(x, tuple(m.normalized_shape), name + ".weight" if m.weight is not None else None,
                                   name + ".bias" if m.bias is not None else None, f"LayerNorm {name}")
        raise _Unsupported(f"leaf module {name} ({type(m).__name__}) is opaque to the channel analysis")

    # -------------------------------------------------------------- functions
    def visit_function(self, node: fx.Node, fn: Any, env: dict[fx.Node, Any], where: str) -> Any:
        def val(a: Any) -> Any:
            if isinstance(a, (list, tuple)):
                return type(a)(val(b) for b in a)
            return env.get(a) if isinstance(a, fx.Node) else a

        args = [val(a) for a in node.args]
        kwargs = {k: val(v) for k, v in node.kwargs.items()}
        if fn in _CONVS:
            names = [_arg(args, kwargs, i, k, d) for i, k, d in ((0, "input", None), (1, "weight", None),
                                                                    (2, "bias", None), (6, "groups", 1))]
            x, w, b, groups = names
            return self.conv(x, _name(w, where), _name(b, where) if b is not None else None, int(groups),
                             _CONVS[fn], where)
        if fn in _LINEARS:
            x, w, b = (_arg(args, kwargs, i, k, None) for i, k in ((0, "input"), (1, "weight"), (2, "bias")))
            return self.linear(x, _name(w, where), _name(b, where) if b is not None else None, where)
        if fn is F.layer_norm:
            x, shape, w, b = (_arg(args, kwargs, i, k, None) for i, k in
                              ((0, "input"), (1, "normalized_shape"), (2, "weight"), (3, "bias")))
            return self.layer_norm(x, tuple(shape), _name(w, where) if w is not None else None,
                                   _name(b, where) if b is not None else None, where)
        if fn in self.elementwise_funcs:
            return self.unary(args, where)
        if fn in (torch.pow, operator.pow) and isinstance(_arg(args, kwargs, 1, "exponent", None), (int, float)):
            return self.unary(args[:1], where)  # x ** 3 of gelu_new: elementwise
        if fn in _BINARY:
            return self.binary(args[0], args[1] if len(args) > 1 else kwargs.get("other"), where)
        if fn in (torch.flatten,):
            return self.flatten(args[0], _arg(args, kwargs, 1, "start_dim", 0), _arg(args, kwargs, 2, "end_dim", -1))
        if fn in (torch.pow, operator.pow) and len(args) > 1 and isinstance(args[1], (int, float)):
            return self.unary(args[:1], where)  # x ** 3 of a GELU approximation: elementwise
        if fn is torch.chunk:
            return self.chunk(args[0], _arg(args, kwargs, 1, "chunks", None), _arg(args, kwargs, 2, "dim", 0), where)
        if fn in (torch.cat, torch.concat):
            return self.cat(list(args[0]), _arg(args, kwargs, 1, "dim", 0), where)
        if fn is torch.permute:
            return self.permute(args[0], _arg(args, kwargs, 1, "dims", None), where)
        if fn in (torch.mean, torch.sum, torch.amax):
            return self.reduce(args[0], _arg(args, kwargs, 1, "dim", None), _arg(args, kwargs, 2, "keepdim", False), where)
        if fn is F.embedding:
            return self.embedding(_name(_arg(args, kwargs, 1, "weight", None), where),
                                  _arg(args, kwargs, 3, "max_norm", None), where)
        if fn is operator.getitem and isinstance(args[0], _Chan):
            return self.index(args[0], args[1], where)
        if fn is getattr:
            return self.getattr_(args[0], args[1], where)
        if fn is operator.getitem and isinstance(args[0], _ShapeOf):
            return self.shape_index(args[0], args[1], where)
        if fn is operator.getitem and isinstance(args[0], _Tuple):
            if isinstance(args[1], slice):
                return _Tuple(args[0].items[args[1]])
            if not isinstance(args[1], int):
                raise _Unsupported(f"{where}: indexes a tuple output with a computed index")
            return args[0].items[args[1]]  # the other items are followed where they are read
        if fn is operator.add and isinstance(args[0], (tuple, _Tuple)) and isinstance(args[1], (tuple, _Tuple)):
            return _Tuple(tuple(getattr(args[0], "items", args[0])) + tuple(getattr(args[1], "items", args[1])))
        if fn is torch._assert:
            return None
        return self.not_followed(list(args) + list(kwargs.values()), where)

    def visit_method(self, node: fx.Node, env: dict[fx.Node, Any], where: str) -> Any:
        args = [env.get(a) if isinstance(a, fx.Node) else a for a in node.args]
        kwargs = {k: env.get(v) if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
        name = node.target
        x = args[0]
        if name in _UNARY_METHODS:
            if name in ("to", "type_as") and any(isinstance(a, _Chan) for a in args[1:]):
                raise _Unsupported(f"consumed by {where}")
            return x if isinstance(x, (_Chan, _Opaque)) else None
        if name in _BINARY_METHODS:
            return self.binary(x, args[1] if len(args) > 1 else kwargs.get("other"), where)
        if name == "pow" and isinstance(_arg(args, kwargs, 1, "exponent", None), (int, float)):
            return self.unary(args[:1], where)
        if name == "permute":
            dims = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
            return self.permute(x, list(dims), where)
        if name == "flatten":
            return self.flatten(x, _arg(args, kwargs, 1, "start_dim", 0), _arg(args, kwargs, 2, "end_dim", -1))
        if name in ("mean", "sum", "amax"):
            return self.reduce(x, _arg(args, kwargs, 1, "dim", None), _arg(args, kwargs, 2, "keepdim", False), where)
        if name == "dim":
            return None  # the number of dims does not change when channels are removed
        if name == "pow" and len(args) > 1 and isinstance(args[1], (int, float)):
            return x if isinstance(x, (_Chan, _Opaque)) else None
        if name == "chunk":
            return self.chunk(x, _arg(args, kwargs, 1, "chunks", None), _arg(args, kwargs, 2, "dim", 0), where)
        if name == "size":
            d = _arg(args, kwargs, 1, "dim", None)
            if not isinstance(x, _Chan):
                return None
            return _ShapeOf(x) if d is None else self.shape_index(_ShapeOf(x), d, where)
        return self.not_followed(list(args) + list(kwargs.values()), where)

    def not_followed(self, values: list, where: str) -> None:
        """An op the analysis does not follow: note the weights it reads (no group will hold them), block its channels."""
        for v in values:
            for item in (v if isinstance(v, (list, tuple)) else (v,)):
                if isinstance(item, _Param):
                    self.weight_notes.setdefault(item.name, where)
        if any(_chans(v) for v in values):
            raise _Unsupported(f"consumed by {where}, an op the channel analysis does not follow")
        return None

    # -------------------------------------------------------------- handlers
    def attention_heads(self, x: Any, spec: AttentionSpec, name: str) -> Any:
        """A proven attention module: its heads are new channels (see :mod:`fxprune.structured.attention`).

        The projections' input columns read ``x``'s channels; each channel
        owns the blocks of ``head_dim`` output features that
        :func:`~fxprune.structured.head_layout.projection_rows` lists (rows,
        or columns of a transposed ``Conv1D``) and their bias entries, its
        columns of every per-head table, and a block of columns of the output
        projection -- the module's own, or whichever linear layer reads the
        returned context (a flattened activation whose channel ``h`` covers
        ``head_dim`` positions).
        """
        where = f"attention {name}"
        for proj in spec.projections() + ((spec.out,) if spec.out is not None else ()):
            self.weight(f"{name}.{proj}.weight", where)  # all present before any slice is recorded
        in_atoms, chan = self.input_atoms(x, -1, spec.hidden, where)
        if not spec.input_only_qkv:  # e.g. a residual (LayerNorm(x + ...)) inside the module
            self.block(in_atoms, f"{where} also reads its input outside its query/key/value projections "
                                 "(a residual or norm inside the module), which the analysis does not follow")
        heads = self.new_atoms(spec.channels)  # heads, or key/value groups of grouped-query attention
        for proj, chans, pos in projection_rows(spec):
            w, flip = f"{name}.{proj}.weight", proj in spec.transposed
            self.add_slice(w, 0 if flip else 1, OUT if flip else IN, in_atoms, is_weight=True)
            self.add_slice(w, 1 if flip else 0, IN_BLOCK if flip else OUT_BLOCK, heads[chans], pos, is_weight=True,
                           block=spec.head_dim)
            if self.tensor_of(f"{name}.{proj}.bias") is not None:
                self.add_slice(f"{name}.{proj}.bias", 0, OUT_BLOCK, heads[chans], pos, block=spec.head_dim)
            self.layer_attrs[f"{name}.{proj}"] = "conv1d" if flip else "linear"
        per_query = heads[torch.repeat_interleave(torch.arange(spec.channels), spec.group)]
        for table in spec.tables:
            t = self.weight(f"{name}.{table}", where)
            self.add_slice(f"{name}.{table}", t.dim() - 1, OUT, per_query)
        self.attention[name] = spec
        ndim = chan.ndim if chan is not None else None
        out: _Chan = _Chan(-1, heads, ndim, flat=True)
        if spec.out is not None:
            w, flip = f"{name}.{spec.out}.weight", spec.out in spec.transposed
            self.add_slice(w, 0 if flip else 1, OUT_BLOCK if flip else IN_BLOCK, heads, is_weight=True,
                           block=spec.group * spec.head_dim)
            out_atoms = self.new_atoms(self.tensor_of(w).shape[1 if flip else 0])
            if not spec.output_is_projection:  # ALBERT: returns LayerNorm(input + dense(context))
                self.block(out_atoms, f"{where} returns more than its output projection {spec.out} "
                                      "(e.g. LayerNorm(input + projection) inside the module)")
            self.add_slice(w, 1 if flip else 0, IN if flip else OUT, out_atoms, is_weight=True)
            if self.tensor_of(f"{name}.{spec.out}.bias") is not None:
                self.add_slice(f"{name}.{spec.out}.bias", 0, OUT, out_atoms)
            self.layer_attrs[f"{name}.{spec.out}"] = "conv1d" if flip else "linear"
            out = _Chan(-1, out_atoms, ndim)
        return _Tuple((out, None)) if spec.returns_tuple else out

    def multihead_heads(self, node: fx.Node, m: nn.MultiheadAttention, name: str, env: dict[fx.Node, Any]) -> Any:
        """``nn.MultiheadAttention``: heads are channels (``convert`` swaps in
        :class:`~fxprune.structured.multihead.PrunedMultiheadAttention`).

        Each head owns its query, key and value rows of ``in_proj_weight`` /
        ``in_proj_bias`` (blocks ``h``, ``H + h``, ``2H + h`` of ``head_dim``
        rows), its entries of ``bias_k`` / ``bias_v``, and its block of
        ``out_proj`` columns. The input columns are shared by query, key and
        value, so they follow the query only when key and value are the same
        activation (self-attention). The heads are blocked where the attention
        weights are read: averaged over heads, they change when heads go.
        """
        where = f"nn.MultiheadAttention {name}"
        if not m._qkv_same_embed_dim:
            raise _Unsupported(f"{where}: separate key/value widths (kdim/vdim) are not supported")
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights")
        call = dict(zip(names, node.args))
        call.update(node.kwargs)
        val = {k: env.get(v) if isinstance(v, fx.Node) else v for k, v in call.items()}
        q, k, v = val.get("query"), val.get("key"), val.get("value")
        for mask in ("key_padding_mask", "attn_mask"):
            if _chans(val.get(mask)):
                raise _Unsupported(f"{where}: its {mask} is a tracked activation")
        w, wname = self.weight(f"{name}.in_proj_weight", where), f"{name}.in_proj_weight"
        heads, d = m.num_heads, m.head_dim
        in_atoms, chan = self.input_atoms(q, -1, w.shape[1], where)
        same = call.get("key") is call.get("query") and call.get("value") is call.get("query")
        if not same:  # cross-attention: key/value read the same columns from another activation
            self.block(in_atoms, f"{where} reads key/value from another activation through the same "
                                 "in_proj_weight columns as its query")
            for t in (k, v):
                if isinstance(t, _Chan) and t is not q:
                    self.block(t.atoms, f"{where} reads key/value through the columns of its query")
        atoms = self.new_atoms(heads)
        three = torch.cat([atoms, atoms, atoms])  # q, k and v blocks of each head
        self.add_slice(wname, 1, IN, in_atoms, is_weight=True)
        self.add_slice(wname, 0, OUT_BLOCK, three, is_weight=True, block=d)
        if m.in_proj_bias is not None:
            self.add_slice(f"{name}.in_proj_bias", 0, OUT_BLOCK, three, block=d)
        for extra in ("bias_k", "bias_v"):  # (1, 1, embed_dim)
            if getattr(m, extra) is not None:
                self.add_slice(f"{name}.{extra}", 2, OUT, torch.repeat_interleave(atoms, d), torch.arange(heads * d))
        ow = f"{name}.out_proj.weight"
        self.add_slice(ow, 1, IN_BLOCK, atoms, is_weight=True, block=d)
        out_atoms = self.new_atoms(self.weight(ow, where).shape[0])
        self.add_slice(ow, 0, OUT, out_atoms, is_weight=True)
        if m.out_proj.bias is not None:
            self.add_slice(f"{name}.out_proj.bias", 0, OUT, out_atoms)
        self.layer_attrs[f"{name}.out_proj"] = "linear"
        self.layer_attrs[name] = "multihead"
        if val.get("need_weights", True) is not False and _weights_read(node):
            self.block(atoms, f"{where}: its attention weights (need_weights=True) are read; averaged over heads, "
                              "they change when heads are removed")
        return _Tuple((_Chan(-1, out_atoms, chan.ndim if chan is not None else None), None))

    def input_atoms(self, x: Any, dim: int, size: int, where: str, flat_ok: bool = False) -> tuple[torch.Tensor, _Chan | None]:
        """The atoms a layer reads, or fresh blocked atoms if the input's layout is not tracked."""
        if isinstance(x, _Chan) and x.dim == dim and len(x.atoms) == size and (flat_ok or not x.flat):
            return x.atoms, x
        if isinstance(x, _Chan) and x.flat and flat_ok and size % len(x.atoms) == 0:
            return x.atoms, x
        if isinstance(x, _Chan):
            self.block(x.atoms, f"read by {where} in a layout the analysis cannot map")
        atoms = self.new_atoms(size)
        if isinstance(x, _GraphInput):
            self.block(atoms, f"{x.origin()}: read by {where}")
        else:
            self.block(atoms, f"input channels of {where} come from outside the analysed graph or an op it does not "
                              "follow")
        return atoms, None

    def weight(self, name: str, where: str) -> torch.Tensor:
        t = self.tensor_of(name)
        if t is None:
            raise _Unsupported(f"{where}: weight {name!r} is not a tensor of the model")
        return t

    def conv(self, x: Any, wname: str, bname: str | None, groups: int, nd: int, where: str) -> _Chan:
        w = self.weight(wname, where)
        c_out, c_in = w.shape[0], w.shape[1] * groups
        dim = -(nd + 1)
        in_atoms, _ = self.input_atoms(x, dim, c_in, where)
        owner = wname.rpartition(".")[0]
        self.layer_attrs[owner] = "conv"
        if groups == 1:
            out = self.new_atoms(c_out)
            self.add_slice(wname, 1, IN, in_atoms, is_weight=True)
        elif groups == c_in and c_out == c_in:  # depthwise: channel c in -> channel c out
            out = in_atoms
        elif groups == c_in:
            self.block(in_atoms, f"{where}: depthwise convolution with a channel multiplier is not supported")
            out = self.new_atoms(c_out)
            self.block(out, f"{where}: depthwise convolution with a channel multiplier is not supported")
            return _Chan(dim, out, nd + 2)
        else:
            out = self.new_atoms(c_out)
            self.add_slice(wname, 1, IN_GROUPED, in_atoms, is_weight=True, groups=groups)
            self.partitions.append((in_atoms, groups))
            self.partitions.append((out, groups))
        self.add_slice(wname, 0, OUT, out, is_weight=True)
        if bname is not None:
            self.add_slice(bname, 0, OUT, out)
        return _Chan(dim, out, nd + 2)

    def linear(self, x: Any, wname: str, bname: str | None, where: str) -> _Chan:
        w = self.weight(wname, where)
        c_out, c_in = w.shape
        in_atoms, chan = self.input_atoms(x, -1, c_in, where, flat_ok=True)
        if chan is not None and chan.flat:
            s = c_in // len(in_atoms)
            self.add_slice(wname, 1, IN_BLOCK, in_atoms, is_weight=True, block=s)
        else:
            self.add_slice(wname, 1, IN, in_atoms, is_weight=True)
        out = self.new_atoms(c_out)
        self.add_slice(wname, 0, OUT, out, is_weight=True)
        if bname is not None:
            self.add_slice(bname, 0, OUT, out)
        self.layer_attrs[wname.rpartition(".")[0]] = "linear"
        return _Chan(-1, out, chan.ndim if chan is not None else None)

    def conv1d(self, x: Any, name: str) -> _Chan:
        """Hugging Face ``Conv1D``: a linear layer whose weight is ``(in, out)`` (rows read, columns write)."""
        wname = name + ".weight"
        c_in, c_out = self.weight(wname, f"module {name}").shape
        in_atoms, chan = self.input_atoms(x, -1, c_in, f"module {name}")
        self.add_slice(wname, 0, OUT, in_atoms, is_weight=True)
        out = self.new_atoms(c_out)
        self.add_slice(wname, 1, IN, out, is_weight=True)
        if self.tensor_of(name + ".bias") is not None:
            self.add_slice(name + ".bias", 0, OUT, out)
        self.layer_attrs[name] = "conv1d"
        return _Chan(-1, out, chan.ndim if chan is not None else None)

    def chunk(self, x: Any, n: Any, dim: Any, where: str) -> Any:
        """``x.chunk(n, dim)``: along the channels, n equal parts whose i-th channels go together.

        A fused gate|up projection (Phi3) is split this way; after pruning
        ``chunk`` must still cut at the same place, so every part keeps the
        same channels (coupled position by position).
        """
        if not isinstance(x, _Chan):
            return None
        if not isinstance(n, int) or not isinstance(dim, int):
            raise _Unsupported(f"{where}: chunk count or dim not known at trace time")
        d = dim if dim < 0 else (dim - x.ndim if x.ndim is not None else None)
        if d is None:
            raise _Unsupported(f"{where}: cannot relate the chunk dim to the channel dim")
        if d != x.dim:
            return _Tuple(tuple(x for _ in range(n)))
        if x.flat or n < 1 or len(x.atoms) % n:
            raise _Unsupported(f"{where}: chunks of unequal size along the channel dim")
        parts = x.atoms.reshape(n, -1)
        for p in parts[1:]:
            self.couple(parts[0], p)
        return _Tuple(tuple(_Chan(x.dim, p.clone(), x.ndim) for p in parts))

    def layer_norm(self, x: Any, shape: tuple, wname: str | None, bname: str | None, where: str) -> Any:
        if not isinstance(x, _Chan):
            return _untracked(x)
        if x.dim == -1 and len(shape) == 1 and shape[0] == len(x.atoms) and not x.flat:
            for n in (wname, bname):
                if n is not None:
                    self.add_slice(n, 0, OUT, x.atoms)
            self.block(x.atoms, f"{where} normalizes over these channels: removing channels changes its mean and "
                                "variance, so the result could not equal the masked model")
            return x
        if x.dim < -len(shape):  # normalizes other dims only
            return x
        raise _Unsupported(f"{where} normalizes over the channel dim together with other dims")

    def norm_module(self, x: Any, spec: NormSpec, name: str) -> Any:
        """A proven normalization (see :mod:`fxprune.structured.norms`): same channels in and out.

        Its per-channel tensors are slices of the stream; the prepared model
        computes it over the kept channels only, so it does not block them.
        A norm called twice couples its two inputs (they share its weights).
        """
        if not isinstance(x, _Chan):
            return _untracked(x)
        want = spec.dim if spec.dim < 0 else (spec.dim - x.ndim if x.ndim is not None else None)
        if x.flat or want != x.dim or len(x.atoms) != spec.size:
            raise _Unsupported(f"{type(self.root.get_submodule(name)).__name__} {name}: cannot tell that it "
                               "normalizes the tracked channel dim")
        first = self.norm_atoms.setdefault(name, x.atoms)
        if first is not x.atoms:
            self.couple(first, x.atoms)
        for t in spec.tensors:
            self.add_slice(f"{name}.{t}", 0, OUT, x.atoms)
        if spec.groups > 1:
            self.partitions.append((x.atoms, spec.groups))
        self.norm_specs[name] = spec
        self.layer_attrs[name] = "norm"
        return x

    def embedding(self, wname: str, max_norm: Any, where: str) -> _Chan:
        """An embedding lookup: its output channels are the columns of the table."""
        w = self.weight(wname, where)
        if w.dim() != 2:
            raise _Unsupported(f"{where}: embedding table {wname!r} is not a matrix")
        out = self.new_atoms(w.shape[1])
        if max_norm is not None:  # renormalizes each row over all its columns
            self.block(out, f"{where}: max_norm renormalizes each embedding over all its channels")
        self.add_slice(wname, 1, IN, out, is_weight=True)
        self.layer_attrs[wname.rpartition(".")[0]] = "embedding"
        return _Chan(-1, out, None)

    def index(self, x: _Chan, idx: Any, where: str) -> _Chan:
        """``x[...]`` that leaves the channel dim whole (``h[:, -1]``, ``h[:, 0, :]``) keeps the channels."""
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if x.flat or any(not (isinstance(i, (int, slice)) or i is None or i is Ellipsis) for i in items):
            raise _Unsupported(f"{where}: indexes a tracked activation with a tensor or a computed index")
        n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
        if Ellipsis in items:
            k = items.index(Ellipsis)
            head, tail = items[:k], items[k + 1:]
            if Ellipsis in tail:
                raise _Unsupported(f"{where}: indexes with more than one Ellipsis")
        elif x.ndim is not None and n_real <= x.ndim:
            head, tail = [], items + [slice(None)] * (x.ndim - n_real)
        else:
            raise _Unsupported(f"{where}: indexing of an activation whose rank is unknown")
        after = -x.dim - 1  # dims after the channel dim
        real = [j for j, i in enumerate(tail) if i is not None]
        if len(real) > after:  # the channel dim is indexed by an entry of the tail
            j = real[len(real) - after - 1]
            if not _whole(tail[j]):
                raise _Unsupported(f"{where}: indexes the channel dim")
            rest = tail[j + 1:]
        else:  # covered by the Ellipsis, unless the head reaches it
            head_real = sum(1 for i in head if i is not None)
            if head_real and (x.ndim is None or head_real > x.ndim - after - 1):
                raise _Unsupported(f"{where}: indexing not related to the channel dim")
            rest = tail
        new_after = sum(1 for i in rest if i is None or isinstance(i, slice))
        dropped = sum(1 for i in items if isinstance(i, int)) - sum(1 for i in items if i is None)
        return _Chan(-new_after - 1, x.atoms, None if x.ndim is None else x.ndim - dropped)

    def unary(self, args: list, where: str) -> Any:
        x = args[0] if args else None
        for a in args[1:]:
            if isinstance(a, (_Chan, _ShapeOf)):
                raise _Unsupported(f"consumed by {where} as a second operand")
        return x if isinstance(x, (_Chan, _Opaque)) else None

    def binary(self, a: Any, b: Any, where: str) -> Any:
        if isinstance(a, _ShapeOf) or isinstance(b, _ShapeOf):
            raise _Unsupported(f"channel count used in arithmetic at {where}")
        if isinstance(a, _Chan) and isinstance(b, _Chan):
            if a.dim != b.dim or len(a.atoms) != len(b.atoms) or a.flat or b.flat:
                raise _Unsupported(f"{where}: operands with different channel layouts")
            self.couple(a.atoms, b.atoms)
            return _Chan(a.dim, a.atoms, a.ndim or b.ndim)
        x, other = (a, b) if isinstance(a, _Chan) else (b, a)
        if not isinstance(x, _Chan):
            return _OPAQUE if isinstance(a, _Opaque) or isinstance(b, _Opaque) else None
        if isinstance(other, _Opaque):
            raise _Unsupported(f"{where}: combined with a tensor whose channel layout is not tracked (a graph input "
                               "or the result of an op the analysis does not follow)")
        if isinstance(other, (int, float, bool)) or other is None:
            return x
        if isinstance(other, _Param):
            t = self.tensor_of(other.name)
            if t is None:
                raise _Unsupported(f"{where}: operand {other.name!r} is not a tensor of the model")
            if t.dim() < -x.dim or t.shape[x.dim] == 1:
                return x  # broadcast along the channel dim: the same for every channel
            if t.shape[x.dim] == len(x.atoms) and not x.flat:
                self.add_slice(other.name, t.dim() + x.dim, OUT, x.atoms)
                return x
        raise _Unsupported(f"{where}: combined with a tensor whose channel layout is not tracked")

    def flatten(self, x: Any, start: int, end: int) -> Any:
        if not isinstance(x, _Chan):
            return None
        if x.ndim is None or x.flat:
            raise _Unsupported("flatten of an activation whose rank is unknown")
        n = x.ndim
        start, end, pos = start % n, end % n, x.dim % n
        new_ndim = n - (end - start)
        if pos < start:
            return _Chan(pos - new_ndim, x.atoms, new_ndim)
        if pos > end:
            return _Chan(pos - (end - start) - new_ndim, x.atoms, new_ndim)
        if pos == start:  # channel-major blocks: channel c -> positions [c*s, (c+1)*s)
            if end == start:
                return x
            if end != n - 1:
                raise _Unsupported("flatten that does not run to the last dim")
            return _Chan(-1, x.atoms, new_ndim, flat=True)
        raise _Unsupported("flatten that splits channels across blocks")

    def cat(self, xs: list, dim: int, where: str) -> Any:
        chans = [x for x in xs if isinstance(x, _Chan)]
        if not chans:
            return None
        if len(chans) != len(xs):
            raise _Unsupported(f"{where}: concatenates tensors whose channels are not tracked")
        ndim = next((c.ndim for c in chans if c.ndim is not None), None)
        d = dim if dim < 0 else (dim - ndim if ndim is not None else None)
        if d is None or any(c.dim != chans[0].dim or c.flat for c in chans):
            raise _Unsupported(f"{where}: cannot relate the concatenation dim to the channel dim")
        if d == chans[0].dim:  # concatenation of channels: the output's atoms are the inputs' atoms
            out = torch.cat([c.atoms for c in chans])
            self.members.append(out)
            return _Chan(d, out, ndim)
        for c in chans[1:]:
            if len(c.atoms) != len(chans[0].atoms):
                raise _Unsupported(f"{where}: operands with different channel counts")
            self.couple(chans[0].atoms, c.atoms)
        return _Chan(chans[0].dim, chans[0].atoms, ndim)

    def permute(self, x: Any, dims: list | None, where: str) -> Any:
        if not isinstance(x, _Chan):
            return None
        if not dims or any(not isinstance(d, int) for d in dims):
            raise _Unsupported(f"{where}: permutation not known at trace time")
        n = len(dims)
        pos = x.dim % n
        new = [d % n for d in dims].index(pos)
        return _Chan(new - n, x.atoms, n)

    def reduce(self, x: Any, dims: Any, keepdim: bool, where: str) -> Any:
        if not isinstance(x, _Chan):
            return None
        if dims is None:
            raise _Unsupported(f"{where}: reduces over all dims including channels")
        dims = [dims] if isinstance(dims, int) else list(dims)
        neg = []
        for d in dims:
            if d < 0:
                neg.append(d)
            elif x.ndim is not None:
                neg.append(d - x.ndim)
            else:
                raise _Unsupported(f"{where}: reduction dims cannot be related to the channel dim")
        if x.dim in neg or x.flat:
            raise _Unsupported(f"{where}: reduces over the channel dim")
        if keepdim:
            return x
        after = sum(1 for d in neg if d > x.dim)
        return _Chan(x.dim + after, x.atoms, None if x.ndim is None else x.ndim - len(neg))

    def getattr_(self, x: Any, attr: str, where: str) -> Any:
        if isinstance(x, _Chan) and attr == "shape":
            return _ShapeOf(x)
        if isinstance(x, _Chan) and attr in ("dtype", "device", "ndim", "is_cuda"):
            return None
        if isinstance(x, _Chan):
            raise _Unsupported(f"{where}: attribute {attr!r} of a tracked activation")
        return None

    def shape_index(self, s: _ShapeOf, i: Any, where: str) -> Any:
        x = s.chan
        if isinstance(i, int) and (i < 0 or x.ndim is not None):
            d = i if i < 0 else i - x.ndim
            if d != x.dim:
                return None
        self.block(x.atoms, f"{where}: reads the number of channels, which pruning changes")
        return None


class _Unsupported(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Param:
    name: str


_LINEAR_CLASSES: dict[type, bool] = {nn.Linear: True}  # class -> its forward computes F.linear (checked once)


def _acts_as_linear(m: nn.Module) -> bool:
    """``nn.Linear``, or a subclass whose own forward gives ``F.linear`` (Falcon's ``x @ W.T + b``).

    Checked once per class on a fresh instance and a random input, with and
    without bias: a subclass that does anything else (LoRA, quantization) is
    traced through like any other code.
    """
    cls = type(m)
    if not isinstance(m, nn.Linear):
        return False
    if cls.forward is nn.Linear.forward:
        return True
    if cls not in _LINEAR_CLASSES:
        ok = True
        try:
            gen = torch.Generator().manual_seed(0)
            for bias in (True, False):
                probe = cls(5, 3, bias=bias)
                x = torch.randn(2, 4, 5, generator=gen)
                with torch.no_grad():
                    ok = ok and torch.allclose(probe(x), F.linear(x, probe.weight, probe.bias), atol=1e-6)
        except Exception:  # noqa: BLE001 - a constructor or forward that differs: not a plain linear layer
            ok = False
        _LINEAR_CLASSES[cls] = ok
    return _LINEAR_CLASSES[cls]


def _weights_read(node: fx.Node) -> bool:
    """Does anything read more of an attention call's ``(output, weights)`` than ``output``?"""
    for user in node.users:
        index = user.args[1] if user.op == "call_function" and user.target is operator.getitem else None
        if index == 0 or (index == 1 and not user.users):
            continue
        return True
    return False


def _first_parameter(m: nn.Module) -> str | None:
    """Name of the first argument of ``m``'s forward (its input, as the attention proof calls it)."""
    try:
        params = list(inspect.signature(type(m).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    return params[0].name if params and params[0].kind in (params[0].POSITIONAL_OR_KEYWORD,
                                                           params[0].POSITIONAL_ONLY) else None


def _whole(i: Any) -> bool:
    """A slice that keeps every position (``:``, ``0:``)."""
    return isinstance(i, slice) and i.start in (None, 0) and i.stop is None and i.step in (None, 1)


def _arg(args: list, kwargs: dict, i: int, key: str, default: Any) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(key, default)


def _name(v: Any, where: str) -> str:
    if isinstance(v, _Param):
        return v.name
    raise _Unsupported(f"{where}: its weight is computed, not a parameter of the model")


# ---------------------------------------------------------------- grouping
def build_channel_graph(
    root: nn.Module,
    graphs: Iterable[tuple[fx.Graph, str]],
    tensor_of: Callable[[str], torch.Tensor | None],
    attention: AttentionMemo | None = None,
) -> ChannelGraph:
    """Analyse ``graphs`` (each with the module-name prefix its targets are relative to) into groups.

    ``tensor_of`` resolves a dotted parameter or buffer name to its tensor
    (pruned weights live inside masked-parameter modules, so the caller knows
    how to look them up).
    """
    an = _Analysis(root, tensor_of, attention or AttentionMemo())
    for graph, prefix in graphs:
        an.run(graph, prefix)

    _couple_shared_slices(an)
    # Channels: atoms joined by dependencies.
    pairs = torch.cat(an.edges, 1) if an.edges else torch.empty(2, 0, dtype=torch.long)
    channel_of, n_channels = connected_components(an.n_atoms, pairs)

    # Groups: channels sharing an activation or a tensor slice.
    sets = an.members + [a for _, a in an.raw_slices]
    group_of, n_groups = connected_components(n_channels, _star_edges([channel_of[a] for a in sets]))
    order = torch.argsort(group_of, stable=True)  # channels by group, ascending within each
    counts = torch.bincount(group_of, minlength=n_groups).tolist()
    groups = [ChannelGroup(gid, chans.tolist(), ids=chans.clone())
              for gid, chans in enumerate(torch.split(order, counts))]
    for s, atoms in an.raw_slices:
        ch = channel_of[atoms]
        s.channels = ch
        groups[int(group_of[ch[0]])].slices.append(s)
    for atoms, reason in an.blocked:
        if len(atoms):
            grp = groups[int(group_of[channel_of[atoms[0]]])]
            if reason not in grp.blockers:
                grp.blockers.append(reason)
    _add_cells(groups, an.partitions, channel_of, group_of)
    norms = {name: (spec, channel_of[an.norm_atoms[name]]) for name, spec in an.norm_specs.items()}
    return ChannelGraph(groups=groups, layer_attrs=an.layer_attrs, attention=an.attention,
                        weight_notes=an.weight_notes, norms=norms)


def _couple_shared_slices(an: _Analysis) -> None:
    """Rows (or columns) of one tensor read at several places are one channel each: a layer called twice,
    or tied tensors (an embedding table that is also the output layer's weight) reached by two names."""
    first: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for s, atoms in an.raw_slices:
        if s.kind not in (OUT, IN):
            continue
        t = an.tensor_of(s.tensor)
        key = (id(t) if t is not None else s.tensor, s.dim, s.kind)
        seen = first.setdefault(key, (s.positions, atoms))
        if seen[1] is not atoms and torch.equal(seen[0], s.positions):
            an.couple(seen[1], atoms)


def connected_components(n: int, pairs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Component label of each of ``n`` nodes joined by ``pairs`` (``(2, k)``); labels ordered by smallest member.

    Vectorized union-find (min-label hooking with pointer jumping): every
    round hooks each root onto the smallest root it is joined to, then
    compresses the paths, so it needs a few tensor passes instead of a Python
    step per atom. A resnet18 has some 20 000 channel atoms; building a
    networkx graph of them took 70 ms, about a third of the whole pruning
    pass. ``tests/test_structured.py`` checks this against
    ``networkx.connected_components``.
    """
    parent = torch.arange(n)
    if pairs.numel():
        u, v = pairs[0], pairs[1]
        while True:
            ru, rv = parent[u], parent[v]  # roots: ``parent`` is fully compressed here
            differ = ru != rv
            if not bool(differ.any()):
                break
            lo, hi = torch.minimum(ru, rv)[differ], torch.maximum(ru, rv)[differ]
            u, v = u[differ], v[differ]  # joined pairs stay joined: drop them
            parent.scatter_reduce_(0, hi, lo, reduce="amin")  # parent[x] <= x always: no cycles
            while True:
                up = parent[parent]
                if torch.equal(up, parent):
                    break
                parent = up
    roots, label = torch.unique(parent, return_inverse=True)  # a root is its component's smallest node
    return label, len(roots)


def _star_edges(sets: list[torch.Tensor]) -> torch.Tensor:
    """Pairs joining the first element of each set to every element of it (all of a set in one component)."""
    sets = [s for s in sets if len(s)]
    if not sets:
        return torch.empty(2, 0, dtype=torch.long)
    flat = torch.cat(sets)
    sizes = torch.tensor([len(s) for s in sets])
    first = torch.repeat_interleave(torch.stack([s[0] for s in sets]), sizes)
    return torch.stack([first, flat])


def _add_cells(groups: list[ChannelGroup], partitions: list[tuple[torch.Tensor, int]], channel_of: torch.Tensor,
               group_of: torch.Tensor) -> None:
    """Grouped convs need the same number of channels removed from each conv group: find equal cells."""
    by_group: dict[int, list[list[int]]] = {}
    for atoms, g in partitions:
        ch = channel_of[atoms]
        gid = int(group_of[ch[0]])
        per = len(ch) // g
        by_group.setdefault(gid, []).append([int(c) for c in ch])
        by_group[gid].append([i // per for i in range(len(ch))])
    for gid, parts in by_group.items():
        grp = groups[gid]
        key: dict[int, tuple] = {c: () for c in grp.channels}
        for chans, labels in zip(parts[::2], parts[1::2]):
            if len(set(chans)) != len(chans):
                grp.blockers.append("a grouped convolution reads the same channel twice")
                break
            for c, lab in zip(chans, labels):
                key[c] = key[c] + (lab,)
        cells: dict[tuple, list[int]] = {}
        for c in grp.channels:
            cells.setdefault(key[c], []).append(c)
        sizes = {len(v) for v in cells.values()}
        if len(sizes) != 1:
            grp.blockers.append("grouped convolutions split these channels into blocks of unequal size")
            continue
        # Each conv group must be a union of the same number of cells for equal removal to be equal per group.
        local = {c: i for i, c in enumerate(grp.channels)}
        grp.cells = [sorted(local[c] for c in v) for v in cells.values()]
