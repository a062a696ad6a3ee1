"""Resolve the config against the model: which parameter goes to which pruner.

Pure data: nothing here mutates the model, so every config error (a name
that matches nothing, a weight claimed twice) is raised before the model is
touched.

Which weights are prunable by default (a pruner without ``weights:``):

- the weight of every layer that multiplies its input by it -- ``nn.Linear``,
  ``Conv*``, ``ConvTranspose*``, ``nn.Embedding``/``EmbeddingBag``,
  ``nn.Bilinear``, Hugging Face's ``Conv1D`` and the projections of
  ``nn.MultiheadAttention`` -- *whatever its shape*: a value head
  ``Linear(512, 1)`` or a 1x1 convolution of a one-channel image is a layer
  like any other, and the shape says nothing about whether pruning it makes
  sense;
- any other parameter (raw ``nn.Parameter`` matrices) with at least two
  dimensions of size > 1, because there the shape is all we know: broadcast
  parameters such as ``(C, 1, 1)`` layer scales or ``(1, 1, D)`` class tokens
  are not weights to prune;
- never biases or parameters of normalization layers.

Glob and ``re:`` patterns choose among the prunable weights; an exact name
selects that parameter whatever its shape, because the user asked for it by
name.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from fxprune.config import PrunerConfig, PruningConfig
from fxprune.errors import ConfigError

__all__ = ["WeightTarget", "PruningPlan", "make_plan", "is_default_prunable", "parameter_aliases"]

_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@dataclass(frozen=True)
class WeightTarget:
    """One parameter to mask. ``aliases`` lists every name it has (tied weights have several)."""

    name: str
    aliases: tuple[str, ...]
    pruner: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class PruningPlan:
    """All targets in the model's parameter order, and the pruners' settings by name."""

    targets: tuple[WeightTarget, ...]
    pruners: dict[str, PrunerConfig]

    def names_of(self, pruner: str) -> list[str]:
        return [t.name for t in self.targets if t.pruner == pruner]


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Canonical parameter name -> all its names, in ``named_parameters()`` order."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {names[0]: names for names in by_id.values()}


def _owner(model: nn.Module, name: str) -> nn.Module:
    prefix, _, _ = name.rpartition(".")
    return model.get_submodule(prefix) if prefix else model


#: Layers whose ``weight`` multiplies the input (a matrix or a kernel): prunable whatever its shape.
_WEIGHT_LAYERS: tuple[type, ...] = (
    nn.Linear,
    nn.modules.conv._ConvNd,  # Conv1d/2d/3d and ConvTranspose1d/2d/3d (and the lazy ones, once materialized)
    nn.Embedding,
    nn.EmbeddingBag,
    nn.Bilinear,
)
#: nn.MultiheadAttention's own projection matrices (``out_proj`` is an nn.Linear of its own).
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _is_layer_weight(owner: nn.Module, attr: str) -> bool:
    if isinstance(owner, nn.MultiheadAttention):
        return attr in _ATTENTION_WEIGHTS
    if attr != "weight":
        return False
    if isinstance(owner, _WEIGHT_LAYERS):
        return True
    # Hugging Face's GPT-2 style Conv1D (a Linear with a transposed weight), matched without importing transformers.
    return type(owner).__name__ == "Conv1D" and type(owner).__module__.startswith("transformers.")


def is_default_prunable(model: nn.Module, name: str, aliases: Sequence[str] = ()) -> bool:
    """The default-selection rule documented in the module docstring.

    ``aliases``: the parameter's other names (tied weights); it is a layer's
    weight if any of its names is.
    """
    p = model.get_parameter(name)
    owner = _owner(model, name)
    if p.dim() < 2 or isinstance(owner, _NORM_TYPES) or "norm" in type(owner).__name__.lower():
        return False
    if any(_is_layer_weight(_owner(model, n), n.rpartition(".")[2]) for n in (name, *aliases)):
        return True
    return sum(1 for d in p.shape if d > 1) >= 2


def make_plan(model: nn.Module, config: PruningConfig) -> PruningPlan:
    """Assign each selected parameter to exactly one pruner, or raise :class:`ConfigError`."""
    aliases = parameter_aliases(model)
    canonical = {alias: name for name, names in aliases.items() for alias in names}
    prunable = [n for n in aliases if is_default_prunable(model, n, aliases[n])]
    prunable_set = set(prunable)
    source = config.source

    claims: dict[str, str] = {}  # canonical name -> pruner
    for p in config.pruners:
        if p.weights is None:
            continue
        path = f"{p.key_path}.weights"
        for entry in p.weights:
            matched = _match(entry, aliases, canonical, prunable, prunable_set, path, source)
            for name in matched:
                other = claims.get(name)
                if other is not None and other != p.name:
                    raise ConfigError(
                        f"weight {name!r} (from {entry!r}) is claimed by two pruners: "
                        f"{other!r} and {p.name!r}",
                        path,
                        source,
                    )
                claims[name] = p.name

    defaults = [p for p in config.pruners if p.weights is None]
    if len(defaults) > 1:
        raise ConfigError(
            f"pruners {defaults[0].name!r} and {defaults[1].name!r} both have no 'weights', so both "
            "would claim every remaining prunable weight; give one of them a 'weights' list",
            f"{defaults[1].key_path}.weights",
            source,
        )
    if defaults:
        p = defaults[0]
        rest = [n for n in prunable if n not in claims]
        if not rest:
            raise ConfigError(
                "no 'weights' given and no prunable weight is left for this pruner "
                f"(the model has {len(prunable)} prunable weights"
                + (", all claimed by other pruners)" if prunable else ")"),
                p.key_path,
                source,
            )
        for n in rest:
            claims[n] = p.name

    for p in config.pruners:
        if not any(v == p.name for v in claims.values()):
            raise ConfigError("this pruner selects no weight", p.key_path, source)

    targets = tuple(
        WeightTarget(
            name=n,
            aliases=tuple(aliases[n]),
            pruner=claims[n],
            shape=tuple(model.get_parameter(n).shape),
        )
        for n in aliases
        if n in claims
    )
    from fxprune.masks import check_pattern_shapes  # N:M needs the input dim divisible by M

    check_pattern_shapes([(t.name, t.pruner, t.shape) for t in targets], config)
    return PruningPlan(targets=targets, pruners={p.name: p for p in config.pruners})


def _match(
    entry: str,
    aliases: dict[str, list[str]],
    canonical: dict[str, str],
    prunable: list[str],
    prunable_set: set[str],
    path: str,
    source: str | None,
) -> list[str]:
    if entry in canonical:
        return [canonical[entry]]
    if entry.startswith("re:"):
        try:
            rx = re.compile(entry[3:])
        except re.error as e:
            raise ConfigError(f"invalid regular expression {entry!r}: {e}", path, source) from None
        hit = lambda n: rx.fullmatch(n) is not None  # noqa: E731
        kind = "regular expression"
    elif any(c in entry for c in "*?["):
        hit = lambda n: fnmatch.fnmatchcase(n, entry)  # noqa: E731
        kind = "pattern"
    else:
        close = difflib.get_close_matches(entry, list(canonical), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"the model has no parameter named {entry!r}{hint}", path, source)
    matched = [n for n in prunable if any(hit(a) for a in aliases[n])]
    if not matched:
        others = [a for a in canonical if hit(a)]
        if others:
            raise ConfigError(
                f"{kind} {entry!r} matches only parameters that are not prunable by default "
                f"(biases, normalization, vectors): {', '.join(others[:5])}"
                + (" ..." if len(others) > 5 else "")
                + "; name them exactly to prune them anyway",
                path,
                source,
            )
        raise ConfigError(f"{kind} {entry!r} matches no parameter of the model", path, source)
    return matched
