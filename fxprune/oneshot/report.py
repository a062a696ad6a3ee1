"""What :func:`fxprune.oneshot` did, weight by weight."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["OneshotReport", "WeightResult"]


@dataclass(frozen=True)
class WeightResult:
    """One pruned weight.

    ``error`` is the relative reconstruction error ``||W X - W' X||^2 / ||W X||^2``
    over the calibration inputs ``X`` that reached the weight (``None`` without
    calibration). For a stacked-experts weight it is summed over experts
    (each on its own tokens), and ``rows`` counts every expert's rows.
    """

    name: str
    shape: tuple[int, ...]
    policy: str
    pattern: str
    pruner: str
    sparsity: float  # fraction of entries that are zero afterwards
    error: float | None
    rows: int  # input vectors (tokens, positions) seen
    block: str | None  # the sequential block it was pruned in; None outside blocks or when not sequential


@dataclass
class OneshotReport:
    """Per-weight results, the overall sparsity of the pruned weights and the wall time.

    ``print(report)`` shows a table; :meth:`to_dict` gives plain data (for JSON).
    """

    weights: list[WeightResult] = field(default_factory=list)
    sequential: bool = True
    seconds: float = 0.0
    calibration_batches: int = 0

    @property
    def total_sparsity(self) -> float:
        """Zero entries over all entries of the pruned weights."""
        total = sum(_numel(w.shape) for w in self.weights)
        zeros = sum(w.sparsity * _numel(w.shape) for w in self.weights)
        return zeros / total if total else 0.0

    def __getitem__(self, name: str) -> WeightResult:
        for w in self.weights:
            if w.name == name:
                return w
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": [asdict(w) | {"shape": list(w.shape)} for w in self.weights],
            "total_sparsity": self.total_sparsity,
            "sequential": self.sequential,
            "seconds": self.seconds,
            "calibration_batches": self.calibration_batches,
        }

    def __str__(self) -> str:
        head = ("weight", "shape", "policy", "pattern", "sparsity", "rel. error", "rows")
        rows = [
            (
                w.name,
                "x".join(map(str, w.shape)),
                w.policy,
                w.pattern,
                f"{w.sparsity:.4f}",
                "-" if w.error is None else f"{w.error:.3e}",
                str(w.rows),
            )
            for w in self.weights
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(widths[i]) if i < 4 else c.rjust(widths[i]) for i, c in enumerate(r))  # noqa: E731
        mode = "sequential" if self.sequential else "whole model"
        lines = [
            f"one-shot pruning ({mode}, {self.calibration_batches} calibration batches, {self.seconds:.1f} s): "
            f"{len(self.weights)} weights, total sparsity {self.total_sparsity:.4f}",
            fmt(head),
            fmt(tuple("-" * w for w in widths)),
            *map(fmt, rows),
        ]
        return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
