"""Look at a config before training: which pruner takes which weight (and why others are left), the goals
over time, and a one-shot prune to the targets. The ``fxprune`` command line prints these; they are
plain Python calls too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from fxprune.config import PruningConfig, load_config
from fxprune.plan import PruningPlan, _owner, _NORM_TYPES, is_default_prunable, make_plan, parameter_aliases
from fxprune.pruner import Pruner
from fxprune.report import PrepareReport

__all__ = ["ConfigCheck", "check_config", "skip_reason", "schedule_pruner", "plot_schedule", "prune_to_targets"]


def _window(p) -> str:
    start, end, frequency = p.window
    unit = "steps" if p.by_step else "epochs"
    return f"{unit} {start}..{end} every {frequency}"


@dataclass(frozen=True)
class ConfigCheck:
    """A validated config, and against a model: the plan, the skipped parameters and how each weight is masked."""

    config: PruningConfig
    plan: PruningPlan | None = None
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # parameter -> why no pruner takes it
    prepare_report: PrepareReport | None = None

    def __str__(self) -> str:
        cfg = self.config
        lines = [f"config {cfg.source or '<dict>'}: valid, {len(cfg.pruners)} pruner(s)"]
        for p in cfg.pruners:
            names = self.plan.names_of(p.name) if self.plan else []
            count = f": {len(names)} weight(s)" if self.plan else ""
            lines.append(f"pruner {p.name} ({p.policy}, {p.pattern}, {p.scope}, target {p.target_sparsity}, "
                         f"{p.schedule} over {_window(p)}){count}")
            routes = self.prepare_report.routes if self.prepare_report else {}
            for n in names:
                route = f"  [{routes[n]}]" if n in routes else ""
                lines.append(f"  {n}  {'x'.join(map(str, self.shapes.get(n, ())))}{route}")
        if self.plan is not None:
            lines.append(f"skipped: {len(self.skipped)} parameter(s)")
            lines += [f"  {n}: {why}" for n, why in self.skipped.items()]
        if self.prepare_report is not None:
            lines.append(str(self.prepare_report).splitlines()[0])
        return "\n".join(lines)


def skip_reason(model: nn.Module, name: str) -> str:
    """Why the default selection leaves parameter ``name`` unpruned (the rule of :mod:`fxprune.plan`)."""
    if is_default_prunable(model, name):
        return "prunable, but no pruner selects it (every pruner has a 'weights' list that leaves it out)"
    owner = _owner(model, name)
    if isinstance(owner, _NORM_TYPES) or "norm" in type(owner).__name__.lower():
        return f"parameter of a normalization layer ({type(owner).__name__}); name it exactly to prune it"
    shape = tuple(model.get_parameter(name).shape)
    return f"shape {shape} has fewer than 2 dimensions of size > 1 (bias, scale, vector); name it exactly to prune it"


def check_config(config: Any, model: nn.Module | None = None, *, prepare: bool = True,
                 example_inputs: Any = None) -> ConfigCheck:
    """Validate ``config`` (raises :class:`fxprune.ConfigError`), and with a ``model`` resolve it against it.

    With ``prepare=True`` the model is also prepared (on a copy; ``model`` is
    not modified), so tracing problems surface here and each weight shows how
    it is masked (``graph`` / ``module``).
    """
    cfg = load_config(config)
    if model is None:
        return ConfigCheck(cfg)
    plan = make_plan(model, cfg)
    taken = {t.name for t in plan.targets}
    skipped = {n: skip_reason(model, n) for n in parameter_aliases(model) if n not in taken}
    shapes = {t.name: t.shape for t in plan.targets}
    report = None
    if prepare:
        import warnings

        from fxprune.prepare import TraceFallbackWarning, prepare as prepare_model

        with warnings.catch_warnings():  # the report below says the same
            warnings.simplefilter("ignore", TraceFallbackWarning)
            report = prepare_model(model, cfg, example_inputs=example_inputs).pruner.prepare_report
    return ConfigCheck(cfg, plan, shapes, skipped, report)


def schedule_pruner(config: Any) -> Pruner:
    """A model-free :class:`fxprune.Pruner` of ``config`` for dry runs: ``goal_at`` and ``schedule_table``."""
    cfg = load_config(config)
    return Pruner(cfg, PruningPlan(targets=(), pruners={p.name: p for p in cfg.pruners}), [],
                  PrepareReport(traced=False))


def plot_schedule(table: list[dict[str, float]], path: str, *, title: str = "sparsity goals") -> None:
    """Step plot of each pruner's goal from ``Pruner.schedule_table`` rows; saved to ``path`` (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'fxprune[plot]'") from None
    if not table:
        raise ValueError("empty schedule table: nothing to plot")
    unit = next(iter(table[0]))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name in list(table[0])[1:]:
        ax.step([row[unit] for row in table], [row[name] for row in table], where="post", label=name)
    ax.set_xlabel(unit)
    ax.set_ylabel("sparsity goal")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prune_to_targets(model: nn.Module, config: Any, *, example_inputs: Any = None) -> nn.Module:
    """A pruned copy of ``model``: every pruner's weights cut to its target at once by magnitude (no training).

    For a quick look at what a config's sparsity does to size and speed
    (``fxprune speedup --config``); the policy in the config is replaced by
    magnitude, which needs no data; patterns, scopes and targets are kept.
    """
    from fxprune.convert import convert
    from fxprune.prepare import prepare

    cfg = load_config(config)
    magnitude = PruningConfig(pruners=tuple(dataclasses.replace(p, policy="magnitude") for p in cfg.pruners),
                              source=cfg.source)
    prepared = prepare(model, magnitude, example_inputs=example_inputs)
    pruner = prepared.pruner
    epoch_ends = [p.end_epoch for p in magnitude.pruners if not p.by_step]
    step_ends = [p.end_step for p in magnitude.pruners if p.by_step]
    pruner.epoch.fill_(max(epoch_ends, default=0))
    pruner.step.fill_(max(step_ends, default=0))
    pruner.update_masks()
    return convert(prepared, inplace=True)
