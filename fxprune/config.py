"""YAML / dict -> frozen, validated dataclasses.

The config keeps the shape of the seed design (``lpot-pruning-design.md``)::

    pruning:
      magnitude:            # a policy name
        prune1:             # a pruner: a name of your choice
          weights: [...]    # optional: names or globs; default all prunable weights
          target_sparsity: 0.3   # any global key may be overridden here
      start_epoch: 0        # global keys: defaults for every pruner
      end_epoch: 4
      frequency: 1
      init_sparsity: 0.05
      target_sparsity: 0.25

Precedence, stated once: a pruner's own key > the global key > the default in
:data:`SETTING_DEFAULTS`. Validation that needs only the config happens here;
validation that needs the model (weights that match nothing, weights claimed
twice) happens in :mod:`fxprune.plan`. Both run before the model is touched.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from fxprune.errors import ConfigError

__all__ = ["PrunerConfig", "PruningConfig", "load_config", "SETTING_DEFAULTS", "POLICY_NAMES"]

#: Policies a pruner may be declared under (``pruning.<policy>.<pruner>``).
POLICY_NAMES = ("magnitude",)

#: Schedules (``schedule:``); the formulas live in :mod:`fxprune.schedules`.
SCHEDULE_NAMES = ("linear", "cubic", "oneshot")

#: Global keys and their defaults (the seed's defaults). Every one may be overridden per pruner.
SETTING_DEFAULTS: dict[str, Any] = {
    "start_epoch": 0,  # first epoch with a non-zero goal
    "end_epoch": 4,  # epoch at which the goal reaches target_sparsity, exactly
    "frequency": 2,  # epochs between goal updates inside [start_epoch, end_epoch]
    "init_sparsity": 0.0,  # goal at start_epoch
    "target_sparsity": 0.5,  # goal from end_epoch on
    "schedule": "linear",  # how the goal rises between start_epoch and end_epoch
}

_PRUNER_ONLY_KEYS = ("weights",)


@dataclass(frozen=True)
class PrunerConfig:
    """One pruner: a set of weights, a policy, and the schedule of its sparsity goal.

    Defaults match the seed's; ``weights=None`` means every prunable weight
    not named by another pruner (see :func:`fxprune.plan.default_prunable`).
    """

    name: str = "prune1"
    policy: str = "magnitude"
    weights: tuple[str, ...] | None = None
    start_epoch: int = SETTING_DEFAULTS["start_epoch"]
    end_epoch: int = SETTING_DEFAULTS["end_epoch"]
    frequency: int = SETTING_DEFAULTS["frequency"]
    init_sparsity: float = SETTING_DEFAULTS["init_sparsity"]
    target_sparsity: float = SETTING_DEFAULTS["target_sparsity"]
    schedule: str = SETTING_DEFAULTS["schedule"]

    def __post_init__(self) -> None:
        if isinstance(self.weights, (list, str)):
            object.__setattr__(self, "weights", tuple([self.weights] if isinstance(self.weights, str) else self.weights))

    @property
    def key_path(self) -> str:
        """Where this pruner lives in the YAML, for error messages."""
        return f"pruning.{self.policy}.{self.name}"


@dataclass(frozen=True)
class PruningConfig:
    """The whole ``pruning:`` section: one or more pruners, already resolved.

    ``source`` is the file the config came from, kept so that errors found
    later (against the model) can still name the file.
    """

    pruners: tuple[PrunerConfig, ...] = field(default_factory=lambda: (PrunerConfig(),))
    source: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "pruners", tuple(self.pruners))
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain ``{'pruning': ...}`` dict that :func:`load_config` reads back."""
        section: dict[str, Any] = {}
        for p in self.pruners:
            body = {k: getattr(p, k) for k in SETTING_DEFAULTS}
            if p.weights is not None:
                body["weights"] = list(p.weights)
            section.setdefault(p.policy, {})[p.name] = body
        return {"pruning": section}


def load_config(config: str | os.PathLike | Mapping[str, Any] | PruningConfig) -> PruningConfig:
    """Read a YAML file, a dict (with or without the ``pruning:`` key) or a typed config.

    Raises :class:`ConfigError` naming the key path and the file on any problem.
    """
    if isinstance(config, PruningConfig):
        return config
    source: str | None = None
    if isinstance(config, (str, os.PathLike)):
        source = os.fspath(config)
        try:
            with open(source, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError("config file not found", "pruning", source) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid YAML: {e}", "pruning", source) from None
    elif isinstance(config, Mapping):
        data = config
    else:
        raise ConfigError(
            f"expected a YAML path, a dict or a PruningConfig, got {type(config).__name__}"
        )
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping, got {type(data).__name__}", "pruning", source)
    section = data["pruning"] if "pruning" in data else data
    return _parse_section(section, source)


def _parse_section(section: Any, source: str | None) -> PruningConfig:
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"must be a mapping, got {type(section).__name__}", "pruning", source)
    known = list(SETTING_DEFAULTS) + list(POLICY_NAMES)
    for key in section:
        if key not in known:
            raise ConfigError(_unknown(key, known, "key"), f"pruning.{key}", source)
    globals_ = {k: section[k] for k in SETTING_DEFAULTS if k in section}
    for k, v in globals_.items():
        _check_setting(k, v, f"pruning.{k}", source)

    pruners: list[PrunerConfig] = []
    for policy in POLICY_NAMES:
        if policy not in section:
            continue
        group = section[policy]
        path = f"pruning.{policy}"
        if group is None or not isinstance(group, Mapping) or not group:
            raise ConfigError(
                "must map pruner names to their settings, e.g. {prune1: {weights: [...]}}",
                path,
                source,
            )
        for name, body in group.items():
            ppath = f"{path}.{name}"
            if not isinstance(name, str):
                raise ConfigError("a pruner name must be a string", ppath, source)
            body = {} if body is None else body
            if not isinstance(body, Mapping):
                raise ConfigError(
                    f"must be a mapping of settings, got {type(body).__name__}", ppath, source
                )
            allowed = list(SETTING_DEFAULTS) + list(_PRUNER_ONLY_KEYS)
            for key in body:
                if key not in allowed:
                    raise ConfigError(_unknown(key, allowed, "pruner key"), f"{ppath}.{key}", source)
            settings = dict(SETTING_DEFAULTS)
            settings.update(globals_)
            for k in SETTING_DEFAULTS:
                if k in body:
                    _check_setting(k, body[k], f"{ppath}.{k}", source)
                    settings[k] = body[k]
            weights = _parse_weights(body.get("weights"), f"{ppath}.weights", source)
            pruners.append(
                PrunerConfig(
                    name=name,
                    policy=policy,
                    weights=weights,
                    start_epoch=settings["start_epoch"],
                    end_epoch=settings["end_epoch"],
                    frequency=settings["frequency"],
                    init_sparsity=float(settings["init_sparsity"]),
                    target_sparsity=float(settings["target_sparsity"]),
                    schedule=settings["schedule"],
                )
            )
    if not pruners:
        raise ConfigError(
            "no pruner defined: add one under a policy, e.g. 'magnitude: {prune1: {}}' "
            f"(policies: {', '.join(POLICY_NAMES)})",
            "pruning",
            source,
        )
    return PruningConfig(pruners=tuple(pruners), source=source)


def _parse_weights(value: Any, path: str, source: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError("must be a non-empty list of parameter names or glob patterns", path, source)
    for i, w in enumerate(value):
        if not isinstance(w, str) or not w:
            raise ConfigError(f"item {i} must be a non-empty string, got {w!r}", path, source)
    return tuple(value)


def _check_setting(key: str, value: Any, path: str, source: str | None) -> None:
    """Type and range checks for one setting, independent of the others."""
    if key in ("start_epoch", "end_epoch", "frequency"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer, got {value!r}", path, source)
        if key == "frequency" and value < 1:
            raise ConfigError(f"must be >= 1, got {value}", path, source)
        if key != "frequency" and value < 0:
            raise ConfigError(f"must be >= 0, got {value}", path, source)
    elif key in ("init_sparsity", "target_sparsity"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"must be a number in [0, 1), got {value!r}", path, source)
        if not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"must be in [0, 1), got {value}", path, source)
    elif key == "schedule":
        if value not in SCHEDULE_NAMES:
            raise ConfigError(_unknown(value, SCHEDULE_NAMES, "schedule"), path, source)


def _validate(config: PruningConfig) -> None:
    """Checks across fields and pruners; also run for configs built in Python."""
    source = config.source
    if not config.pruners:
        raise ConfigError("no pruner defined", "pruning", source)
    seen: dict[str, str] = {}
    for p in config.pruners:
        if not isinstance(p, PrunerConfig):
            raise ConfigError(f"pruners must be PrunerConfig objects, got {type(p).__name__}", "pruning", source)
        if p.policy not in POLICY_NAMES:
            raise ConfigError(_unknown(p.policy, POLICY_NAMES, "policy"), f"pruning.{p.policy}", source)
        for k in SETTING_DEFAULTS:
            _check_setting(k, getattr(p, k), f"{p.key_path}.{k}", source)
        if p.weights is not None:
            _parse_weights(list(p.weights), f"{p.key_path}.weights", source)
        if p.start_epoch > p.end_epoch:
            raise ConfigError(
                f"start_epoch ({p.start_epoch}) must be <= end_epoch ({p.end_epoch})",
                f"{p.key_path}.start_epoch",
                source,
            )
        if p.init_sparsity > p.target_sparsity:
            raise ConfigError(
                f"init_sparsity ({p.init_sparsity}) must be <= target_sparsity ({p.target_sparsity}): "
                "masks only grow",
                f"{p.key_path}.init_sparsity",
                source,
            )
        if p.name in seen:
            raise ConfigError(
                f"pruner name {p.name!r} is used twice (also at {seen[p.name]})", p.key_path, source
            )
        seen[p.name] = p.key_path


def _unknown(key: Any, known: Any, what: str) -> str:
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {key!r}{hint}; expected one of: {', '.join(map(str, known))}"
