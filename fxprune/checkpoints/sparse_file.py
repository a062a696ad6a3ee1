"""fxprune's single-file compact checkpoint: any model's ``state_dict`` in one safetensors file.

Each floating-point tensor is stored in whichever of three layouts is smallest
for it (see :mod:`fxprune.checkpoints.codec`): as it is (``dense``), as kept
values + packed bitmask (``bitmask``, compressed-tensors' layout), or as CSR
(``csr``, for very sparse tensors). The safetensors header's ``__metadata__``
holds one JSON entry (key ``fxprune``) that lists every ``state_dict`` name in
order with its layout, dtype, shape, the file keys holding its parts, the name
it is tied to (tied tensors are stored once) and, for a non-contiguous tensor,
the dimension order of its memory, so that :func:`load_sparse_state_dict`
rebuilds the original ``state_dict`` bit for bit (``-0.0`` aside, see the codec).
"""
from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict, deque
from functools import partial
from typing import Callable, Iterable

import torch
from torch import nn

from fxprune.checkpoints import codec
from fxprune.checkpoints.extras import require
from fxprune.checkpoints.in_place import writable_in_place
from fxprune.checkpoints.mapped_file import read_safetensors
from fxprune.errors import PruningError

__all__ = [
    "save_sparse",
    "load_sparse",
    "load_sparse_state_dict",
    "write_state_dict",
    "check_not_prepared",
    "check_loadable",
    "fill_model",
    "storage_key",
    "run_jobs",
]

FORMAT = "fxprune-sparse"
VERSION = 1
_METADATA_KEY = "fxprune"


def check_not_prepared(model: nn.Module, action: str) -> None:
    """Refuse a model still wrapped by ``fxprune.prepare``: its state_dict holds masks, not pruned weights."""
    from fxprune.pruner import Pruner

    if isinstance(getattr(model, "pruner", None), Pruner):
        raise PruningError(
            f"{action}: this model is still prepared for pruning (it has a .pruner); call "
            "fxprune.convert(prepared) first and save the converted model"
        )


def storage_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's memory and view: state_dict entries with equal keys are one tied tensor."""
    if t.device.type == "meta":
        raise PruningError("cannot save a tensor on the meta device: load the model's weights first")
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _memory_order(t: torch.Tensor) -> list[int] | None:
    """Dims from outermost to innermost in memory, if ``t`` is a dense permutation that is not contiguous."""
    if t.is_contiguous() or t.dim() < 2:
        return None
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    return order if t.permute(order).is_contiguous() else None


def _choose(t: torch.Tensor, layouts: Iterable[str], row_offsets: bool) -> str:
    if not t.is_floating_point() or t.numel() == 0 or t.element_size() < 2:
        return "dense"  # integers, bools and 8-bit floats are stored as they are
    nnz = int(codec.kept(t).sum())
    sizes = {"dense": t.numel() * t.element_size()}
    if "bitmask" in layouts:
        sizes["bitmask"] = codec.bitmask_nbytes(t, nnz, row_offsets=row_offsets)
    if "csr" in layouts:
        sizes["csr"] = codec.csr_nbytes(t, nnz)
    return min(sizes, key=lambda k: (sizes[k], k != "dense"))


def _file_key(name: str, part: str, taken: set[str]) -> str:
    key = f"{name}.{part}" if part else name
    while key in taken:
        key += "_"
    taken.add(key)
    return key


def write_state_dict(
    state_dict: dict[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    layouts: Iterable[str] = ("bitmask", "csr"),
    row_offsets: bool = False,
) -> dict[str, str]:
    """Write ``state_dict`` to one safetensors file at ``path``; return ``{name: layout chosen}``.

    ``layouts`` are the compact layouts allowed besides ``dense``; ``row_offsets``
    adds compressed-tensors' row offsets to each bitmask (they cost 8 bytes a row
    and are not needed to decode).
    """
    safetensors_torch = require("safetensors.torch")
    layouts = tuple(layouts)
    taken = set(state_dict)
    entries, tensors, first_of, stored_ptrs = [], {}, {}, set()
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise PruningError(f"{name}: state_dict value is a {type(t).__name__}, not a tensor")
        entry = {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        key = storage_key(t)
        if key in first_of:
            entry.update(layout="tied", tied_to=first_of[key])
            entries.append(entry)
            continue
        first_of[key] = name
        if (order := _memory_order(t)) is not None:
            entry["memory_order"] = order
        t = t.detach().cpu()
        layout = _choose(t, layouts, row_offsets)
        if layout == "dense":
            value = t.contiguous()
            if value.untyped_storage().data_ptr() in stored_ptrs:
                value = value.clone()  # safetensors refuses two entries sharing memory
            stored_ptrs.add(value.untyped_storage().data_ptr())
            parts = {"": value}
        elif layout == "bitmask":
            parts = codec.encode_bitmask(t, row_offsets=row_offsets)
            parts.pop("shape")  # the shape is in the metadata
        else:
            parts = codec.encode_csr(t)
        entry["layout"] = layout
        entry["parts"] = {}
        for part, value in parts.items():
            fk = name if part == "" and name not in tensors else _file_key(name, part, taken)
            entry["parts"][part or "value"] = fk
            tensors[fk] = value
        entries.append(entry)
    metadata = {_METADATA_KEY: json.dumps({"format": FORMAT, "version": VERSION, "entries": entries})}
    safetensors_torch.save_file(tensors, os.fspath(path), metadata=metadata)
    return {e["name"]: e["layout"] for e in entries}


def save_sparse(model: nn.Module | dict[str, torch.Tensor], path: str | os.PathLike) -> dict[str, str]:
    """Save a pruned model's ``state_dict`` compactly in one safetensors file.

    Works for any model (CNNs, transformers, a plain ``state_dict``): each
    floating-point tensor goes in the smallest of dense / values + packed bitmask
    / CSR, tied tensors are stored once, and everything needed to rebuild the
    ``state_dict`` bit for bit is in the file. Reload with :func:`load_sparse`
    (into a model) or :func:`load_sparse_state_dict`. Returns the layout chosen
    per name. A model still prepared by ``fxprune.prepare`` is refused: convert it first.
    """
    if isinstance(model, nn.Module):
        check_not_prepared(model, "save_sparse")
        state_dict = model.state_dict()
    else:
        state_dict = model
    return write_state_dict(state_dict, path)


def _read_entries(path: str | os.PathLike) -> tuple[list[dict], dict[str, torch.Tensor]]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    metadata, tensors = read_safetensors(path)
    raw = metadata.get(_METADATA_KEY)
    if raw is None:
        raise PruningError(f"{path}: not an fxprune sparse checkpoint (no '{_METADATA_KEY}' entry in its metadata)")
    header = json.loads(raw)
    if header.get("format") != FORMAT or header.get("version", 0) > VERSION:
        raise PruningError(f"{path}: unsupported checkpoint format {header.get('format')!r} v{header.get('version')}")
    return header["entries"], tensors


def _parts(entry: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {part: tensors[key] for part, key in entry["parts"].items()}


def _dtype(entry: dict, source: str) -> torch.dtype:
    dtype = getattr(torch, entry["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise PruningError(f"{source}: {entry['name']}: unknown dtype {entry['dtype']!r}")
    return dtype


def _check_entries(entries: list[dict], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise PruningError (naming the tensor) unless every entry decodes to its dtype and shape."""
    names = set()
    for entry in entries:
        name, layout, dtype = entry["name"], entry["layout"], _dtype(entry, source)
        if layout == "tied":
            if entry.get("tied_to") not in names:
                raise PruningError(f"{source}: {name} is tied to {entry.get('tied_to')!r}, which no entry before it holds")
        elif any(key not in tensors for key in entry.get("parts", {}).values()):
            raise PruningError(f"{source}: {name}: the file lacks its parts {sorted(entry.get('parts', {}).values())}")
        elif layout == "dense":
            value = tensors[entry["parts"]["value"]]
            if value.dtype != dtype or list(value.shape) != list(entry["shape"]):
                raise PruningError(f"{source}: {name}: stored {value.dtype} {list(value.shape)}, "
                                   f"metadata says {dtype} {entry['shape']}")
        else:
            try:
                codec.check_parts(layout, _parts(entry, tensors), entry["shape"], dtype)
            except ValueError as e:
                raise PruningError(f"{source}: {name}: damaged {layout} tensor: {e}") from None
        names.add(name)


def _copy_in_steps(out: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``out.copy_(value)`` for contiguous tensors, in steps that each stay on the calling thread (see codec)."""
    dst, src = out.view(-1), value.reshape(-1)
    for start in range(0, dst.numel(), codec.DECODE_STEP):
        dst[start:start + codec.DECODE_STEP].copy_(src[start:start + codec.DECODE_STEP])
    return out


def run_jobs(jobs: list[Callable[[], object]]) -> None:
    """Run the decode jobs (largest first) on ``torch.get_num_threads()`` threads, the calling one included.

    The helper threads take jobs from the large end and the calling thread from
    the small end, so the many small tensors of a CNN (BatchNorm vectors) cost
    no hand-off to a pool, which took longer than decoding them; the C kernel,
    numpy and torch release the GIL, so large tensors decode in parallel.
    """
    helpers = min(torch.get_num_threads(), len(jobs)) - 1
    if helpers <= 0:
        for job in jobs:
            job()
        return
    queue = deque(jobs)
    errors: list[BaseException] = []

    def work(take: Callable[[], Callable[[], object]]) -> None:
        while not errors:
            try:
                job = take()
            except IndexError:  # the queue is empty
                return
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(e)

    threads = [threading.Thread(target=work, args=(queue.popleft,), name="fxprune-load", daemon=True)
               for _ in range(helpers)]
    for t in threads:
        t.start()
    work(queue.pop)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _rebuild(entry: dict, tensors: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense tensor of a checked entry; decoded into ``out`` (contiguous, its shape and dtype) if given."""
    parts = _parts(entry, tensors)
    keep_strides = out is None  # into new memory: give back the saved tensor's memory order too
    if out is None and entry["layout"] != "dense":
        out = torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"]))
    if entry["layout"] == "dense":
        t = parts["value"] if out is None else _copy_in_steps(out, parts["value"])
    elif entry["layout"] == "bitmask":
        t = codec.decode_bitmask_into(out, parts["compressed"], parts["bitmask"])
    else:
        t = codec.decode_csr_into(out, parts["values"], parts["crow_indices"], parts["col_indices"])
    if (order := entry.get("memory_order")) is not None and keep_strides:
        inverse = sorted(range(len(order)), key=order.__getitem__)
        t = t.permute(order).contiguous().permute(inverse)
    return t


def load_sparse_state_dict(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    """The ``state_dict`` saved by :func:`save_sparse`, rebuilt on the CPU; tied names share one tensor.

    Tensors stored dense are views of a private mapping of the file (as
    safetensors' own loader gives them): read on first touch, writable, and
    writing them leaves the file as it was.
    """
    entries, tensors = _read_entries(path)
    _check_entries(entries, tensors, os.fspath(path))
    decoded: dict[str, torch.Tensor] = {}

    def rebuild(entry: dict) -> None:
        decoded[entry["name"]] = _rebuild(entry, tensors)

    largest_first = sorted(entries, key=lambda e: -math.prod(e["shape"]))
    run_jobs([partial(rebuild, e) for e in largest_first if e["layout"] != "tied"])
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for entry in entries:
        state[entry["name"]] = state[entry["tied_to"]] if entry["layout"] == "tied" else decoded[entry["name"]]
    return state


def check_loadable(state: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise (naming the key) unless ``state`` has exactly ``model``'s keys, shapes and dtypes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise PruningError(
            f"{source} does not match the model: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise PruningError(f"{source}: {k}: shape {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model")
        if v.dtype != state[k].dtype:
            raise PruningError(
                f"{source}: {k}: dtype {state[k].dtype} in the file, {v.dtype} in the model; "
                f"convert the model (model.to({state[k].dtype})) first so the weights load bit for bit"
            )


def _root_entry(by_name: dict[str, dict], name: str) -> dict:
    """The entry holding the parts of ``name``: itself, or the one it is tied to (through ties of ties)."""
    entry = by_name[name]
    while entry["layout"] == "tied":
        entry = by_name[entry["tied_to"]]
    return entry


@torch.no_grad()
def fill_model(path: str | os.PathLike, model: nn.Module, source: str) -> nn.Module:
    """Load a :func:`save_sparse` file into ``model`` in place; everything is checked before anything is written.

    Entries the model holds in its own plain memory
    (:func:`~fxprune.checkpoints.in_place.writable_in_place`) are decoded
    straight into it; the others are decoded into new tensors and go through
    ``model.load_state_dict`` (first, since their hooks are the part that may raise).
    """
    entries, tensors = _read_entries(path)
    _check_entries(entries, tensors, source)
    specs = {e["name"]: torch.empty(e["shape"], dtype=_dtype(e, source), device="meta") for e in entries}
    check_loadable(specs, model, source)
    direct = writable_in_place(model)
    by_name = {e["name"]: e for e in entries}
    fresh: dict[str, torch.Tensor] = {}  # decoded into new memory, by the name of the entry holding the parts

    def decoded(name: str) -> torch.Tensor:
        # Not recursive: a closure that refers to itself is a reference cycle, which would keep the file's
        # mapping alive until the garbage collector runs (and bill its work to whatever allocates next).
        entry = _root_entry(by_name, name)
        if entry["name"] not in fresh:
            fresh[entry["name"]] = _rebuild(entry, tensors)
        return fresh[entry["name"]]

    rest = {e["name"]: decoded(e["name"]) for e in entries if e["name"] not in direct}
    if rest:
        model.load_state_dict(rest, strict=False)  # the keys were checked above: none is missing or unexpected
    # Names sharing one tensor in the model (tied there, not in the file): load_state_dict's copies run in the
    # model's state_dict order and the last one stays; decode only that one (two jobs must not share memory).
    last_of = {storage_key(t): name for name, t in direct.items()}
    written: dict[str, torch.Tensor] = {}
    jobs = []
    for entry in sorted(entries, key=lambda e: -math.prod(e["shape"])):  # largest first: threads finish together
        name = entry["name"]
        if name not in direct or entry["layout"] == "tied" or last_of[storage_key(direct[name])] != name:
            continue
        if name in fresh:  # already decoded for a tied entry on the other path: copy, not decode twice
            jobs.append(partial(direct[name].copy_, fresh[name]))
        else:
            jobs.append(partial(_rebuild, entry, tensors, direct[name]))
        written[name] = direct[name]
    run_jobs(jobs)
    for entry in entries:
        name = entry["name"]
        if name not in direct or entry["layout"] != "tied":
            continue
        root = _root_entry(by_name, name)
        source_tensor = written.get(root["name"]) if root["name"] in written else decoded(root["name"])
        if storage_key(direct[name]) != storage_key(source_tensor):  # tied in the file, separate in the model
            direct[name].copy_(source_tensor)
    return model


def load_sparse(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Fill ``model`` in place with the weights saved by :func:`save_sparse` and return it.

    Keys, shapes and dtypes, and the consistency of every stored tensor, are
    checked before anything is copied, so a mismatch leaves the model
    untouched and names the first offending key. Weights are decoded straight
    into the model's parameters where ``load_state_dict`` would only copy
    them (see :mod:`fxprune.checkpoints.in_place`).
    """
    check_not_prepared(model, "load_sparse")
    return fill_model(path, model, os.fspath(path))
