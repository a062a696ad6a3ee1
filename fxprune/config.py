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
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from fxprune.errors import ConfigError

__all__ = [
    "PrunerConfig",
    "PruningConfig",
    "load_config",
    "SETTING_DEFAULTS",
    "POLICY_NAMES",
    "WINDOW_KEYS",
    "SCOPE_NAMES",
    "PATTERN_NAMES",
    "nm_ratio",
    "DEFAULT_GLOBAL_MAX_SPARSITY",
    "default_max_sparsity",
    "ONESHOT_ONLY_POLICIES",
]

#: Policies a pruner may be declared under (``pruning.<policy>.<pruner>``).
POLICY_NAMES = ("magnitude", "movement", "wanda", "lamp", "sparsegpt")

#: Policies that only one-shot pruning (:func:`fxprune.oneshot`) can run: they rewrite weights, not masks.
ONESHOT_ONLY_POLICIES = ("sparsegpt",)

#: Schedules (``schedule:``); the formulas live in :mod:`fxprune.schedules`.
SCHEDULE_NAMES = ("linear", "cubic", "oneshot")

#: Scopes (``scope:``) and named patterns (``pattern:``; ``"N:M"`` strings are patterns too).
SCOPE_NAMES = ("local", "global")
PATTERN_NAMES = ("unstructured", "channel")

#: Global keys and their defaults (the seed's defaults). Every one may be overridden per pruner.
SETTING_DEFAULTS: dict[str, Any] = {
    "start_epoch": 0,  # first epoch with a non-zero goal
    "end_epoch": 4,  # epoch at which the goal reaches target_sparsity, exactly
    "frequency": 2,  # epochs between goal updates inside [start_epoch, end_epoch]
    "init_sparsity": 0.0,  # goal at start_epoch
    "target_sparsity": 0.5,  # goal from end_epoch on
    "schedule": "linear",  # how the goal rises between start_epoch and end_epoch
    # Step windows: count optimizer steps instead of epochs (see WINDOW_KEYS). Unset by default.
    "start_step": None,  # first step with a non-zero goal (default 0 when end_step is set)
    "end_step": None,  # step at which the goal reaches target_sparsity; setting it selects step windows
    "frequency_steps": None,  # steps between goal updates (default 1 when end_step is set)
    # Mask shape (fxprune.masks): which weights compete for the goal, and in which pattern.
    "scope": "local",  # 'local': every tensor at the goal; 'global': one threshold over the pruner's tensors
    "pattern": "unstructured",  # 'unstructured', 'channel' (whole output channels) or 'N:M' such as '2:4'
    "min_sparsity": None,  # scope global: no tensor pruned less than this (or the goal, if lower)
    "max_sparsity": None,  # scope global: no tensor pruned more than this (unset: default_max_sparsity; 1.0: no cap)
    # Channel groups (pattern: channel, fxprune.structured.importance): how many channels each group keeps.
    "min_channels": 1,  # every group keeps at least this many channels (all of them if it has fewer)
    "round_to": 1,  # kept channels per group a multiple of this (e.g. 8 for tensor cores)
    # SparseGPT solver (fxprune.oneshot.sparsegpt); only sparsegpt pruners may set them.
    "dampening_frac": 0.01,  # added to the Hessian's diagonal, as a fraction of its mean
    "block_size": 128,  # input columns per lazy batched update
}

#: The per-tensor cap a global pruner uses when ``max_sparsity`` is unset: one threshold over
#: layers of very different sizes can otherwise empty a whole layer (a classifier left with 25 of
#: 2M weights). Intel Neural Compressor caps layers at 0.98 by default for the same reason.
DEFAULT_GLOBAL_MAX_SPARSITY = 0.98


def default_max_sparsity(target_sparsity: float) -> float:
    """The cap of an unset ``max_sparsity`` under ``scope: global``, for a pruner's target.

    0.98, or, for targets above 0.8, the sparsity that keeps a tenth of the
    target's share of weights (target 0.99 -> 0.999), so the cap never makes
    the target unreachable.
    """
    return max(DEFAULT_GLOBAL_MAX_SPARSITY, 1.0 - (1.0 - target_sparsity) / 10.0)


#: Keys only the solver of these policies reads: a pruner of another policy that sets one is an error.
SOLVER_KEYS: dict[str, tuple[str, ...]] = {"dampening_frac": ("sparsegpt",), "block_size": ("sparsegpt",)}

#: Keys of the whole section only (not per pruner). ``sequential_targets``: which modules
#: fxprune.oneshot calibrates one at a time (class names or module-path globs); default: found.
#: ``calibration_dtype``: the dtype fxprune.oneshot runs each block in while it calibrates it.
SECTION_KEYS = ("sequential_targets", "calibration_dtype")

#: ``auto``: float32 for a bfloat16/float16 block on CPU (CPU half-precision matmuls are several
#: times slower than float32 ones), the block's own dtype elsewhere; ``model``: always its own.
CALIBRATION_DTYPES = ("auto", "model", "float32")

#: The two kinds of schedule window. One section (the global keys, or one pruner) uses one kind;
#: a pruner that sets window keys of its own uses its own kind, otherwise it inherits the global kind.
WINDOW_KEYS: dict[str, tuple[str, str, str]] = {
    "epoch": ("start_epoch", "end_epoch", "frequency"),
    "step": ("start_step", "end_step", "frequency_steps"),
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
    start_step: int | None = None
    end_step: int | None = None
    frequency_steps: int | None = None
    scope: str = SETTING_DEFAULTS["scope"]
    pattern: str = SETTING_DEFAULTS["pattern"]
    min_sparsity: float | None = None
    max_sparsity: float | None = None
    min_channels: int = SETTING_DEFAULTS["min_channels"]
    round_to: int = SETTING_DEFAULTS["round_to"]
    dampening_frac: float = SETTING_DEFAULTS["dampening_frac"]
    block_size: int = SETTING_DEFAULTS["block_size"]

    def __post_init__(self) -> None:
        if isinstance(self.weights, (list, str)):
            object.__setattr__(self, "weights", tuple([self.weights] if isinstance(self.weights, str) else self.weights))
        if self.end_step is not None:  # step windows: the defaults of the other two step keys
            if self.start_step is None:
                object.__setattr__(self, "start_step", 0)
            if self.frequency_steps is None:
                object.__setattr__(self, "frequency_steps", 1)

    @property
    def by_step(self) -> bool:
        """True when the schedule counts optimizer steps (``end_step`` set), False for epochs."""
        return self.end_step is not None

    @property
    def window(self) -> tuple[int, int, int]:
        """``(start, end, frequency)`` in the schedule's unit (steps or epochs)."""
        keys = WINDOW_KEYS["step" if self.by_step else "epoch"]
        return tuple(getattr(self, k) for k in keys)  # type: ignore[return-value]

    @property
    def tensor_cap(self) -> float | None:
        """The most any one tensor may be pruned: ``max_sparsity`` or, for a global pruner, its default.

        ``None`` for local pruners (every tensor is pruned to the goal itself);
        an explicit ``max_sparsity: 1.0`` means no cap.
        """
        if self.scope != "global":
            return None
        return default_max_sparsity(self.target_sparsity) if self.max_sparsity is None else self.max_sparsity

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
    sequential_targets: tuple[str, ...] | None = None
    calibration_dtype: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pruners", tuple(self.pruners))
        if isinstance(self.sequential_targets, (list, str)):
            value = self.sequential_targets
            object.__setattr__(self, "sequential_targets", tuple([value] if isinstance(value, str) else value))
        if self.calibration_dtype not in CALIBRATION_DTYPES:
            raise ConfigError(
                f"calibration_dtype must be one of {', '.join(CALIBRATION_DTYPES)}, got {self.calibration_dtype!r}",
                "pruning.calibration_dtype",
                self.source,
            )
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain ``{'pruning': ...}`` dict that :func:`load_config` reads back."""
        section: dict[str, Any] = {}
        for p in self.pruners:
            unused = WINDOW_KEYS["epoch" if p.by_step else "step"]
            body = {k: getattr(p, k) for k in SETTING_DEFAULTS if k not in unused and p.policy in SOLVER_KEYS.get(k, (p.policy,))}
            if p.weights is not None:
                body["weights"] = list(p.weights)
            section.setdefault(p.policy, {})[p.name] = body
        if self.sequential_targets is not None:
            section["sequential_targets"] = list(self.sequential_targets)
        if self.calibration_dtype != "auto":
            section["calibration_dtype"] = self.calibration_dtype
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
    known = list(SETTING_DEFAULTS) + list(SECTION_KEYS) + list(POLICY_NAMES)
    for key in section:
        if key not in known:
            what = "policy" if isinstance(section[key], Mapping) else "key"  # `snip: {p1: {...}}` reads as a policy
            raise ConfigError(_unknown(key, known, what), f"pruning.{key}", source)
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
                if key in SOLVER_KEYS and policy not in SOLVER_KEYS[key]:
                    raise ConfigError(
                        f"is read only by {' and '.join(SOLVER_KEYS[key])} pruners, not by {policy!r}",
                        f"{ppath}.{key}",
                        source,
                    )
            settings = dict(SETTING_DEFAULTS)
            settings.update(globals_)
            for k in SETTING_DEFAULTS:
                if k in body:
                    _check_setting(k, body[k], f"{ppath}.{k}", source)
                    settings[k] = body[k]
            _resolve_window(settings, globals_, body, ppath, source)
            _resolve_nm_target(settings, globals_, body, ppath, source)
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
                    start_step=settings["start_step"],
                    end_step=settings["end_step"],
                    frequency_steps=settings["frequency_steps"],
                    scope=settings["scope"],
                    pattern=settings["pattern"],
                    min_sparsity=settings["min_sparsity"],
                    max_sparsity=settings["max_sparsity"],
                    min_channels=settings["min_channels"],
                    round_to=settings["round_to"],
                    dampening_frac=float(settings["dampening_frac"]),
                    block_size=settings["block_size"],
                )
            )
    if not pruners:
        raise ConfigError(
            "no pruner defined: add one under a policy, e.g. 'magnitude: {prune1: {}}' "
            f"(policies: {', '.join(POLICY_NAMES)})",
            "pruning",
            source,
        )
    targets = _parse_module_patterns(section.get("sequential_targets"), "pruning.sequential_targets", source)
    dtype = section.get("calibration_dtype", "auto")
    if dtype not in CALIBRATION_DTYPES:
        raise ConfigError(
            f"calibration_dtype must be one of {', '.join(CALIBRATION_DTYPES)}, got {dtype!r}",
            "pruning.calibration_dtype",
            source,
        )
    return PruningConfig(pruners=tuple(pruners), source=source, sequential_targets=targets, calibration_dtype=dtype)


def _window_kind(section: Mapping[str, Any], path: str, source: str | None) -> str | None:
    """'epoch', 'step' or None (no window key) for one section; both kinds at once is an error."""
    used = {kind: [k for k in keys if section.get(k) is not None] for kind, keys in WINDOW_KEYS.items()}
    if used["epoch"] and used["step"]:
        raise ConfigError(
            f"mixes epoch keys ({', '.join(used['epoch'])}) with step keys ({', '.join(used['step'])}); "
            "a schedule counts either epochs or optimizer steps",
            f"{path}.{used['step'][0]}",
            source,
        )
    return next((kind for kind, keys in used.items() if keys), None)


def _resolve_window(
    settings: dict[str, Any], globals_: Mapping[str, Any], body: Mapping[str, Any], path: str, source: str | None
) -> None:
    """Keep only the window keys of the kind in force for this pruner (its own, else the global one)."""
    own = _window_kind(body, path, source)
    kind = own or _window_kind(globals_, "pruning", source) or "epoch"
    for k in WINDOW_KEYS["step" if kind == "epoch" else "epoch"]:
        settings[k] = SETTING_DEFAULTS[k]
    if kind == "step" and settings["end_step"] is None:
        raise ConfigError(
            "end_step is required with step windows (start_step/frequency_steps given without it)",
            f"{path if own else 'pruning'}.end_step",
            source,
        )


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


def _parse_module_patterns(value: Any, path: str, source: str | None) -> tuple[str, ...] | None:
    """``sequential_targets``: module class names or module-path globs (one string or a list)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(
            f"must be a module class name or module-path glob, or a non-empty list of them, got {value!r}",
            path,
            source,
        )
    return tuple(items)


def _check_setting(key: str, value: Any, path: str, source: str | None) -> None:
    """Type and range checks for one setting, independent of the others."""
    if key in WINDOW_KEYS["step"] and value is None:
        return  # step keys are optional; None means unset
    if key in WINDOW_KEYS["epoch"] + WINDOW_KEYS["step"]:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer, got {value!r}", path, source)
        if key.startswith("frequency") and value < 1:
            raise ConfigError(f"must be >= 1, got {value}", path, source)
        if not key.startswith("frequency") and value < 0:
            raise ConfigError(f"must be >= 0, got {value}", path, source)
    elif key in ("init_sparsity", "target_sparsity"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"must be a number in [0, 1), got {value!r}", path, source)
        if not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"must be in [0, 1), got {value}", path, source)
    elif key == "schedule":
        if value not in SCHEDULE_NAMES:
            raise ConfigError(_unknown(value, SCHEDULE_NAMES, "schedule"), path, source)
    elif key == "scope":
        if value not in SCOPE_NAMES:
            raise ConfigError(_unknown(value, SCOPE_NAMES, "scope"), path, source)
    elif key == "pattern":
        _check_pattern(value, path, source)
    elif key == "dampening_frac":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value):
            raise ConfigError(f"must be a number >= 0, got {value!r}", path, source)
    elif key in ("min_channels", "round_to"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"must be an integer >= 1 (channels), got {value!r}", path, source)
    elif key == "block_size":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"must be an integer >= 1, got {value!r}", path, source)
    elif key in ("min_sparsity", "max_sparsity") and value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"must be a number in [0, 1] (or null for no bound), got {value!r}", path, source)


def _validate(config: PruningConfig) -> None:
    """Checks across fields and pruners; also run for configs built in Python."""
    source = config.source
    if not config.pruners:
        raise ConfigError("no pruner defined", "pruning", source)
    if config.sequential_targets is not None:
        _parse_module_patterns(list(config.sequential_targets), "pruning.sequential_targets", source)
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
        if p.by_step:
            changed = [k for k in WINDOW_KEYS["epoch"] if getattr(p, k) != SETTING_DEFAULTS[k]]
            if changed:
                raise ConfigError(
                    f"mixes epoch keys ({', '.join(changed)}) with step keys (end_step={p.end_step}); "
                    "a schedule counts either epochs or optimizer steps",
                    f"{p.key_path}.{changed[0]}",
                    source,
                )
            if p.start_step > p.end_step:  # type: ignore[operator]
                raise ConfigError(
                    f"start_step ({p.start_step}) must be <= end_step ({p.end_step})",
                    f"{p.key_path}.start_step",
                    source,
                )
        elif p.start_step is not None or p.frequency_steps is not None:
            raise ConfigError(
                "end_step is required with step windows (start_step/frequency_steps given without it)",
                f"{p.key_path}.end_step",
                source,
            )
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
        _validate_shape_keys(p, source)
        if p.name in seen:
            raise ConfigError(
                f"pruner name {p.name!r} is used twice (also at {seen[p.name]})", p.key_path, source
            )
        seen[p.name] = p.key_path


def _unknown(key: Any, known: Any, what: str) -> str:
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {key!r}{hint}; expected one of: {', '.join(map(str, known))}"


def nm_ratio(pattern: Any) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``None`` when ``pattern`` is not an N:M string."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def _check_pattern(value: Any, path: str, source: str | None) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 60:
        raise ConfigError(
            f"got the number {value}: YAML 1.1 reads an unquoted N:M such as {value // 60}:{value % 60} as a "
            f"base-60 number; quote it: pattern: '{value // 60}:{value % 60}'",
            path,
            source,
        )
    if value in PATTERN_NAMES:
        return
    nm = nm_ratio(value)
    if nm is None:
        raise ConfigError(_unknown(value, PATTERN_NAMES + ("N:M (e.g. '2:4')",), "pattern"), path, source)
    n, m = nm
    if not 0 < n < m:
        raise ConfigError(f"N:M pattern {value!r} needs 0 < N < M", path, source)


def _resolve_nm_target(
    settings: dict[str, Any], globals_: Mapping[str, Any], body: Mapping[str, Any], path: str, source: str | None
) -> None:
    """An N:M pattern fixes the pruner's target at 1 - N/M: fill it in, or reject a different one.

    A target given explicitly (in the pruner or as the global key) that is not
    1 - N/M is an error rather than being overridden, so that no number the
    user wrote is silently ignored.
    """
    nm = nm_ratio(settings["pattern"])
    if nm is None:
        return
    fixed = 1.0 - nm[0] / nm[1]
    given = "target_sparsity" in body or "target_sparsity" in globals_
    if not given:
        settings["target_sparsity"] = fixed
    elif abs(float(settings["target_sparsity"]) - fixed) > 1e-9:
        where = f"{path}.target_sparsity" if "target_sparsity" in body else "pruning.target_sparsity"
        raise ConfigError(
            f"pattern {settings['pattern']!r} fixes this pruner's sparsity at {fixed:g} (1 - N/M), but "
            f"target_sparsity is {settings['target_sparsity']} (from {where}); "
            f"set target_sparsity: {fixed:g} in this pruner or remove it",
            f"{path}.target_sparsity",
            source,
        )


def _validate_shape_keys(p: PrunerConfig, source: str | None) -> None:
    """Cross-checks of scope, pattern and the per-layer bounds of one pruner."""
    nm = nm_ratio(p.pattern)
    if nm is not None:
        fixed = 1.0 - nm[0] / nm[1]
        if abs(p.target_sparsity - fixed) > 1e-9:
            raise ConfigError(
                f"pattern {p.pattern!r} fixes this pruner's sparsity at {fixed:g} (1 - N/M), "
                f"got target_sparsity {p.target_sparsity}",
                f"{p.key_path}.target_sparsity",
                source,
            )
        if p.scope != "local":
            raise ConfigError(
                f"pattern {p.pattern!r} chooses weights within each group of {nm[1]}, so scope "
                f"{p.scope!r} does not apply; use scope: local (the default)",
                f"{p.key_path}.scope",
                source,
            )
    for key in ("min_channels", "round_to"):
        if getattr(p, key) != SETTING_DEFAULTS[key] and p.pattern != "channel":
            raise ConfigError(
                f"counts the channels each group of a channel pruner keeps; pattern {p.pattern!r} removes single "
                "weights. Set pattern: channel or remove it",
                f"{p.key_path}.{key}",
                source,
            )
    for key in ("min_sparsity", "max_sparsity"):
        if getattr(p, key) is not None and p.scope != "global":
            raise ConfigError(
                f"bounds the sparsity of each tensor of a global pruner; with scope {p.scope!r} every "
                "tensor is pruned to the goal itself. Set scope: global or remove it",
                f"{p.key_path}.{key}",
                source,
            )
    lo, hi = p.min_sparsity, p.max_sparsity
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"min_sparsity ({lo}) must be <= max_sparsity ({hi})", f"{p.key_path}.min_sparsity", source)
    if lo is not None and lo > p.target_sparsity:
        raise ConfigError(
            f"min_sparsity ({lo}) above target_sparsity ({p.target_sparsity}): every tensor would be pruned "
            "more than the overall goal allows",
            f"{p.key_path}.min_sparsity",
            source,
        )
    if hi is not None and hi < p.target_sparsity:
        raise ConfigError(
            f"max_sparsity ({hi}) below target_sparsity ({p.target_sparsity}): no tensor may reach the goal, "
            "so the overall goal cannot be met",
            f"{p.key_path}.max_sparsity",
            source,
        )
