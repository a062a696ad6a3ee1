"""The tracer, its leaf policy, and the per-submodule fallback.

Leaf policy, decided once: torch.nn layers are fx leaves (as in plain
``symbolic_trace``), except the layers whose forward is a single functional
call on their weight -- Linear, Bilinear, Conv*d, ConvTranspose*d, Embedding
-- when they own a parameter we prune. Those are traced through, so that their
weights become ``get_attr`` nodes and can be replaced by masked-parameter
calls in the graph. Layers with training-time behaviour (BatchNorm, Dropout)
or Python-heavy forwards (MultiheadAttention, RNNs) stay leaves; their
parameters are masked at module level by :mod:`fxprune.rewrite`.

Fallback, in two levels:

* When tracing raises inside a submodule's forward (data-dependent control
  flow, Proxy misuse), that submodule becomes a leaf and tracing starts
  again; it is reported with the reason.
* When a module's *own* forward cannot be traced (the model's root, or such a
  fallback leaf), its forward stays Python and each of its children is
  captured on its own, recursively: the per-submodule fallback. A child is
  traced *specialized to the call seen in an example run* -- tensors become
  graph inputs, every other argument (``None``, flags, sizes) a constant --
  because a child traced with every argument symbolic would assume, for
  instance, that an ``attention_mask=None`` is a tensor. Without an example
  run (``prepare(..., example_inputs=None)``) nothing is known about how
  children are called, so the module stays Python as a whole and its weights
  are masked at module level.

:func:`capture_model` returns the result as a flat list of :class:`Capture`
nodes (the module tree annotated with what each part became).
"""
from __future__ import annotations

import contextlib
import difflib
import keyword
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

__all__ = [
    "TRACE_THROUGH_TYPES",
    "CallSpec",
    "Capture",
    "CaptureResult",
    "capture_model",
    "leaving_no_trace",
    "record_calls",
    "output_tensors",
]

#: Layers traced through when they own a pruned parameter; all are pure functions of their weights.
TRACE_THROUGH_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
)

#: Non-tensor argument values a captured call may be specialized to (compared by type and value).
_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)


# ----------------------------------------------------------------------------- call specs
@dataclass(frozen=True)
class CallSpec:
    """How a module was called, tensors left as holes.

    The call's ``(args, kwargs)`` are flattened with ``torch.utils._pytree``:
    ``treespec`` is their structure, ``consts`` holds ``(True, name)`` for a tensor leaf
    (a graph input) and ``(False, value)`` for a constant leaf.
    """

    treespec: pytree.TreeSpec
    consts: tuple[tuple[bool, Any], ...]

    @staticmethod
    def of(module: nn.Module, args: tuple, kwargs: dict) -> "CallSpec | str":
        """The spec of one call, or a reason why it cannot be specialized.

        The call is taken exactly as made (positional and keyword arguments as
        passed, no signature binding): a parent calls its child the same way
        every time, and decorated HF forwards make signatures unreliable.
        """
        leaves_with_path, treespec = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
        consts: list[tuple[bool, Any]] = []
        used: set[str] = set()
        for path, leaf in leaves_with_path:
            where = _describe(path)
            if isinstance(leaf, torch.Tensor):
                consts.append((True, _identifier(where, used)))
            elif type(leaf) in _CONSTANT_TYPES:
                consts.append((False, leaf))
            else:
                return f"argument {where} is a {type(leaf).__name__}, not a tensor or a constant"
        return CallSpec(treespec, tuple(consts))

    def tensor_names(self) -> list[str]:
        return [v for is_tensor, v in self.consts if is_tensor]

    def match(self, module: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
        """The tensor leaves of a call in graph-input order, or ``None`` if the call does not fit this spec."""
        leaves, treespec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if treespec != self.treespec:
            return None
        tensors = []
        for leaf, (is_tensor, want) in zip(leaves, self.consts):
            if is_tensor:
                if not isinstance(leaf, torch.Tensor):
                    return None
                tensors.append(leaf)
            elif type(leaf) is not type(want) or not (leaf is want or leaf == want):
                return None
        return tensors

    def difference(self, args: tuple, kwargs: dict) -> str:
        """What makes a call not fit this spec, in words: the argument, and its value or type vs the example's."""
        example_args, example_kwargs = pytree.tree_unflatten([_Hole(c) for c in self.consts], self.treespec)
        if len(args) != len(example_args):
            return f"{len(args)} positional argument(s) where the example passed {len(example_args)}"
        missing = [k for k in example_kwargs if k not in kwargs]
        extra = [k for k in kwargs if k not in example_kwargs]
        if missing or extra:
            parts = ([f"without {', '.join(missing)}"] if missing else []) + (
                [f"with {', '.join(extra)} (not in the example)"] if extra else [])
            return "called " + " and ".join(parts)
        leaves_with_path, treespec = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
        if treespec != self.treespec:
            got = {_describe(p) for p, _ in leaves_with_path}
            want = {_describe(p) for p, _ in pytree.tree_flatten_with_path((example_args, example_kwargs))[0]}
            odd = sorted(got ^ want)
            return f"argument(s) nested differently from the example ({', '.join(odd[:3]) or 'containers'})"
        for (path, leaf), (is_tensor, want) in zip(leaves_with_path, self.consts):
            where = _describe(path)
            if is_tensor and not isinstance(leaf, torch.Tensor):
                return f"{where} is {_show(leaf)} where the example passed a tensor"
            if not is_tensor and isinstance(leaf, torch.Tensor):
                return f"{where} is a tensor where the example passed {_show(want)}"
            if not is_tensor and (type(leaf) is not type(want) or not (leaf is want or leaf == want)):
                return f"{where} is {_show(leaf)} where the example passed {_show(want)}"
        return "no difference found"

    def call_arguments(self, tensors: tuple) -> tuple[tuple, dict]:
        """Rebuild ``(args, kwargs)`` of the call from its tensors (used while tracing)."""
        it = iter(tensors)
        leaves = [next(it) if is_tensor else value for is_tensor, value in self.consts]
        return pytree.tree_unflatten(leaves, self.treespec)


class _Hole:
    """A leaf of the example call, rebuilt for :meth:`CallSpec.difference`."""

    def __init__(self, const: tuple[bool, Any]):
        self.const = const


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _describe(path: tuple) -> str:
    """``args[0]``, ``attention_mask`` or ``position_embeddings[1]`` for a leaf of ``(args, kwargs)``."""
    text = pytree.keystr(path[1:])
    if path and getattr(path[0], "idx", None) == 0:
        return "args" + text
    return re.sub(r"^\['([^']*)'\]", r"\1", text)


def _identifier(keypath: str, used: set[str]) -> str:
    name = re.sub(r"\W+", "_", keypath).strip("_") or "arg"
    if name[0].isdigit() or keyword.iskeyword(name):
        name = f"arg_{name}"
    base, i = name, 1
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


@torch.no_grad()
def record_calls(model: nn.Module, args: tuple, kwargs: dict) -> dict[int, list[CallSpec | str]]:
    """Run ``model`` once and note how every submodule is called (keyed by ``id(module)``).

    Buffers (BatchNorm statistics, caches) are restored afterwards and the
    global RNG is left untouched, so the run leaves no trace on the model.
    """
    calls: dict[int, list[CallSpec | str]] = {}

    def hook(module: nn.Module, a: tuple, kw: dict) -> None:
        spec = CallSpec.of(module, a, kw)
        seen = calls.setdefault(id(module), [])
        if spec not in seen:
            seen.append(spec)
        # Called from inside torch.utils.checkpoint: note whose forward made that checkpoint call. A
        # trace may take another branch (timm's ViT checkpoints only when ``attn_mask`` is None, and fx
        # passes a proxy for it), so the example run is what says where checkpointing happens.
        frame = _checkpoint_frame(sys._getframe(1))
        caller = _module_calling(frame) if frame is not None else None
        if caller is not None:
            theirs = calls.setdefault(id(caller), [])
            if CHECKPOINTS not in theirs:
                theirs.append(CHECKPOINTS)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if m is not model]
    # the root's own calls are not recorded, but it may be the module that checkpoints
    try:
        with leaving_no_trace(model):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


@contextlib.contextmanager
def leaving_no_trace(model: nn.Module) -> Iterator[None]:
    """Run something on ``model`` and put its buffers (BatchNorm statistics, caches) and the global RNG back."""
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model output (tensors, tuples, lists, dicts, HF ``ModelOutput``), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in output_tensors(v)]
    if hasattr(out, "to_tuple"):
        return output_tensors(out.to_tuple())
    return []


# ----------------------------------------------------------------------------- capture tree
@dataclass
class Capture:
    """One module of the capture tree: traced into a graph, or kept as Python.

    ``graph`` is ``None`` when the module's own forward stays Python (its
    children were captured on their own); ``spec`` is the call a child's
    graph is specialized to (``None`` for the model's root). ``leaves`` are
    the fallback leaves inside the graph (qualified names from the model
    root) with the reason each could not be traced through.
    """

    name: str
    module: nn.Module
    graph: fx.Graph | None = None
    spec: CallSpec | None = None
    reason: str | None = None
    leaves: dict[str, str] = field(default_factory=dict)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors the tracer put on the module
    output_type: type | None = None  # a dict subclass (HF ModelOutput) that fx turned into a plain dict


@dataclass
class CaptureResult:
    """Every :class:`Capture` (the root first), and modules left un-captured with the reason."""

    captures: list[Capture]
    uncaptured: dict[str, str] = field(default_factory=dict)  # name -> reason (no children captured either)

    @property
    def root(self) -> Capture:
        return self.captures[0]

    def subgraphs(self) -> list[Capture]:
        """Captured children: they run their own graph as their instance-level ``forward``."""
        return [c for c in self.captures[1:] if c.graph is not None]

    def python(self) -> list[Capture]:
        """Modules whose own forward stays Python."""
        return [c for c in self.captures if c.graph is None]

    def routes(self) -> dict[str, str]:
        """Module name -> how it was captured, for the prepare report."""
        out: dict[str, str] = {}
        for c in self.captures:
            name = c.name or "<root>"
            out[name] = "graph" if c.graph is not None else f"python ({c.reason})"
            for leaf, reason in c.leaves.items():
                out.setdefault(leaf, f"leaf ({reason})")
        for name, reason in self.uncaptured.items():
            out.setdefault(name, f"module ({reason})")
        return out


#: The reason a module whose forward calls torch.utils.checkpoint keeps its Python forward.
CHECKPOINTS = "its forward calls torch.utils.checkpoint (activation checkpointing is kept: not traced through)"


class ActivationCheckpointing(RuntimeError):
    """Symbolic tracing reached code run by ``torch.utils.checkpoint``.

    Tracing through it would inline the checkpointed part into the graph and
    silently drop the recomputation (and the memory it saves). The module
    whose forward calls checkpoint keeps its Python forward instead; its
    children are captured on their own, so the checkpointed call re-runs them
    in backward with their masks.
    """

    def __init__(self, frame: Any):
        super().__init__(CHECKPOINTS.removeprefix("its forward "))
        self.frame = frame  # the checkpoint frame: which module's forward encloses it decides the culprit


def _checkpoint_frame(frame: Any) -> Any:
    """The innermost frame of ``torch.utils.checkpoint`` code on the stack from ``frame`` up, or None."""
    while frame is not None:
        if frame.f_globals.get("__name__") == "torch.utils.checkpoint":
            return frame
        frame = frame.f_back
    return None


def _module_calling(frame: Any) -> nn.Module | None:
    """The module whose call is the nearest one around ``frame`` (via ``nn.Module._call_impl``), or None."""
    code = nn.Module._call_impl.__code__
    frame = frame.f_back
    while frame is not None:
        if frame.f_code is code:
            module = frame.f_locals.get("self")
            return module if isinstance(module, nn.Module) else None
        frame = frame.f_back
    return None


def _encloses(outer: Any, inner: Any) -> bool:
    """Whether frame ``outer`` is on the call stack of frame ``inner``."""
    while inner is not None:
        if inner is outer:
            return True
        inner = inner.f_back
    return False


class _Tracer(fx.Tracer):
    """Traces through ``trace_through`` modules and keeps ``leaves`` (both sets of module ids) as leaves."""

    def __init__(self, trace_through: set[int], leaves: set[int], leaf_types: tuple[type, ...]):
        super().__init__()
        self._trace_through = trace_through
        self._leaves = leaves
        self._leaf_types = leaf_types
        self.culprit: str | None = None  # innermost traced-through module whose forward raised

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self._leaves or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        if id(m) in self._trace_through:
            return False
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            qualname = self.path_of_module(m)
        except NameError:
            return super().call_module(m, forward, args, kwargs)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except ActivationCheckpointing as e:
            # The culprit is the innermost module whose forward called checkpoint, not the module
            # checkpoint was running (that one is traced fine on its own).
            if self.culprit is None and _encloses(sys._getframe(), e.frame):
                self.culprit = qualname
            raise
        except Exception:
            if self.culprit is None:
                self.culprit = qualname
            raise

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        frame = _checkpoint_frame(sys._getframe(1))
        if frame is not None:
            raise ActivationCheckpointing(frame)
        if name is None and target == "self":
            # A child module named ``self`` (HF BertAttention.self) would give a node named ``self``,
            # which the generated ``forward(self, ...)`` then overwrites.
            name = "self_module"
        return super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)


_SPECIALIZED = "_fxprune_specialized_forward"


def _specialized_forward(cls: type, spec: CallSpec, seen_output: list) -> Any:
    """A ``forward`` for ``cls`` that takes only the call's tensors.

    The tracer traces ``type(root).<traced_func_name>``; this function has one
    named parameter per tensor and rebuilds the full call (constants
    included) before running the class's own ``forward``. It is set on the
    class itself for the duration of a trace, not on a subclass: creating a
    subclass runs ``__init_subclass__``, and Hugging Face's checkpointing
    layers re-wrap ``forward`` there (the inner wrapper then never checkpoints,
    so the trace would not see the checkpoint call).
    """
    names = spec.tensor_names()
    src = f"def {_SPECIALIZED}(self, {', '.join(names)}):\n    return _run(self, ({', '.join(names)}{',' if names else ''}))\n"

    def _run(self: nn.Module, tensors: tuple) -> Any:
        args, kwargs = spec.call_arguments(tensors)
        out = cls.forward(self, *args, **kwargs)
        seen_output.append(type(out))
        return out

    namespace: dict[str, Any] = {"_run": _run}
    exec(compile(src, f"<fxprune specialized {cls.__name__}>", "exec"), namespace)
    return namespace[_SPECIALIZED]


def _restore_concrete_arg_names(graph: fx.Graph, concrete_args: dict[str, Any]) -> None:
    """fx names the placeholder of a specialized argument ``flag_1``: give it its own name back, so that
    ``prepared(x, flag=False)`` is accepted as the original forward (whose signature the prepared model shows)."""
    for node in graph.nodes:
        if node.op != "placeholder" or node.target in concrete_args:
            continue
        base, _, suffix = node.target.rpartition("_")
        if base in concrete_args and suffix.isdigit():
            node._rename(base)
            if node.name == base:
                node.target = base
            else:
                node._rename(node.target)  # the name is taken in the graph: keep fx's


def _trace_one(
    module: nn.Module,
    prefix: str,
    spec: CallSpec | None,
    concrete_args: dict[str, Any] | None,
    trace_through: set[int],
    leaves: set[int],
    leaf_types: tuple[type, ...],
) -> tuple[Capture, str | None]:
    """Trace ``module``, turning untraceable submodules into leaves one at a time.

    Returns the capture and, when the module's own forward is the culprit,
    the reason (the capture's graph is then ``None``).
    """
    cap = Capture(name=prefix, module=module, spec=spec)
    modules = dict(module.named_modules())
    local_leaves = set(leaves)
    def attempt(seen_output: list[type]) -> tuple[_Tracer, fx.Graph | None, Exception | None]:
        tracer = _Tracer(trace_through, local_leaves, leaf_types)
        cls = type(module)
        try:
            if spec is not None:
                setattr(cls, _SPECIALIZED, _specialized_forward(cls, spec, seen_output))
                tracer.traced_func_name = _SPECIALIZED
            try:
                graph = tracer.trace(module, concrete_args=concrete_args if spec is None else None)
                if spec is None and concrete_args:
                    _restore_concrete_arg_names(graph, concrete_args)
                # fx cannot write every signature back as Python (a keyword-only argument without a
                # default after one with a default): a graph whose code does not compile is a trace failure.
                compile(graph.python_code(root_module="self").src, "<fxprune graph>", "exec")
                return tracer, graph, None
            finally:
                if spec is not None:
                    delattr(cls, _SPECIALIZED)
        except Exception as e:  # any failure of symbolic tracing: fall back, and say why
            return tracer, None, e

    for _ in range(len(modules) + 1):
        before = set(module.__dict__)
        seen_output: list[type] = []
        tracer, graph, error = attempt(seen_output)
        if error is None:
            # A forward that reads ``self.training`` is baked into the graph in the current mode
            # only: trace in the other mode too, and keep as a leaf whatever differs.
            culprit, error = _mode_dependent(module, graph, lambda: attempt([]))
        else:
            culprit = tracer.culprit
        if error is not None:
            for name in set(module.__dict__) - before:
                del module.__dict__[name]
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            if not culprit or culprit not in modules or id(modules[culprit]) in local_leaves:
                return cap, reason
            # A forward that depends on the mode does so for every instance of its class
            # (stochastic depth, drop path): make them all leaves at once instead of one per retrace.
            same = [n for n, m in modules.items() if type(m) is type(modules[culprit])] if graph is not None else [culprit]
            for name in same:
                local_leaves.add(id(modules[name]))
                cap.leaves[_join(prefix, name)] = reason
            continue
        cap.graph = graph
        if seen_output and issubclass(seen_output[-1], dict) and seen_output[-1] is not dict:
            cap.output_type = seen_output[-1]
        if spec is not None:  # tensor constants the tracer attached to the module: the graph owns them now
            for name in set(module.__dict__) - before:
                cap.constants[name] = module.__dict__.pop(name)
        return cap, None
    raise AssertionError("fallback loop did not converge")  # each round adds a new leaf


def _mode_dependent(module: nn.Module, graph: fx.Graph, retrace: Any) -> tuple[str | None, Exception | None]:
    """``(None, None)`` if tracing in the other train/eval mode gives the same graph; else the module to make
    a leaf and why.

    The culprit is the innermost traced-through module of the first node that
    differs ("" for the module's own forward). A forward that checkpoints in
    training only (Hugging Face layers) is caught here when prepared in eval
    mode. The other trace's tensor constants are dropped; every module's mode
    is restored.
    """
    modes = [(m, m.training) for m in module.modules()]
    before = set(module.__dict__)
    module.train(not module.training)
    try:
        tracer, other, error = retrace()
        # Both traces' tensor constants are on ``module`` until the finally: compare them by value.
        theirs = None if error is not None else [_signature(n, module) for n in other.nodes]
    finally:
        for m, mode in modes:
            m.training = mode
        for name in set(module.__dict__) - before:
            del module.__dict__[name]
    differs = RuntimeError("its forward differs between train() and eval() (it reads self.training)")
    if isinstance(error, ActivationCheckpointing):
        return tracer.culprit or "", error
    if theirs is None:
        return "", differs
    mine = [_signature(n, module) for n in graph.nodes]
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, mine, theirs, autojunk=False).get_opcodes():
        if tag != "equal":
            stack = (mine[i1:i2] or theirs[j1:j2])[0][2]
            return (stack[-1] if stack else ""), differs  # module-stack names are relative to ``module``
    return None, None


def _signature(node: fx.Node, root: nn.Module) -> tuple:
    """What a node does, and inside which module, with references to other nodes blanked out.

    A tensor made in the forward (``torch.zeros(6)``) is a ``_tensor_constantN``
    attribute of ``root``, numbered anew by each trace: it is compared by value.
    """
    def blank(a: Any) -> Any:
        return "%" if isinstance(a, fx.Node) else a

    stack = tuple(q for q, _ in (node.meta.get("nn_module_stack") or {}).values())
    args = fx.node.map_aggregate(node.args, blank), fx.node.map_aggregate(node.kwargs, blank)
    target: Any = str(node.target)
    if node.op == "get_attr" and target.startswith("_tensor_constant"):
        t = getattr(root, target).detach().cpu().contiguous()
        target = ("_tensor_constant", tuple(t.shape), str(t.dtype), t.view(-1).view(torch.uint8).numpy().tobytes())
    return (node.op, target, stack, repr(args))


def capture_model(
    model: nn.Module,
    target_owners: Iterable[str],
    *,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Iterable[str | type] | None = None,
    calls: dict[int, list[CallSpec | str]] | None = None,
) -> CaptureResult:
    """Capture ``model`` as graphs where possible, Python where not (see the module docstring).

    ``target_owners`` are the names of modules that own pruned parameters;
    those of :data:`TRACE_THROUGH_TYPES` are traced through. ``calls`` (from
    :func:`record_calls`) enables the per-submodule fallback.
    """
    modules = dict(model.named_modules())
    leaf_types = tuple(x for x in (leaf_modules or ()) if isinstance(x, type))
    leaf_names = {x for x in (leaf_modules or ()) if isinstance(x, str)}
    unknown = sorted(n for n in leaf_names if n not in modules)
    if unknown:
        raise ValueError(f"leaf_modules names not found in the model: {', '.join(unknown)}")
    leaves = {id(modules[n]) for n in leaf_names}
    # Modules the example run saw call torch.utils.checkpoint: never traced through (see record_calls).
    checkpointing = {key for key, specs in (calls or {}).items() if CHECKPOINTS in specs}
    leaves |= checkpointing - {id(model)}
    owner_ids = {id(modules[n]) for n in target_owners if n in modules}
    trace_through = {id(modules[n]) for n in target_owners if n in modules and _is_functional_layer(modules[n])}
    # Modules worth capturing: those with a pruned parameter somewhere below them.
    relevant = {id(m) for m in model.modules() if any(id(s) in owner_ids for s in m.modules())}

    result = CaptureResult(captures=[])
    visited: set[int] = set()

    def python_children(parent: nn.Module, prefix: str) -> None:
        """``parent``'s forward stays Python: capture each child on its own, or recurse into it."""
        for child_name, child in parent.named_children():
            name = _join(prefix, child_name)
            if id(child) in visited or id(child) not in relevant:
                continue
            visited.add(id(child))
            if calls is None:
                result.uncaptured[name] = "no example_inputs: how it is called is unknown"
                continue
            specs = calls.get(id(child), [])
            reasons = [spec for spec in specs if isinstance(spec, str)]
            reason = None
            if reasons:
                reason = reasons[0]
            elif not specs:
                reason = "not called in the example run"
            elif len(specs) > 1:
                reason = f"called {len(specs)} different ways in the example run"
            elif id(child) in leaves or (leaf_types and isinstance(child, leaf_types)):
                result.uncaptured[name] = "leaf_modules"
                continue
            if reason is None:
                cap, reason = _trace_one(child, name, specs[0], None, trace_through, leaves, leaf_types)
                if reason is None:
                    result.captures.append(cap)
                    graph_leaves(cap)
                    continue
            if not any(True for _ in child.children()):
                result.uncaptured[name] = reason
                continue
            result.captures.append(Capture(name=name, module=child, reason=reason))
            python_children(child, name)

    def graph_leaves(cap: Capture) -> None:
        """Fallback leaves inside a graph keep their forward; capture their children when calls are known."""
        if calls is None:
            return
        for node in cap.graph.nodes:
            if node.op == "call_module" and id(cap.module.get_submodule(node.target)) in checkpointing:
                cap.leaves.setdefault(_join(cap.name, node.target), CHECKPOINTS)
        for leaf_name in list(cap.leaves):
            leaf = model.get_submodule(leaf_name)
            if id(leaf) in visited or id(leaf) not in relevant:
                continue
            visited.add(id(leaf))
            result.captures.append(Capture(name=leaf_name, module=leaf, reason=cap.leaves[leaf_name]))
            python_children(leaf, leaf_name)

    visited.add(id(model))
    if id(model) in checkpointing:
        root, reason = Capture(name="", module=model), CHECKPOINTS
    else:
        root, reason = _trace_one(model, "", None, concrete_args, trace_through, leaves, leaf_types)
    root.reason = reason
    result.captures.append(root)
    if reason is None:
        graph_leaves(root)
    else:
        python_children(model, "")
    return result


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_functional_layer(m: nn.Module) -> bool:
    """A trace-through layer whose forward is still the stock one (subclasses may override it)."""
    for base in TRACE_THROUGH_TYPES:
        if isinstance(m, base):
            return type(m).forward is base.forward
    return False
