"""Lazy imports of the ``compressed`` extra (safetensors, compressed-tensors) with an install hint.

fxprune itself depends only on torch; the checkpoint formats need these
packages, imported the first time a checkpoint function runs.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]

_DISTRIBUTIONS = {"safetensors": "safetensors", "compressed_tensors": "compressed-tensors", "transformers": "transformers"}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise ImportError saying which pip extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        dist = _DISTRIBUTIONS.get(top, top)
        extra = "hf" if top == "transformers" else "compressed"
        raise ImportError(
            f"fxprune's checkpoint formats need the '{dist}' package ({e}); "
            f"install it with: pip install 'fxprune[{extra}]'"
        ) from e
