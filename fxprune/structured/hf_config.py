"""A shrunk Hugging Face model's ``config``: the new widths, so ``save_pretrained`` / ``from_pretrained`` work.

``convert(physical=True)`` cuts tensors; a Hugging Face model is rebuilt from
its ``config`` when it is loaded, so the sizes the config states must follow:
``hidden_size`` (the residual stream: the input embedding's width and every
norm of that width), ``intermediate_size`` (the MLP layers' hidden width),
``num_attention_heads`` / ``num_key_value_heads`` (the proven attention
modules' head counts) and ``head_dim``, written explicitly where the config
has it so that it no longer follows ``hidden_size / num_attention_heads``.
A config holds one value per size: where the layers were cut unevenly (or a
size is not one the config names), nothing is guessed. The result is
checked instead: a fresh model built from the updated config on the meta
device must have the shrunk model's tensor shapes, and :func:`update_hf_config`
returns what differs, for ``convert`` to say.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["update_hf_config"]


def _uniform(values: set[int], old: int) -> int | None:
    return next(iter(values)) if len(values) == 1 and next(iter(values)) != old else None


def update_hf_config(model: nn.Module, plan, changed: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> list[str]:
    """Update ``model.config`` (if it is a Hugging Face config) to the shrunk sizes; what a reload would get wrong.

    ``changed`` is :func:`~fxprune.structured.shrink.shrink`'s answer. Returns
    the tensors whose shapes a model built from the new config would not
    have (empty when it describes the shrunk model, or when ``model`` has no
    Hugging Face config).
    """
    config = getattr(model, "config", None)
    if (config is None or not hasattr(config, "to_dict") or not changed
            or not (hasattr(type(model), "config_class") and hasattr(model, "save_pretrained"))):
        return []  # not a Hugging Face model: its constructor is not known to take its config
    hidden = getattr(config, "hidden_size", None)
    if isinstance(hidden, int):
        widths: set[int] = set()
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        for name, t in model.named_parameters():
            if emb is not None and t is getattr(emb, "weight", None) and changed.get(name, ((0, 0),))[0][-1] == hidden:
                widths.add(t.shape[-1])
        for name, (_, spec, chans, _) in plan.norms.items():
            if spec.size == hidden:
                m = model.get_submodule(name)
                widths.add(next((t.shape[0] for t in list(m._parameters.values()) if t is not None), spec.size))
        new = _uniform(widths, hidden)
        if new is not None:
            config.hidden_size = new
    inter = getattr(config, "intermediate_size", None)
    if isinstance(inter, int):
        outs = {new[0] for name, (old, new) in changed.items() if name.endswith(".weight") and len(old) == 2
                and old[0] == inter and old[1] != inter}
        new = _uniform(outs, inter)
        if new is not None:
            config.intermediate_size = new
    _update_heads(model, plan, config)
    return _mismatches(model, config)


def _update_heads(model: nn.Module, plan, config) -> None:
    heads, kv, dims = set(), set(), set()
    for name, spec in plan.channels.attention.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue
        h, g = _head_counts(m, spec)
        heads.add(h)
        kv.add(g)
        dims.add(spec.head_dim)
    if not heads:
        return
    for attr, values in (("num_attention_heads", heads), ("num_key_value_heads", kv)):
        old = getattr(config, attr, None)
        if isinstance(old, int):
            new = _uniform(values, old)
            if new is not None:
                setattr(config, attr, new)
    if len(dims) == 1 and hasattr(config, "head_dim"):
        try:
            config.head_dim = next(iter(dims))
        except AttributeError:  # a derived property (Falcon: hidden_size // num_attention_heads)
            pass


def _head_counts(m: nn.Module, spec) -> tuple[int, int]:
    """(query heads, key/value heads) a shrunk attention module holds, from its projections' widths.

    A fused projection holds ``heads + 2 * kv_heads`` head-sized blocks: ``group`` queries per key/value
    head (q|k|v and per-group interleaved layouts) or one shared key and value (multi-query).
    """
    def units(name: str) -> int:
        w = m.get_submodule(name).weight
        return (w.shape[1] if name in spec.transposed else w.shape[0]) // spec.head_dim

    if not spec.fused:
        return units(spec.q), units(spec.k)
    total = units(spec.q)
    if spec.layout == "shared_kv":
        return total - 2, 1
    groups = total // (spec.group + 2)
    return groups * spec.group, groups


def _mismatches(model: nn.Module, config) -> list[str]:
    """Tensors whose shape a model built from ``config`` would not have (built on the meta device)."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            fresh = type(model)(config)
    except Exception as e:  # noqa: BLE001 - a class that cannot be built from its config: say so
        return [f"{type(model).__name__}(config) fails: {type(e).__name__}: {e}"]
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    out = []
    for k, v in model.state_dict().items():
        if k in want and want[k] != tuple(v.shape):
            out.append(f"{k}: {tuple(v.shape)} here, {want[k]} from the config")
    return out
