"""Find the repeated blocks that sequential calibration goes through one at a time.

A causal language model is an embedding, a stack of identical decoder layers
and a head. Hugging Face keeps the stack as an ``nn.ModuleList``
(``model.layers`` in Llama/Qwen/Mistral/Gemma/Phi/Mixtral, ``transformer.h``
in GPT-2, ``model.decoder.layers`` in OPT), and so do most plain PyTorch
models (``nn.Sequential`` stacks count too). The default choice is the
``ModuleList``/``Sequential`` of at least two modules of one class that holds
the most parameters. ``sequential_targets`` (config key) overrides it with
class names (``LlamaDecoderLayer``) or module-path globs (``model.layers.*``);
the outermost matching modules are the blocks.
"""
from __future__ import annotations

import fnmatch

from torch import nn

from fxprune.config import PruningConfig
from fxprune.errors import ConfigError, PruningError

__all__ = ["find_blocks", "block_of"]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module, config: PruningConfig) -> list[tuple[str, nn.Module]]:
    """``(module path, module)`` of every block, in module order; raises if there is none."""
    if config.sequential_targets is not None:
        return _matching(model, config)
    best: tuple[int, str, nn.Module] | None = None
    for name, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 2:
            continue
        children = list(container)
        if len({type(c) for c in children}) != 1 or _numel(children[0]) == 0:
            continue
        size = _numel(container)
        if best is None or size > best[0]:
            best = (size, name, container)
    if best is None:
        raise PruningError(
            f"sequential=True: {type(model).__name__} has no repeated blocks (an nn.ModuleList or nn.Sequential of "
            "at least two modules of one class, such as the decoder layers of a language model); name them with "
            "the config key 'sequential_targets' (a class name or module-path glob) or pass sequential=False to "
            "calibrate the whole model at once"
        )
    _, name, container = best
    prefix = f"{name}." if name else ""
    return [(f"{prefix}{i}", child) for i, child in enumerate(container)]


def _matching(model: nn.Module, config: PruningConfig) -> list[tuple[str, nn.Module]]:
    patterns = config.sequential_targets or ()
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if any(type(module).__name__ == p or fnmatch.fnmatchcase(name, p) for p in patterns):
            found.append((name, module))
    if not found:
        raise ConfigError(
            f"matches no module of {type(model).__name__} (expected class names such as 'LlamaDecoderLayer' or "
            "module-path globs such as 'model.layers.*')",
            "pruning.sequential_targets",
            config.source,
        )
    return found


def block_of(aliases: tuple[str, ...], blocks: list[tuple[str, nn.Module]]) -> int | None:
    """Index of the block that owns a parameter (by any of its names), or None for weights outside blocks."""
    for alias in aliases:
        for i, (path, _) in enumerate(blocks):
            if alias.startswith(f"{path}."):
                return i
    return None
