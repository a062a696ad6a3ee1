"""Which ``state_dict`` entries of a model can be decoded straight into the model's own memory.

``model.load_state_dict(state)`` needs ``state`` decoded first and then copies
it, so a loader that goes through it writes every weight twice and holds a
second dense copy of the model. For an entry that is a parameter or buffer
loaded by ``nn.Module``'s plain copy, decoding straight into that
parameter's memory gives the same result without either. Everything that
could make ``load_state_dict`` do more than copy — a load hook, a module that
overrides ``_load_from_state_dict`` (BatchNorm's override aside; lazy modules, quantized or sparse
modules whose ``state_dict`` is computed), a tensor off the CPU or not
contiguous — keeps its entries on the ``load_state_dict`` path, and so does
every entry below such a module (its hooks see its whole subtree).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["writable_in_place"]


# Overrides of _load_from_state_dict known to end in nn.Module's plain copy once every key is present (a loader
# checks that first): BatchNorm's only supplies a num_batches_tracked missing from checkpoints older than v2.
_COPYING_OVERRIDES = (nn.Module._load_from_state_dict, nn.modules.batchnorm._NormBase._load_from_state_dict)


def _plain_loading(module: nn.Module) -> bool:
    return (
        type(module)._load_from_state_dict in _COPYING_OVERRIDES
        and not module._load_state_dict_pre_hooks
        and not module._load_state_dict_post_hooks
    )


def writable_in_place(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{state_dict name: the model's own tensor}`` for the entries a loader may write into directly.

    The tensors are detached views of the parameters and buffers (writing
    them under ``torch.no_grad`` changes the model); entries missing from the
    result must go through ``model.load_state_dict``.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    plain = {name: _plain_loading(m) for name, m in modules.items()}
    writable = {}
    for name, t in model.state_dict(keep_vars=True).items():
        prefix, _, leaf = name.rpartition(".")
        owner = modules.get(prefix)
        if owner is None or not isinstance(t, torch.Tensor):
            continue
        if owner._parameters.get(leaf) is not t and owner._buffers.get(leaf) is not t:
            continue  # computed by a state_dict hook: not the module's memory
        parts = prefix.split(".") if prefix else []
        if not all(plain.get(".".join(parts[:i]), False) for i in range(len(parts) + 1)):
            continue
        if t.device.type != "cpu" or not t.is_contiguous() or t.is_sparse or type(t) not in (torch.Tensor, nn.Parameter):
            continue
        writable[name] = t.detach()
    return writable
