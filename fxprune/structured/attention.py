"""Attention heads as prunable channels: recognise a multi-head attention module, and prove it.

Head structure is invisible to the channel analysis: a forward splits the
projection's features into ``(heads, head_dim)`` with a reshape, and a
reshape blocks channels. So attention modules are recognised by what they
hold -- ``nn.Linear`` query/key/value projections (``query``/``key``/``value``,
``q_proj``/``k_proj``/``v_proj``, ``q_lin``/``k_lin``/``v_lin``) of the same
width, an optional output projection inside the module (``o_proj``,
``out_proj``, ``out_lin``, ``dense``), and a head size or head count
attribute -- and then *proven*: a copy with one head cut out (its
query/key/value rows and output-projection columns, and the head-count
attributes the forward reads updated) must give the original's output,
without that head's columns where the output projection is outside. A module
that looks like attention but fails the proof is traced like any other code,
so its channels are followed or blocked as usual; nothing is guessed.

Where the module is a leaf of the analysis, a head is one *channel*: its
rows of the three projections (``out_block`` slices) and its columns of the
output projection (``in_block``). The output projection is the module's own
or, as in Hugging Face BERT, the next linear layer its output reaches.

``nn.MultiheadAttention`` cannot lose heads: its forward requires
``num_heads * head_dim == embed_dim``, so fewer heads would mean a narrower
residual stream. The analysis reports it instead.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fxprune.trace import leaving_no_trace

__all__ = ["AttentionSpec", "attention_spec", "is_candidate", "record_attention_calls", "refusal",
           "set_head_attributes"]

_PROJECTIONS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))
_OUTPUTS = ("o_proj", "out_proj", "out_lin", "dense")
_HEAD_DIM_ATTRS = ("attention_head_size", "head_dim", "dim_per_head", "head_size")
_HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
_KV_HEAD_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_WIDTH_ATTRS = ("all_head_size", "inner_dim")


@dataclass(frozen=True)
class AttentionSpec:
    """How one attention module holds its heads (child names relative to the module)."""

    q: str
    k: str
    v: str
    out: str | None  # output projection inside the module, or None: the next linear layer outside
    heads: int
    head_dim: int
    hidden: int  # input features
    returns_tuple: bool  # forward returns (output, ...) rather than a tensor
    head_count_attrs: tuple[str, ...]
    width_attrs: tuple[str, ...]
    group: int = 1  # query heads per key/value head (grouped-query attention); a channel is one such group
    kv_count_attrs: tuple[str, ...] = ()
    # Proven separately from the heads (see _reads_and_returns): whether the module's input reaches its
    # output only through q/k/v, and whether its output is the output projection's and nothing else.
    # ALBERT's attention returns LayerNorm(input + dense(context)): heads exact, input and output not free.
    input_only_qkv: bool = True
    output_is_projection: bool = True

    @property
    def channels(self) -> int:
        """Prunable units: heads, or key/value groups (one k/v head and its ``group`` query heads)."""
        return self.heads // self.group


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = module._modules.get(name)
    return child if isinstance(child, nn.Linear) and type(child).forward is nn.Linear.forward else None


def _projections(module: nn.Module) -> tuple[tuple[str, str, str], nn.Linear, nn.Linear, nn.Linear] | None:
    """The query/key/value ``nn.Linear`` children of ``module`` under one of the known naming schemes."""
    if isinstance(module, nn.MultiheadAttention):
        return None
    for names in _PROJECTIONS:
        q, k, v = (_linear(module, n) for n in names)
        if q is not None and k is not None and v is not None:
            return names, q, k, v
    return None


def _grouped(q: nn.Linear, k: nn.Linear, v: nn.Linear) -> bool:
    """Key and value of one width that divides the query width (equal: plain multi-head; smaller: GQA)."""
    kv_width = k.out_features
    return (v.out_features == kv_width and k.in_features == v.in_features and kv_width > 0
            and not q.out_features % kv_width)


def _candidate(module: nn.Module) -> AttentionSpec | None:
    """The spec that ``module``'s attributes suggest (unproven), or None."""
    found = _projections(module)
    if found is None or not _grouped(*found[1:]):
        return None
    names, q, k, _ = found
    width, hidden, kv_width = q.out_features, q.in_features, k.out_features
    head_dim = next((getattr(module, a) for a in _HEAD_DIM_ATTRS
                     if isinstance(getattr(module, a, None), int) and getattr(module, a) > 0), None)
    count_attrs = tuple(a for a in _HEAD_COUNT_ATTRS if isinstance(getattr(module, a, None), int))
    if head_dim is None and count_attrs:
        heads = getattr(module, count_attrs[0])
        head_dim = width // heads if heads > 0 and width % heads == 0 else None
    if head_dim is None or width % head_dim or kv_width % head_dim:
        return None
    heads, kv_heads = width // head_dim, kv_width // head_dim
    if kv_heads < 2:
        return None
    count_attrs = tuple(a for a in count_attrs if getattr(module, a) == heads)
    kv_attrs = tuple(a for a in _KV_HEAD_COUNT_ATTRS if getattr(module, a, None) == kv_heads)
    width_attrs = tuple(a for a in _WIDTH_ATTRS if getattr(module, a, None) == width)
    out = next((o for o in _OUTPUTS if _linear(module, o) is not None and _linear(module, o).in_features == width),
               None)
    return AttentionSpec(names[0], names[1], names[2], out, heads, head_dim, hidden, False, count_attrs,
                         width_attrs, heads // kv_heads, kv_attrs)


def set_head_attributes(module: nn.Module, spec: AttentionSpec) -> None:
    """After cutting heads out of the weights, make the head counts the forward reads agree.

    (The projections' own ``in_features``/``out_features`` are the cutter's business.)
    """
    q = module.get_submodule(spec.q)
    heads = q.weight.shape[0] // spec.head_dim
    for a in spec.head_count_attrs:
        setattr(module, a, heads)
    for a in spec.kv_count_attrs:
        setattr(module, a, module.get_submodule(spec.k).weight.shape[0] // spec.head_dim)
    for a in spec.width_attrs:
        setattr(module, a, heads * spec.head_dim)


def _plain_copy(module: nn.Module) -> nn.Module:
    """A copy that runs the module's own Python forward on plain parameters (no masks, hooks or graphs)."""
    from fxprune.masked import MaskedParameter  # noqa: PLC0415 - avoid an import cycle

    c = copy.deepcopy(module)
    for m in c.modules():
        m.__dict__.pop("forward", None)
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                      "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
            getattr(m, hooks, {}).clear()
        for n, child in list(m._modules.items()):
            if isinstance(child, MaskedParameter):
                del m._modules[n]
                m._parameters[n] = nn.Parameter(child.param.detach().clone(), requires_grad=False)
    return c.eval()


def _kept(n_blocks: int, block: int, cut: int) -> torch.Tensor:
    keep = torch.ones(n_blocks * block, dtype=torch.bool)
    keep[cut * block:(cut + 1) * block] = False
    return keep.nonzero().reshape(-1)


def _cut_head(module: nn.Module, spec: AttentionSpec, channel: int) -> None:
    """Cut one channel (a head, or a key/value group with its query heads) out of the projections."""
    d, g, n = spec.head_dim, spec.group, spec.channels
    q_rows, kv_rows = _kept(n, g * d, channel), _kept(n, d, channel)
    with torch.no_grad():
        for name, rows in ((spec.q, q_rows), (spec.k, kv_rows), (spec.v, kv_rows)):
            lin = module.get_submodule(name)
            lin.weight = nn.Parameter(lin.weight.index_select(0, rows), requires_grad=False)
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias.index_select(0, rows), requires_grad=False)
            lin.out_features = len(rows)
        if spec.out is not None:
            lin = module.get_submodule(spec.out)
            lin.weight = nn.Parameter(lin.weight.index_select(1, q_rows), requires_grad=False)
            lin.in_features = len(q_rows)
    set_head_attributes(module, spec)


def _first(out: object) -> torch.Tensor | None:
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out if isinstance(out, torch.Tensor) else None


def refusal(module: nn.Module) -> str | None:
    """Why a module that holds query/key/value projections gets no heads pruned (None if it does not hold them)."""
    found = _projections(module)
    if found is None:
        return None
    names, q, k, v = found
    if not _grouped(q, k, v):
        return (f"attention whose key/value width ({names[1]}/{names[2]}: {k.out_features}, "
                f"{v.out_features}) does not divide the query width ({q.out_features}) into groups")
    if _candidate(module) is None:
        return "attention without a head size or head count attribute fxprune knows"
    return ("attention whose forward did not give the same output with one head cut out (it may read the "
            "head count as a constant, or need arguments the proof could not supply: pass example_inputs)")


def is_candidate(module: nn.Module) -> bool:
    """Does ``module`` look like multi-head attention (before any proof)?"""
    return _candidate(module) is not None


def attention_spec(module: nn.Module, call: tuple[tuple, dict] | None = None) -> AttentionSpec | None:
    """The proven head layout of ``module``, or None (not attention, or removing a head is not exact).

    The proof calls the module with a random input alone, or -- when
    ``prepare`` got ``example_inputs`` -- exactly as the example run called it
    (``call``: its recorded arguments), which is what forwards that need more
    than their input (Llama's ``position_embeddings``) require.
    """
    spec = _candidate(module)
    if spec is None:
        return None
    try:
        base = _plain_copy(module)
        ref = base.get_submodule(spec.q).weight
        if call is None:
            x = torch.randn(2, 5, spec.hidden, generator=torch.Generator().manual_seed(0)).to(ref)
            call = ((x,), {})

        def run(m: nn.Module) -> object:  # a fresh copy of the call each time: caches in it get updated
            args, kwargs = copy.deepcopy(call)
            return m(*args, **kwargs)

        with torch.no_grad():
            raw = run(base)
            full = _first(raw)
            last = spec.channels - 1
            w = spec.group * spec.head_dim  # context columns per channel
            if spec.out is not None:  # the masked model: the channel's output-projection columns are zero
                base.get_submodule(spec.out).weight[:, last * w:(last + 1) * w] = 0
                expected = _first(run(base))
            else:
                expected = None if full is None else full[..., : last * w]
            cut = _plain_copy(module)
            _cut_head(cut, spec, last)
            got = _first(run(cut))
    except Exception:  # noqa: BLE001 - any failure means: not provably head-prunable
        return None
    if expected is None or got is None or got.shape != expected.shape:
        return None
    if spec.out is None and full.shape[-1] != spec.heads * spec.head_dim:
        return None
    if not _close(got, expected):
        return None
    input_only, output_fresh = _reads_and_returns(module, spec, call, full)
    return AttentionSpec(spec.q, spec.k, spec.v, spec.out, spec.heads, spec.head_dim, spec.hidden,
                         isinstance(raw, (tuple, list)), spec.head_count_attrs, spec.width_attrs, spec.group,
                         spec.kv_count_attrs, input_only, output_fresh)


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return got.shape == expected.shape and torch.allclose(
        got, expected, rtol=1e-4, atol=1e-5 * max(1.0, float(expected.abs().max())))


def _module_input(module: nn.Module, call: tuple[tuple, dict]) -> tuple[torch.Tensor | None, Callable]:
    """The module's first argument in ``call`` and a function that puts another tensor in its place."""
    args, kwargs = call
    if args:
        return (args[0] if isinstance(args[0], torch.Tensor) else None), lambda x: ((x, *args[1:]), kwargs)
    try:
        first = next(iter(list(inspect.signature(type(module).forward).parameters)[1:]), None)
    except (TypeError, ValueError):
        first = None
    x = kwargs.get(first) if first is not None else None
    return (x if isinstance(x, torch.Tensor) else None), lambda x: (args, {**kwargs, first: x})


def _reads_and_returns(module: nn.Module, spec: AttentionSpec, call: tuple[tuple, dict],
                       full: torch.Tensor) -> tuple[bool, bool]:
    """Prove the two things the analysis assumes besides the heads; False where it cannot.

    *Input only through q/k/v*: each projection is called on the module's
    input itself, and the output does not move when the module gets another
    input while the projections keep seeing the original (no residual, no
    norm of the input inside the module). *Output is the projection's*:
    the module returns exactly what its output projection returned (with no
    output projection inside, the head proof already showed the output is the
    context itself).
    """
    x, replace = _module_input(module, call)
    if x is None or x.shape[-1] != spec.hidden:
        return False, spec.out is None
    probe = _plain_copy(module)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    names = (spec.q, spec.k, spec.v) + ((spec.out,) if spec.out is not None else ())

    def record(name: str):
        def hook(_m: nn.Module, a: tuple, out: torch.Tensor) -> None:
            seen.setdefault(name, (a[0], out))
        return hook

    def pin(name: str):  # the projection sees the original input whatever the module got
        return lambda _m, a: (seen[name][0], *a[1:])

    try:
        with torch.no_grad():
            handles = [probe.get_submodule(n).register_forward_hook(record(n)) for n in names]
            args, kwargs = copy.deepcopy(call)
            probe(*args, **kwargs)
            for h in handles:
                h.remove()
            fed_x = all(n in seen and seen[n][0].shape == x.shape and torch.equal(seen[n][0], x)
                        for n in (spec.q, spec.k, spec.v))
            output_fresh = spec.out is None or (spec.out in seen and _close(full, seen[spec.out][1]))
            input_only = False
            if fed_x:
                other = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x) * (
                    1.0 + float(x.abs().max()))
                handles = [probe.get_submodule(n).register_forward_pre_hook(pin(n)) for n in (spec.q, spec.k, spec.v)]
                args, kwargs = copy.deepcopy(replace(other))
                moved = _first(probe(*args, **kwargs))
                for h in handles:
                    h.remove()
                input_only = moved is not None and _close(moved, full)
    except Exception:  # noqa: BLE001 - whatever cannot be run cannot be proven
        return False, False
    return input_only, output_fresh


def record_attention_calls(model: nn.Module, args: tuple, kwargs: dict) -> dict[int, tuple[tuple, dict]]:
    """Run ``model`` once (eval, no grad) and keep the first call of every attention-like module.

    Keyed by ``id(module)``; tensors are detached copies. Buffers and the
    global RNG are left as they were.
    """
    calls: dict[int, tuple[tuple, dict]] = {}
    candidates = [m for m in model.modules() if m is not model and is_candidate(m)]
    if not candidates:
        return calls

    def hook(module: nn.Module, a: tuple, kw: dict) -> None:
        if id(module) not in calls:
            try:  # a snapshot: caches passed along (KV caches) are updated by the call itself
                calls[id(module)] = copy.deepcopy((a, kw))
            except Exception:  # noqa: BLE001 - not copyable: prove it with the input alone
                pass

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in candidates]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), leaving_no_trace(model):
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - no recorded calls: the proof falls back to the input alone
        calls.clear()
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return calls
