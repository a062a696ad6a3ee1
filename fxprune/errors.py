"""Exceptions for user errors.

Every user-facing failure names *where* the problem is (config key path and
file, parameter name, graph node), so that a wrong config or an unsupported
model is fixed by reading one line.
"""
from __future__ import annotations

__all__ = ["ConfigError", "TraceError", "PruningError"]


class ConfigError(ValueError):
    """A config value is wrong; raised before any model is modified.

    ``key_path`` is the dotted path inside the YAML (``pruning.magnitude.prune1.target_sparsity``)
    and ``source`` the file it came from (``None`` for dicts and typed configs).
    """

    def __init__(self, message: str, key_path: str = "pruning", source: str | None = None):
        self.key_path = key_path
        self.source = source
        self.message = message
        where = f"{source}: {key_path}" if source else key_path
        super().__init__(f"{where}: {message}")


class TraceError(RuntimeError):
    """A weight the config asks for cannot be reached by tracing or module-level masking."""


class PruningError(RuntimeError):
    """The model or its state is inconsistent with the pruning plan (e.g. a bad state_dict)."""
