"""The channel plan of a prepared model: groups, which pruner may prune each, and why not.

Built once by :func:`attach_channel_plan` (called from ``prepare`` when a
pruner has ``pattern: channel``) and kept on the prepared model, so that the
mask update (:func:`fxprune.structured.importance.channel_masks`) and
``convert(physical=True)`` read the same decisions. It is plain data plus
references to the prepared model's own masked-parameter modules, so it
follows the model through ``deepcopy`` and pickling.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
import torch
import torch.fx as fx
from torch import nn

from fxprune.masked import MaskedParameter
from fxprune.structured.attention import record_attention_calls, refusal
from fxprune.structured.norms import NormSpec, install_masked_norm
from fxprune.structured.record import record_graph
from fxprune.structured.reasons import plain_reason
from fxprune.structured.head_layout import is_conv1d
from fxprune.trace import leaving_no_trace
from fxprune.structured.dependency import (
    _acts_as_linear,
    OUT_BLOCK,
    TRACED_TORCH_LAYERS,
    AttentionMemo,
    ChannelGraph,
    ChannelGroup,
    build_channel_graph,
    trace_for_channels,
)

__all__ = ["ChannelPlan", "ChannelReport", "ChannelReports", "attach_channel_plan", "channel_plan_of",
           "channel_report"]

_ATTR = "_fxprune_channels"


@dataclass
class ChannelReport:
    """Per channel pruner: the groups it prunes, the ones it cannot, and its weights left dense.

    ``str()`` is a table (group, kept/total channels or heads, layers, why
    not pruned in plain words); ``to_dict()`` has the same with the
    analysis' full reasons; ``excluded`` maps a group's layers to the reasons.
    """

    pruner: str
    prunable: list[tuple[int, int, list[str]]] = field(default_factory=list)  # (group, channels, layers)
    excluded: list[tuple[int, int, list[str], list[str]]] = field(default_factory=list)  # + reasons
    dense_weights: list[str] = field(default_factory=list)
    dense_reasons: dict[str, str] = field(default_factory=dict)  # dense weight -> why no group reaches it
    head_groups: set[int] = field(default_factory=set)  # groups whose channels are attention heads
    kept: dict[int, int] = field(default_factory=dict)  # group -> channels kept by the masks (at report time)

    def to_dict(self) -> dict[str, object]:
        """Plain data for programs: every group with its full reasons, every dense weight with its reason."""
        def unit(gid: int) -> str:
            return "heads" if gid in self.head_groups else "channels"

        return {
            "pruner": self.pruner,
            "prunable": [{"group": g, "unit": unit(g), "total": n, "kept": self.kept.get(g, n), "layers": layers}
                         for g, n, layers in self.prunable],
            "excluded": [{"group": g, "unit": unit(g), "total": n, "layers": layers, "reasons": reasons,
                          "plain": _plain_list(reasons)} for g, n, layers, reasons in self.excluded],
            "dense_weights": {w: self.dense_reasons.get(w) for w in self.dense_weights},
        }

    def __str__(self) -> str:
        from fxprune.report import format_table  # noqa: PLC0415 - report imports nothing structured

        groups = sorted([(g, n, layers, []) for g, n, layers in self.prunable] + list(self.excluded))
        rows = []
        for gid, n, layers, reasons in groups:
            kept = self.kept.get(gid, n)
            plain = _plain_list(reasons)
            why = "-" if not plain else plain[0] + (f" (+{len(plain) - 1} more)" if len(plain) > 1 else "")
            rows.append((str(gid), f"{kept}/{n} {'heads' if gid in self.head_groups else 'channels'}",
                         _short(_common_prefix_trimmed(layers), 3), why))
        kept_total = sum(self.kept.get(g, n) for g, n, _ in self.prunable)
        total = sum(n for _, n, _ in self.prunable)
        lines = [f"channel pruner {self.pruner!r}: {len(self.prunable)} of {len(groups)} groups prunable "
                 f"({len(self.excluded)} excluded), {kept_total} of their {total} channels/heads kept"]
        lines.append(format_table(("group", "kept/total", "layers", "why not pruned"), rows, right=(0,)))
        if self.dense_weights:
            lines.append(f"weights of this pruner left dense: {len(self.dense_weights)}")
            by_reason: dict[str, list[str]] = {}
            for w in self.dense_weights:
                by_reason.setdefault(self.dense_reasons.get(w, "reason unknown"), []).append(w)
            for reason, ws in by_reason.items():
                lines.append(f"  {_short(ws, 3)}: {reason}")
        return "\n".join(lines)


class ChannelReports(dict):
    """``channel_report``'s answer: pruner name -> :class:`ChannelReport`; prints as one table per pruner."""

    def __str__(self) -> str:
        return "\n\n".join(str(r) for r in self.values())

    def to_dict(self) -> dict[str, dict[str, object]]:
        return {name: r.to_dict() for name, r in self.items()}


def _plain_list(reasons: list[str]) -> list[str]:
    out: dict[str, None] = {}
    for r in reasons:
        out[plain_reason(r)] = None
    return list(out)


def _common_prefix_trimmed(layers: list[str]) -> list[str]:
    """``a.b.query, a.b.key`` -> ``a.b.query, .key``: one long path, then what differs."""
    if len(layers) < 2:
        return layers
    first = layers[0].split(".")
    out = [layers[0]]
    for name in layers[1:]:
        parts = name.split(".")
        i = 0
        while i < min(len(parts), len(first)) - 1 and parts[i] == first[i]:
            i += 1
        out.append(("." if i else "") + ".".join(parts[i:]))
    return out


def _short(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


@dataclass
class ChannelPlan:
    """Channel groups of one prepared model and, per group, the pruner allowed to prune it (or None)."""

    channels: ChannelGraph
    masked: dict[str, MaskedParameter]  # tensor name -> masked module, for every pruned tensor in a group
    owner: dict[str, str]  # pruned tensor name -> pruner name
    eligible: dict[int, str]  # group index -> pruner that prunes it
    reports: dict[str, ChannelReport]
    channel_pruners: tuple[str, ...]
    # prepare's example_inputs as (args, kwargs): convert(physical=True) checks the shrunk model on them
    example: tuple[tuple, dict] | None = None
    # norms of prunable groups, computed over their kept channels (fxprune.structured.norms):
    # name -> (module, its layout, the channel id at each of its positions, its group)
    norms: dict[str, tuple[nn.Module, NormSpec, torch.Tensor, int]] = field(default_factory=dict)

    def groups_of(self, pruner: str) -> list[ChannelGroup]:
        return [g for g in self.channels.groups if self.eligible.get(g.index) == pruner]

    def removed(self, group: ChannelGroup) -> torch.Tensor:
        """Channels (local indices into ``group.channels``) whose every masked slice is fully pruned."""
        from fxprune.structured.importance import kept_entries  # noqa: PLC0415

        return (kept_entries(self, group) == 0).nonzero().reshape(-1)


def channel_plan_of(prepared: nn.Module) -> ChannelPlan | None:
    """The plan attached by ``prepare`` (``None`` if no pruner uses ``pattern: channel``)."""
    return prepared.__dict__.get(_ATTR)


def channel_report(prepared: nn.Module) -> ChannelReports:
    """What channel pruning can and cannot do on this prepared model, per channel pruner.

    A dict of :class:`ChannelReport` by pruner name; ``print()`` it for a
    table, ``.to_dict()`` for plain data. The kept counts are read from the
    masks now.
    """
    plan = channel_plan_of(prepared)
    if plan is None:
        raise ValueError("this model has no channel pruner (no pruner with 'pattern: channel')")
    for report in plan.reports.values():
        report.kept = {gid: plan.channels.groups[gid].size - len(plan.removed(plan.channels.groups[gid]))
                       for gid, _, _ in report.prunable}
    return ChannelReports(plan.reports)


def attach_channel_plan(
    prepared: fx.GraphModule,
    channel_pruners: list[str] | tuple[str, ...],
    example: tuple[tuple, dict] | None = None,
) -> ChannelPlan:
    """Analyse ``prepared`` and keep the plan on it; called by ``prepare`` for channel pruners.

    Every target of a channel pruner gets a reference to the plan, because
    the mask update sees only the masked modules of one pruner. ``example``
    (``prepare``'s ``example_inputs`` as ``(args, kwargs)``) lets attention
    modules be proven with the arguments they really get.
    """
    pruner = prepared.pruner
    masked_by_name: dict[str, MaskedParameter] = {}
    owner: dict[str, str] = {}
    for t in pruner.targets:
        masked_by_name[t.name] = t.masked
        owner[t.name] = t.pruner
    aliases = {}
    for name, mod in prepared.named_modules(remove_duplicate=False):
        if isinstance(mod, MaskedParameter):
            aliases[name] = mod
    canonical = {id(m): n for n, m in masked_by_name.items()}

    def tensor_of(name: str) -> torch.Tensor | None:
        try:
            obj = prepared.get_submodule(name)
        except AttributeError:
            obj = None
        if isinstance(obj, MaskedParameter):
            return obj.param
        prefix, _, attr = name.rpartition(".")
        try:
            mod = prepared.get_submodule(prefix) if prefix else prepared
        except AttributeError:
            return None
        t = getattr(mod, attr, None)
        if isinstance(t, MaskedParameter):
            return t.param
        return t if isinstance(t, torch.Tensor) else None

    calls = record_attention_calls(prepared, *example) if example is not None else None
    attention = AttentionMemo(calls)  # proven once, used by the tracer (as leaves) and by the analysis
    untraced: dict[str, str] = {}  # module -> why it could not be traced (the analysis looked inside)
    graphs = list(_graphs(prepared, attention, untraced, example))
    cg = build_channel_graph(prepared, graphs, tensor_of, attention)

    # Canonical names for masked tensors reached under an alias (tied weights).
    for grp in cg.groups:
        for s in grp.slices:
            m = aliases.get(s.tensor)
            if m is not None and id(m) in canonical:
                s.tensor = canonical[id(m)]

    eligible: dict[int, str] = {}
    reports = {p: ChannelReport(p) for p in channel_pruners}
    for grp in cg.groups:
        pruners = {owner[s.tensor] for s in grp.slices if s.tensor in owner}
        mine = pruners & set(channel_pruners)
        if not mine:
            continue
        reasons = list(grp.blockers)
        if len(pruners) > 1:
            reasons.append(f"its tensors are pruned by several pruners ({', '.join(sorted(pruners))})")
        unpruned = [w for w in grp.weights() if w not in owner]
        if unpruned:
            reasons.append(f"weights not selected by pruner {sorted(mine)[0]!r}: {_short(unpruned)}")
        if grp.size < 2:
            reasons.append("a single channel (removing it would empty the layer)")
        heads = any(s.kind == OUT_BLOCK for s in grp.slices)
        for p in mine:
            if heads:
                reports[p].head_groups.add(grp.index)
            if reasons:
                reports[p].excluded.append((grp.index, grp.size, grp.layers(), reasons))
            else:
                reports[p].prunable.append((grp.index, grp.size, grp.layers()))
                eligible[grp.index] = p
    covered = {s.tensor for g in cg.groups if g.index in eligible for s in g.slices}
    in_groups = {s.tensor for g in cg.groups for s in g.slices}
    for name, p in owner.items():
        if p in reports and name not in covered:
            reports[p].dense_weights.append(name)
            if name in in_groups:
                reports[p].dense_reasons[name] = "its groups are excluded (see above)"
            else:
                reports[p].dense_reasons[name] = _why_not_reached(prepared, name, cg.weight_notes, untraced, attention)

    plan = ChannelPlan(cg, masked_by_name, owner, eligible, reports, tuple(channel_pruners), example)
    _install_norms(prepared, plan)
    _unpack_transformer_encoders(prepared, covered)
    prepared.__dict__[_ATTR] = plan
    for name, p in owner.items():
        if p in channel_pruners:
            masked_by_name[name].__dict__[_ATTR] = plan
    return plan


def _unpack_transformer_encoders(prepared: nn.Module, pruned: set[str]) -> None:
    """Keep every ``nn.TransformerEncoder`` whose layers lose channels off their nested-tensor path.

    With ``enable_nested_tensor`` (the default), an encoder in eval mode packs
    a padded batch into a nested tensor, which the masked norms (and, after
    ``convert``, :class:`~fxprune.structured.multihead.PrunedMultiheadAttention`)
    cannot take; the packed path is also the fused kernel that assumes the
    full head count. ``use_nested_tensor = False`` runs the same layers on the
    padded batch instead: the same outputs at every real token; padded
    positions hold what the layers compute there rather than the packed
    path's zeros.
    """
    for name, module in prepared.named_modules():
        if isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False):
            if any(t.startswith(f"{name}.") for t in pruned):
                module.use_nested_tensor = False


def _install_norms(prepared: nn.Module, plan: ChannelPlan) -> None:
    """Norms of prunable groups get the masked forward (all channels kept until the first mask update)."""
    if not plan.channels.norms:
        return
    n = 1 + max(int(g.id_tensor()[-1]) for g in plan.channels.groups if g.size)
    group_of = torch.full((n,), -1, dtype=torch.long)
    for g in plan.channels.groups:
        group_of[g.id_tensor()] = g.index
    for name, (spec, chans) in plan.channels.norms.items():
        gid = int(group_of[chans[0]])
        if gid not in plan.eligible:
            continue
        module = prepared.get_submodule(name)
        install_masked_norm(module, spec)
        plan.norms[name] = (module, spec, chans, gid)


def _why_not_reached(prepared: nn.Module, name: str, notes: dict[str, str], untraced: dict[str, str],
                     attention: AttentionMemo) -> str:
    """Why no channel group holds weight ``name``: attention it cannot prove, the op that read it, or untraceable code."""
    parts = name.split(".")
    for i in range(len(parts) - 2, 0, -1):  # the innermost attention-like module holding the weight
        prefix = ".".join(parts[:i])
        try:
            mod = prepared.get_submodule(prefix)
        except AttributeError:
            continue
        why = refusal(mod) if attention(mod) is None else None
        if why is not None:
            return f"{prefix}: {why}"
    if name in notes:
        return f"read by an op the analysis does not follow: {notes[name]}"
    owner = name.rpartition(".")[0]
    inside = [m for m in untraced if m and (name.startswith(m + ".")) and m != owner]
    if inside:
        m = max(inside, key=len)
        cls = type(prepared.get_submodule(m)).__name__
        return f"inside {m} ({cls}), which could not be traced for the analysis ({untraced[m]})"
    return "no traced graph reads it (a fallback leaf, or code the analysis cannot see)"


def _graphs(prepared: fx.GraphModule, attention: AttentionMemo, untraced: dict[str, str],
            example: tuple[tuple, dict] | None):
    """The prepared graph, plus fx traces of the leaves (or the root) that hide pruned weights.

    A root that fx could not trace is recorded on the example instead, whole
    (:mod:`fxprune.structured.record`), so that streams crossing its Python
    code are seen; without an example, or if that run fails, its parts are
    traced one by one.
    """
    report = prepared.pruner.prepare_report
    if not report.traced and example is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield record_graph(prepared._fxprune_original.module, example, _leaf_rule(attention)), ""
            return
        except Exception:  # noqa: BLE001 - fall back to tracing the parts
            pass
    if report.traced:
        hidden = list(report.fallback_leaves)
        graph = _root_graph(prepared, attention, hidden)
        if example is not None:
            _annotate_ranks(prepared, graph, example)
        yield graph, ""
    else:
        hidden = [""]
    for name in hidden:
        yield from _trace_down(prepared, name, attention, untraced)


class _Ranks(fx.Interpreter):
    """Runs a graph and writes each node's tensor rank into ``node.meta["ndim"]``."""

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["ndim"] = out.dim()
        return out


def _annotate_ranks(prepared: fx.GraphModule, graph: fx.Graph, example: tuple[tuple, dict]) -> None:
    """Write each node's tensor rank into ``node.meta["ndim"]`` by running ``graph`` on the example.

    A traced graph does not know ranks, so a reduction written with a
    positive dim (``x.mean(dim=1)`` pooling a ``(batch, seq, channels)``
    stream) cannot be placed relative to the channel dim and would block the
    stream; a recorded graph has the ranks already. ``graph`` is ``prepare``'s
    own or a trace of the original module (:func:`_root_graph`). Without an
    example, or if the graph does not run on it, nothing is annotated and such
    reductions stay blocked.
    """
    args, kwargs = example
    inputs = []
    for i, node in enumerate(n for n in graph.nodes if n.op == "placeholder"):
        if i < len(args):
            inputs.append(args[i])
        elif node.target in kwargs:
            inputs.append(kwargs[node.target])
        elif node.args:
            inputs.append(node.args[0])
        else:
            return
    root = prepared if graph is prepared.graph else prepared._fxprune_original.module
    try:
        with torch.no_grad(), leaving_no_trace(root), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _Ranks(root if root is prepared else fx.GraphModule(root, graph)).run(*inputs)
    except Exception:  # noqa: BLE001 - ranks are a refinement; the analysis works without them
        for n in graph.nodes:
            n.meta.pop("ndim", None)


def _leaf_rule(attention: AttentionMemo):
    """The modules a recorded run keeps whole: what fx keeps as leaves, masked weights, proven attention and norms."""
    tracer = fx.Tracer()

    def is_leaf(m: nn.Module, name: str) -> bool:
        # Hugging Face Conv1D and Linear subclasses that compute F.linear are layers here, as in the fx tracer.
        return (isinstance(m, MaskedParameter) or attention(m) is not None or attention.norms(m) is not None
                or is_conv1d(m) or _acts_as_linear(m) or tracer.is_leaf_module(m, name))
    return is_leaf


def _root_graph(prepared: fx.GraphModule, attention: AttentionMemo, leaves: list[str]) -> fx.Graph:
    """``prepare``'s graph, or a trace with attention modules kept whole where the model has proven ones.

    ``prepare`` traces through every module that owns pruned weights, so its
    graph has no attention module boundaries left, and a head is only a
    reshape there (and ``nn.TransformerEncoderLayer`` stays a leaf, hiding
    its attention). The alternative trace keeps the same fallback leaves (they
    are analysed on their own); if it fails, heads are simply not pruned.
    """
    root = prepared._fxprune_original.module
    if any(attention(m) is not None or isinstance(m, TRACED_TORCH_LAYERS) for m in root.modules()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return trace_for_channels(root, attention=attention, leaves=set(leaves))
        except Exception:  # noqa: BLE001 - keep prepare's graph
            pass
    return prepared.graph


def _trace_down(prepared: nn.Module, name: str, attention: AttentionMemo, untraced: dict[str, str]):
    """Trace a module for the analysis; if it cannot be traced, its children one by one."""
    module = prepared.get_submodule(name) if name else prepared._fxprune_original.module
    error = ""
    if name and attention(module) is not None:  # a proven attention module: analysed whole, as a leaf
        parent, _, child = name.rpartition(".")
        g = fx.Graph()
        g.output(g.call_module(child, (g.placeholder("x"),)))
        yield g, (parent + "." if parent else "")
        return
    if name:
        for first_input_only in (False, True):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    graph = trace_for_channels(module, first_input_only=first_input_only, attention=attention)
            except Exception as e:  # noqa: BLE001 - untraceable: try the next way, then look inside
                error = error or f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                continue
            yield graph, name + "."
            return
    untraced[name] = error or "its forward is not traceable"
    for child, sub in module.named_children():
        if isinstance(sub, MaskedParameter):  # a weight of this module, not code to trace
            continue
        if any(isinstance(m, MaskedParameter) for m in sub.modules()):
            yield from _trace_down(prepared, f"{name}.{child}" if name else child, attention, untraced)
