"""Hugging Face folders in compressed-tensors' sparse formats (``save_pretrained`` / ``load_pretrained``).

Who does what (one codec, compressed-tensors' format):

* the tensors are encoded by :mod:`fxprune.checkpoints.codec`, the same code as
  fxprune's own single-file format, in compressed-tensors' ``sparse-bitmask`` /
  ``sparse-24-bitmask`` layouts, under the parameter names compressed-tensors'
  registered compressor for that format declares (``compression_param_names``);
* ``config.json``'s ``quantization_config`` (with its ``sparsity_config``) is
  written by compressed-tensors itself: its ``BitmaskConfig`` /
  ``Sparse24BitMaskConfig`` and ``ModelCompressor.update_config``; the config
  and generation files by ``model.save_pretrained``, which also shards;
* compressed-tensors' own decompressor (``ModelCompressor.from_pretrained(dir)``
  then ``decompress(dir, model)``) reads the folder back, and fxprune reads
  folders compressed-tensors wrote; the tests check both directions bit for bit.

Why not let compressed-tensors encode the tensors too: the issue asks for one
codec shared with :func:`fxprune.save_sparse`, which must work for any model
without compressed-tensors' import of transformers, for N-D tensors and CSR;
compressed-tensors' encoder is 2-D only. Its format, not a copy of its code, is
what both writers share, and its decoder is the judge.

Versions: compressed-tensors dropped its sparse compressors in 0.15, and
transformers 5 dropped sparse decompression from its compressed-tensors loader
(its loader also refuses compressed-tensors < 0.15). So in this environment
(transformers 5.24) ``AutoModelForCausalLM.from_pretrained`` cannot read any
sparse-bitmask folder, whoever wrote it; :func:`load_pretrained` is the loader,
and it returns the same transformers model through transformers' own
``from_pretrained(None, config=..., state_dict=...)``.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from fxprune.checkpoints import codec
from fxprune.checkpoints.extras import require
from fxprune.checkpoints.mapped_file import read_safetensors
from fxprune.checkpoints.sparse_file import (
    run_jobs,
    storage_key,
    check_not_prepared,
    fill_model,
    write_state_dict,
)
from fxprune.errors import PruningError

__all__ = ["save_pretrained", "load_pretrained", "SavedCheckpoint"]

SINGLE_FILE = "model.safetensors"
SPARSE_FORMATS = ("sparse-bitmask", "sparse-24-bitmask")


@dataclass
class SavedCheckpoint:
    """What :func:`save_pretrained` wrote: the format and the layout of each weight."""

    directory: str
    format: str  # 'sparse-bitmask' | 'sparse-24-bitmask' | 'dense' | 'fxprune-sparse' (not a transformers model)
    layouts: dict[str, str] = field(default_factory=dict)  # weight name -> 'dense' | format of its tensors


def _is_transformers_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers") for c in type(model).__mro__)


def _compressor_api():
    ct = require("compressed_tensors")
    compressors = require("compressed_tensors.compressors")
    if not hasattr(compressors, "BitmaskCompressor"):
        raise ImportError(
            f"compressed-tensors {ct.__version__} no longer has its sparse compressors (removed in 0.15); "
            "fxprune's sparse Hugging Face export needs the last release that has them: "
            "pip install 'fxprune[compressed]' (compressed-tensors>=0.13,<0.14)"
        )
    config = require("compressed_tensors.config")
    return compressors, config


def _targets(model: nn.Module, state: dict[str, torch.Tensor]) -> list[tuple[str, nn.Module]]:
    """Linear-like modules whose weight compressed-tensors' 2-D sparse formats can hold."""
    shared: dict[tuple, int] = {}
    for t in state.values():
        shared[storage_key(t)] = shared.get(storage_key(t), 0) + 1
    out = []
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"):
            continue
        w = state.get(f"{name}.weight")
        if w is None or w.dim() != 2 or not w.is_floating_point() or w.element_size() < 2 or w.numel() == 0:
            continue
        if shared[storage_key(w)] > 1:
            continue  # tied (e.g. lm_head and the embedding): save_pretrained stores it once, dense
        out.append((name, m))
    return out


def _plan(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, nn.Module]]:
    """Pick the folder's format and the modules whose weights it compresses (the rest stay dense)."""
    sparse, all_24 = {}, True
    for name, m in _targets(model, state):
        w = state[f"{name}.weight"]
        nnz = int(codec.kept(w).sum())
        if codec.bitmask_nbytes(w, nnz, row_offsets=True) >= w.numel() * w.element_size():
            continue  # too little sparsity to pay for the mask
        sparse[name] = m
        # 2:4 along the input dimension; a transformers Conv1D stores [in, out], so its input dim is
        # dim 0 and the 2:4 layout (along rows) cannot hold it: such a model is saved as sparse-bitmask.
        all_24 = all_24 and isinstance(m, nn.Linear) and codec.is_24_along_rows(w)
    if not sparse:
        return "dense", {}
    return ("sparse-24-bitmask" if all_24 else "sparse-bitmask"), sparse


def _global_sparsity(state: dict[str, torch.Tensor]) -> float:
    seen, zeros, total = set(), 0, 0
    for t in state.values():
        if t.is_floating_point() and storage_key(t) not in seen:
            seen.add(storage_key(t))
            zeros += int((t == 0).sum())
            total += t.numel()
    return zeros / total if total else 0.0


def save_pretrained(model: nn.Module, directory: str | os.PathLike, **save_kwargs) -> SavedCheckpoint:
    """Save a pruned model compactly, choosing the format from its actual sparsity.

    A transformers ``PreTrainedModel`` becomes a Hugging Face folder in
    compressed-tensors' ``sparse-24-bitmask`` format when every compressed
    Linear weight is 2:4 along its input dimension, else ``sparse-bitmask``;
    weights too dense to gain stay dense, and ``config.json`` carries the
    ``quantization_config.sparsity_config`` that compressed-tensors writes.
    ``save_kwargs`` go to ``model.save_pretrained`` (e.g. ``max_shard_size``).
    Any other model is saved as one safetensors file, ``directory/model.safetensors``,
    in the same bitmask layout (values + packed bitmask + row offsets).
    Read either back with :func:`load_pretrained`. A model still prepared by
    ``fxprune.prepare`` is refused: ``fxprune.convert`` it first.
    """
    check_not_prepared(model, "save_pretrained")
    directory = os.fspath(directory)
    state = model.state_dict()
    if not _is_transformers_model(model):
        if save_kwargs:
            raise TypeError(f"save_pretrained: {sorted(save_kwargs)} only apply to transformers models")
        os.makedirs(directory, exist_ok=True)
        layouts = write_state_dict(state, os.path.join(directory, SINGLE_FILE), layouts=("bitmask",), row_offsets=True)
        return SavedCheckpoint(directory, "fxprune-sparse", layouts)
    if getattr(model.config, "quantization_config", None) is not None:
        raise PruningError(
            "save_pretrained: the model already has a quantization_config; fxprune writes sparsity-only "
            "compressed-tensors folders (quantized + sparse is not supported)"
        )
    compressors, ct_config = _compressor_api()
    fmt, sparse = _plan(model, state)
    layouts = {f"{n}.weight": (fmt if n in sparse else "dense") for n, _ in _targets(model, state)}
    if fmt == "dense":
        warnings.warn("save_pretrained: no Linear weight is sparse enough to gain from a sparse format; saved dense")
        model.save_pretrained(directory, **save_kwargs)
        return SavedCheckpoint(directory, "dense", layouts)

    classes = sorted({type(m).__name__ for m in sparse.values()})
    left_dense = sorted(n for n, m in _targets(model, state) if n not in sparse and type(m).__name__ in classes)
    config_cls = ct_config.Sparse24BitMaskConfig if fmt == "sparse-24-bitmask" else ct_config.BitmaskConfig
    sparsity_config = config_cls(
        targets=classes,
        ignore=left_dense,
        global_sparsity=_global_sparsity(state),
        sparsity_structure="2:4" if fmt == "sparse-24-bitmask" else "unstructured",
    )
    compressor = compressors.ModelCompressor(sparsity_config=sparsity_config)
    param_names = tuple(compressor.sparsity_compressor.compression_param_names)
    compressed = {}
    for key, t in state.items():
        prefix = key.removesuffix(".weight")
        if key.endswith(".weight") and prefix in sparse:
            w = t.detach().cpu()
            if fmt == "sparse-24-bitmask":
                parts = codec.encode_bitmask_24(w)
            else:
                parts = codec.encode_bitmask(w, row_offsets=True)
            assert set(parts) == set(param_names), (parts.keys(), param_names)
            compressed.update({f"{prefix}.{p}": parts[p] for p in param_names})
        else:
            compressed[key] = t
    model.save_pretrained(directory, state_dict=compressed, **save_kwargs)
    compressor.update_config(directory)
    return SavedCheckpoint(directory, fmt, layouts)


def _read_folder_tensors(directory: str) -> dict[str, torch.Tensor]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or model.safetensors.index.json")
    tensors = {}
    for name in files:
        tensors.update(read_safetensors(os.path.join(directory, name))[1])
    return tensors


def decompressed_state_dict(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The dense tensors of a compressed-tensors sparse folder and its ``config.json`` as a dict."""
    directory = os.fspath(directory)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    sparsity = (config.get("quantization_config") or {}).get("sparsity_config") or {}
    fmt = sparsity.get("format", "dense")
    tensors = _read_folder_tensors(directory)
    if fmt == "dense":
        return tensors, config
    if fmt not in SPARSE_FORMATS:
        raise PruningError(f"{directory}: sparsity format {fmt!r} is not one fxprune reads ({', '.join(SPARSE_FORMATS)})")
    parts = codec.BITMASK_PARTS if fmt == "sparse-bitmask" else codec.BITMASK_24_PARTS
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    state = {}
    for key, t in tensors.items():
        prefix, _, part = key.rpartition(".")
        if part in parts and f"{prefix}.compressed" in tensors and f"{prefix}.bitmask" in tensors:
            grouped.setdefault(prefix, {})[part] = t
        else:
            state[key] = t
    decoded: dict[str, torch.Tensor] = {}

    def decode(prefix: str, p: dict[str, torch.Tensor]) -> None:
        decoded[prefix] = codec.decode_bitmask(p["compressed"], p["bitmask"], p["shape"].flatten().tolist())

    jobs = sorted(grouped.items(), key=lambda item: -item[1]["compressed"].numel())  # largest first
    run_jobs([partial(decode, prefix, p) for prefix, p in jobs])
    state.update({f"{prefix}.weight": decoded[prefix] for prefix in grouped})
    return state, config


def load_pretrained(directory: str | os.PathLike, model: nn.Module | None = None, **from_pretrained_kwargs) -> nn.Module:
    """Load what :func:`save_pretrained` wrote, with bit-identical weights.

    For a Hugging Face folder (compressed-tensors ``sparse-bitmask`` /
    ``sparse-24-bitmask``, or dense) returns a transformers model of the class in
    ``config.json``'s ``architectures`` (or ``model_class=``), built by
    transformers' ``from_pretrained`` from the decompressed weights;
    ``from_pretrained_kwargs`` go there (``device_map``, ...). For a folder of
    a model that is not a transformers model, pass that ``model``: it is
    filled in place (keys, shapes and dtypes checked first) and returned.
    """
    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        if model is None:
            raise PruningError(
                f"{directory} has no config.json, so it holds a model that is not a transformers model: "
                "pass the model to fill, load_pretrained(directory, model)"
            )
        check_not_prepared(model, "load_pretrained")
        return fill_model(os.path.join(directory, SINGLE_FILE), model, directory)
    if model is not None:
        raise PruningError("load_pretrained: pass model= only for a folder without config.json (not a transformers model)")
    transformers = require("transformers")
    state, _ = decompressed_state_dict(directory)
    model_class = from_pretrained_kwargs.pop("model_class", None)
    config = transformers.AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are already dense
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        if not names or not hasattr(transformers, names[0]):
            raise PruningError(f"{directory}/config.json names no transformers architecture; pass model_class=")
        model_class = getattr(transformers, names[0])
    if "dtype" not in from_pretrained_kwargs:  # the saved model's dtype, not transformers' float32 default
        saved = getattr(config, "dtype", None)
        floating = [t.dtype for t in state.values() if t.is_floating_point()]
        from_pretrained_kwargs["dtype"] = saved if saved is not None else (floating[0] if floating else None)
    loaded = model_class.from_pretrained(None, config=config, state_dict=state, **from_pretrained_kwargs)
    if os.path.isfile(os.path.join(directory, "generation_config.json")):
        loaded.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    return loaded
