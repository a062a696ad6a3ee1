"""sensitivity(): how much does each layer alone tolerate pruning?

Layers differ widely in how much pruning they tolerate (the first conv, the
classifier and attention output projections usually least). Sweeping each
prunable weight *alone* over a few sparsities -- magnitude masks, one shot,
no retraining -- shows which layers to spare and gives per-layer targets
(Han et al. 2015, Section 4.2; the "pruning sensitivity" analysis of
Distiller and NNCF). The sweep runs on a private copy of the model, so the
input model is never touched, not even transiently.

    table = fxprune.sensitivity(model, lambda m: evaluate_loss(m, val_loader), sparsities=[0.5, 0.7, 0.9])
    print(table)
    config = table.to_config(max_degradation=0.05, end_epoch=10)   # per-layer targets
    prepared = fxprune.prepare(model, config)
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from fxprune.config import PrunerConfig, PruningConfig, load_config
from fxprune.errors import ConfigError
from fxprune.graph_module import PreparedGraphModule
from fxprune.masks import local_unstructured_mask
from fxprune.plan import make_plan

__all__ = ["sensitivity", "SensitivityTable"]


@dataclass(frozen=True)
class SensitivityTable:
    """Metric of the model with one weight pruned, per weight and sparsity, plus the dense baseline.

    ``values[name][i]`` is ``eval_fn`` with only ``name`` pruned to
    ``sparsities[i]`` (magnitude, one shot). ``higher_is_better`` says which
    way the metric points (False: a loss; True: an accuracy), so that
    :meth:`degradation` is always "how much worse than dense".
    """

    baseline: float
    sparsities: tuple[float, ...]
    values: dict[str, tuple[float, ...]]
    numels: dict[str, int]
    higher_is_better: bool = False

    def degradation(self, name: str) -> tuple[float, ...]:
        """How much worse than dense, per sparsity (positive = worse)."""
        sign = -1.0 if self.higher_is_better else 1.0
        return tuple(sign * (v - self.baseline) for v in self.values[name])

    def targets(self, max_degradation: float) -> dict[str, float]:
        """Per weight, the highest swept sparsity reached before the first one that degrades by more than
        ``max_degradation`` (0.0 when even the lowest does). Stopping at the first failure keeps a noisy
        metric from skipping over a sparsity that already hurt."""
        if not (isinstance(max_degradation, (int, float)) and math.isfinite(max_degradation)):
            raise ValueError(f"max_degradation must be a finite number, got {max_degradation!r}")
        out: dict[str, float] = {}
        for name in self.values:
            best = 0.0
            for s, d in zip(self.sparsities, self.degradation(name)):
                if not d <= max_degradation:  # NaN counts as a failure
                    break
                best = s
            out[name] = best
        return out

    def to_config(
        self, max_degradation: float, *, group: bool = True, policy: str = "magnitude", **settings: Any
    ) -> dict[str, Any]:
        """A config dict (``{'pruning': ...}``, accepted by :func:`fxprune.load_config` and ``prepare``)
        that prunes each weight to its :meth:`targets` sparsity.

        ``group=True``: one pruner per distinct target (``sparsity_50`` with
        every weight that tolerates 50%); ``group=False``: one pruner per
        weight. Weights whose target is 0 are left out. ``settings`` are
        global keys (``end_epoch``, ``schedule``, ...), applied to every
        pruner; ``target_sparsity`` comes from the sweep and cannot be given.
        """
        if "target_sparsity" in settings:
            raise ValueError("to_config(): target_sparsity is set per layer from the sweep; do not pass it")
        targets = {n: s for n, s in self.targets(max_degradation).items() if s > 0}
        if not targets:
            lowest = self.sparsities[0]
            worst = {n: self.degradation(n)[0] for n in self.values}
            least = min(worst, key=lambda n: worst[n])
            raise ValueError(
                f"to_config(): no weight stays within max_degradation={max_degradation} even at sparsity "
                f"{lowest}; the least sensitive is {least!r} (degradation {worst[least]:.6g})"
            )
        pruners: dict[str, dict[str, Any]] = {}
        if group:
            for s in sorted(set(targets.values())):
                name = f"sparsity_{s * 100:g}".replace(".", "_")
                pruners[name] = {"weights": [n for n, t in targets.items() if t == s], "target_sparsity": s}
        else:
            for n, s in targets.items():
                name = n.replace(".", "_")
                while name in pruners:
                    name += "_"
                pruners[name] = {"weights": [n], "target_sparsity": s}
        config = {"pruning": {policy: pruners, **settings}}
        load_config(config)  # fail here, with the key path, rather than at prepare()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML friendly)."""
        return {
            "baseline": self.baseline,
            "sparsities": list(self.sparsities),
            "higher_is_better": self.higher_is_better,
            "values": {n: list(v) for n, v in self.values.items()},
            "numels": dict(self.numels),
        }

    def __str__(self) -> str:
        header = ["weight", "numel", *(f"{s:g}" for s in self.sparsities)]
        rows = [[n, str(self.numels[n]), *(f"{v:.5g}" for v in self.values[n])] for n in self.values]
        dense = ["(dense baseline)", "", f"{self.baseline:.5g}", *([""] * (len(self.sparsities) - 1))]
        widths = [max(len(r[i]) for r in [header, dense, *rows]) for i in range(len(header))]

        def fmt(r: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

        rule = "-" * len(fmt(header))
        return "\n".join([fmt(header), rule, fmt(dense), rule, *map(fmt, rows)])

    def plot(self, path: str | None = None) -> Any:
        """Metric vs sparsity, one line per weight, dense baseline dashed. Returns the matplotlib Figure;
        saves it to ``path`` when given. Needs matplotlib (imported only here)."""
        try:
            from matplotlib.figure import Figure
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("SensitivityTable.plot() needs matplotlib: pip install matplotlib") from e
        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot()
        for name, values in self.values.items():
            ax.plot(self.sparsities, values, marker="o", label=name)
        ax.axhline(self.baseline, color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_xlabel("sparsity of the one pruned weight")
        ax.set_ylabel("metric (higher is better)" if self.higher_is_better else "metric (lower is better)")
        ax.set_title("Pruning sensitivity per weight")
        if len(self.values) <= 20:
            ax.legend(fontsize="small")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig


def sensitivity(
    model: nn.Module,
    eval_fn: Callable[[nn.Module], float],
    sparsities: Sequence[float] = (0.25, 0.5, 0.75, 0.9),
    weights: Iterable[str] | None = None,
    *,
    higher_is_better: bool = False,
) -> SensitivityTable:
    """Prune each weight alone to each sparsity (magnitude, one shot), evaluate, restore; return the table.

    ``eval_fn(m)`` returns a number (a loss by default; pass
    ``higher_is_better=True`` for an accuracy) and must evaluate the module it
    is given: that is a private copy of ``model``, which itself is never
    modified. ``weights`` takes names, globs and ``re:`` patterns as in a
    config; by default every prunable weight (see :mod:`fxprune.plan`).
    Tied weights are one weight. Cost: ``1 + len(weights) * len(sparsities)``
    evaluations.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sensitivity() expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, PreparedGraphModule):
        raise TypeError("sensitivity() expects a plain model; pass the original, or fxprune.convert() a prepared one")
    levels = tuple(float(s) for s in sparsities)
    if not levels or any(not 0.0 < s < 1.0 for s in levels) or list(levels) != sorted(set(levels)):
        raise ValueError(f"sparsities must be increasing, distinct and in (0, 1), got {list(sparsities)!r}")
    names = _resolve(model, weights)

    work = copy.deepcopy(model)
    baseline = _evaluate(eval_fn, work, "dense")
    values: dict[str, tuple[float, ...]] = {}
    numels: dict[str, int] = {}
    for name in names:
        p = work.get_parameter(name)
        saved = p.detach().clone()
        scores = saved.abs().float() if saved.dtype in (torch.float16, torch.bfloat16) else saved.abs()
        keep_all = torch.ones_like(saved, dtype=torch.bool)
        row = []
        for s in levels:
            mask = local_unstructured_mask(scores, keep_all, s)
            with torch.no_grad():
                p.mul_(mask)
            try:
                row.append(_evaluate(eval_fn, work, f"{name} at sparsity {s:g}"))
            finally:
                with torch.no_grad():
                    p.copy_(saved)
        values[name] = tuple(row)
        numels[name] = saved.numel()
    return SensitivityTable(baseline, levels, values, numels, higher_is_better)


def _resolve(model: nn.Module, weights: Iterable[str] | None) -> list[str]:
    """Canonical parameter names, with the config's matching rules and errors."""
    entries = None if weights is None else tuple([weights] if isinstance(weights, str) else weights)
    try:
        plan = make_plan(model, PruningConfig(pruners=(PrunerConfig(name="sensitivity", weights=entries),)))
    except ConfigError as e:
        raise ValueError(f"sensitivity(weights=...): {e.message}") from None
    return [t.name for t in plan.targets]


def _evaluate(eval_fn: Callable[[nn.Module], Any], model: nn.Module, what: str) -> float:
    value = eval_fn(model)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"eval_fn must return a number, got {type(value).__name__} ({what})") from None
