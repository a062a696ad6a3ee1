"""The honest speed-up report: what a pruned model's zeros can and cannot buy, layer by layer.

Zeros only save time when a kernel skips them, and which kernel can depends
on the pattern: unstructured zeros need a sparse (CSR) kernel, which on CPU
pays only at high sparsity (:mod:`fxprune.kernels` measures it); 2:4 zeros
need NVIDIA sparse tensor cores; zeroed channels pay once cut out
(``convert(physical=True)``). The report puts the arithmetic (MACs, bytes)
next to measured latency (dense vs what ``kernels="auto"`` would choose), so
"will this run faster?" is answered by numbers, not hope.

Bytes "compact" are the bitmask layout: ``nnz * itemsize + ceil(numel / 8)``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from fxprune.kernels import KernelChoice, choose_kernels

__all__ = ["LayerSpeedup", "SpeedupReport", "speedup_report", "detect_pattern", "semi_structured_eligibility"]

_NM_CANDIDATES = ((1, 4), (2, 4), (1, 8), (2, 8), (3, 8), (4, 8))


def detect_pattern(weight: torch.Tensor) -> str:
    """``'dense'``, ``'channel'`` (all zeros in whole output channels), ``'N:M'`` or ``'unstructured'``.

    N:M is checked along the input dimension as :mod:`fxprune.masks` lays it
    out (at most N non-zeros in every M consecutive inputs); the smallest M,
    then the smallest N, that fits is reported -- only when the weight is not
    much sparser than the pattern asks (a 90% unstructured weight also fits
    4:8 by chance, and calling it 4:8 would hide that it is unstructured).
    """
    from fxprune.masks import _groups_view  # the N:M grouping the pruner uses, one definition

    w = weight.detach()
    zero = w == 0
    if not bool(zero.any()):
        return "dense"
    rows = zero.reshape(w.shape[0], -1)
    if w.dim() >= 2 and int(rows.all(1).sum()) * rows.shape[1] == int(zero.sum()):
        return "channel"
    if w.dim() >= 2:
        for n, m in _NM_CANDIDATES:
            if (w.movedim(1, -1) if w.dim() > 2 else w).shape[-1] % m:
                continue
            sparser = float(zero.float().mean()) > (m - n) / m + 0.02
            if not sparser and int((~_groups_view(zero, m, "weight")).sum(1).max()) <= n:
                return f"{n}:{m}"
    return "unstructured"


def _skippable_fraction(pattern: str, weight: torch.Tensor) -> float:
    """Share of MACs a kernel built for ``pattern`` skips (an N:M kernel skips (M-N)/M whatever the values)."""
    if pattern == "dense":
        return 0.0
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        return (m - n) / m
    if pattern == "channel":
        rows = (weight.detach() == 0).reshape(weight.shape[0], -1).all(1)
        return float(rows.float().mean())
    return float((weight.detach() == 0).float().mean())


def semi_structured_eligibility(module: nn.Module, pattern: str) -> str:
    """Whether torch's 2:4 kernels (``to_sparse_semi_structured``) could run this layer, and if not, why.

    ``'-'`` unless the pattern keeps at most 2 of 4. The dtype and shape rules
    are read from torch's own tables for the backend it would use
    (cuSPARSELt when available, else CUTLASS), not copied here.
    """
    if ":" not in pattern or pattern.split(":")[1] != "4":
        return "-"
    if type(module) is not nn.Linear:
        return f"no: {type(module).__name__} (torch's 2:4 kernels take Linear weights)"
    try:
        from torch.sparse.semi_structured import (
            SparseSemiStructuredTensor,
            SparseSemiStructuredTensorCUSPARSELT,
            SparseSemiStructuredTensorCUTLASS,
        )
    except ImportError:
        return f"no: torch {torch.__version__} has no semi-structured sparse tensors"
    cusparselt = getattr(torch.backends, "cusparselt", None)
    use_cusparselt = (not SparseSemiStructuredTensor._FORCE_CUTLASS and cusparselt is not None
                      and cusparselt.is_available())
    backend = SparseSemiStructuredTensorCUSPARSELT if use_cusparselt else SparseSemiStructuredTensorCUTLASS
    w = module.weight
    problems = []
    constraints = backend._DTYPE_SHAPE_CONSTRAINTS.get(w.dtype)
    if constraints is None:
        names = "/".join(str(d).replace("torch.", "") for d in backend._DTYPE_SHAPE_CONSTRAINTS)
        problems.append(f"dtype {str(w.dtype).replace('torch.', '')} (needs {names})")
    else:
        r, c = constraints.sparse_min_rows, constraints.sparse_min_cols
        rows, cols = w.shape
        if rows < r or rows % r or cols < c or cols % c:
            problems.append(f"shape {rows}x{cols} (both dims multiples of {r}x{c} for {backend.BACKEND})")
    if w.device.type != "cuda":
        problems.append(f"device {w.device.type} (needs CUDA, compute capability >= 8.0)")
    elif torch.cuda.get_device_capability(w.device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(w.device)
        problems.append(f"compute capability {major}.{minor} < 8.0")
    return "yes" if not problems else "no: " + "; ".join(problems)


@dataclass(frozen=True)
class LayerSpeedup:
    """One Linear/Conv2d layer: arithmetic, bytes and measured latency (seconds, median per call)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    input_shape: tuple[int, ...] | None
    dtype: str
    sparsity: float
    pattern: str
    dense_macs: int
    skippable_macs: int
    dense_bytes: int
    compact_bytes: int
    dense_s: float | None
    chosen: str
    chosen_s: float | None
    semi_structured: str
    reason: str


@dataclass(frozen=True)
class SpeedupReport:
    """Rows per layer, totals and a verdict; ``print()`` it, or ``.to_markdown()`` / ``.to_dict()`` / ``.plot()``."""

    rows: tuple[LayerSpeedup, ...]
    threads: int
    verdict: str

    def total(self, field: str) -> float:
        return sum(getattr(r, field) or 0 for r in self.rows)

    def _cells(self) -> tuple[list[str], list[list[str]], list[str]]:
        header = ["layer", "shape", "input", "sparsity", "pattern", "MACs", "skippable", "bytes dense",
                  "bytes compact", "dense ms", "auto", "auto ms", "2:4 kernels"]

        def ms(s: float | None) -> str:
            return "-" if s is None else f"{s * 1e3:.3f}"

        body = [[r.name, "x".join(map(str, r.shape)), "x".join(map(str, r.input_shape or ())) or "-",
                 f"{r.sparsity:.3f}", r.pattern, f"{r.dense_macs:,}", f"{r.skippable_macs:,}", f"{r.dense_bytes:,}",
                 f"{r.compact_bytes:,}", ms(r.dense_s), r.chosen, ms(r.chosen_s), r.semi_structured]
                for r in self.rows]
        measured = [r for r in self.rows if r.dense_s is not None]
        total = ["TOTAL", "", "", f"{self.sparsity:.3f}", "", f"{int(self.total('dense_macs')):,}",
                 f"{int(self.total('skippable_macs')):,}", f"{int(self.total('dense_bytes')):,}",
                 f"{int(self.total('compact_bytes')):,}",
                 ms(sum(r.dense_s for r in measured)) if measured else "-", "",
                 ms(sum(r.chosen_s for r in measured)) if measured else "-", ""]
        return header, body, total

    @property
    def sparsity(self) -> float:
        """Zeros over all weights in the report."""
        numel = sum(math.prod(r.shape) for r in self.rows)
        return sum(r.sparsity * math.prod(r.shape) for r in self.rows) / numel if numel else 0.0

    def __str__(self) -> str:
        header, body, total = self._cells()
        rows = [header, *body, total]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

        def fmt(row: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        rule = "-" * len(fmt(header))
        return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(total),
                          f"threads: {self.threads}", f"verdict: {self.verdict}"])

    def to_markdown(self) -> str:
        header, body, total = self._cells()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in [*body, total]]
        return "\n".join(lines + ["", f"threads: {self.threads}. **Verdict:** {self.verdict}"])

    def to_dict(self) -> dict[str, Any]:
        measured = [r for r in self.rows if r.dense_s is not None]
        return {
            "layers": [asdict(r) for r in self.rows],
            "total": {
                "dense_macs": int(self.total("dense_macs")),
                "skippable_macs": int(self.total("skippable_macs")),
                "dense_bytes": int(self.total("dense_bytes")),
                "compact_bytes": int(self.total("compact_bytes")),
                "dense_s": sum(r.dense_s for r in measured) if measured else None,
                "chosen_s": sum(r.chosen_s for r in measured) if measured else None,
                "sparsity": self.sparsity,
            },
            "threads": self.threads,
            "verdict": self.verdict,
        }

    def plot(self, path: str) -> None:
        """Bar chart of dense vs ``kernels='auto'`` latency per layer, saved to ``path`` (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("SpeedupReport.plot needs matplotlib: pip install 'fxprune[plot]'") from None
        rows = [r for r in self.rows if r.dense_s is not None]
        if not rows:
            raise ValueError("no layer was timed (measure=False, or no eligible layer): nothing to plot")
        fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(rows) + 1)))
        ys = range(len(rows))
        ax.barh([y + 0.2 for y in ys], [r.dense_s * 1e3 for r in rows], height=0.4, label="dense")
        ax.barh([y - 0.2 for y in ys], [r.chosen_s * 1e3 for r in rows], height=0.4, label="kernels='auto'")
        ax.set_yticks(list(ys), [f"{r.name} ({r.chosen})" for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"median latency per call, ms ({self.threads} thread(s))")
        ax.legend()
        ax.set_title("fxprune speed-up report", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _row(module: nn.Module, choice: KernelChoice) -> LayerSpeedup:
    w = module.weight.detach()
    pattern = detect_pattern(w)
    out_numel = math.prod(choice.output_shape) if choice.output_shape is not None else 0
    macs = out_numel * (w.numel() // w.shape[0])  # every output element takes one weight row's MACs
    nnz = int((w != 0).sum())
    return LayerSpeedup(
        name=choice.name, kind=choice.kind, shape=tuple(w.shape), input_shape=choice.input_shape, dtype=choice.dtype,
        sparsity=choice.sparsity, pattern=pattern, dense_macs=macs,
        skippable_macs=round(macs * _skippable_fraction(pattern, w)),
        dense_bytes=w.numel() * w.element_size(), compact_bytes=nnz * w.element_size() + math.ceil(w.numel() / 8),
        dense_s=choice.dense_s, chosen=choice.chosen, chosen_s=choice.chosen_s,
        semi_structured=semi_structured_eligibility(module, pattern), reason=choice.reason,
    )


def _verdict(rows: list[LayerSpeedup]) -> str:
    numel = sum(math.prod(r.shape) for r in rows)
    sparsity = sum(r.sparsity * math.prod(r.shape) for r in rows) / numel if numel else 0.0
    patterns = sorted({r.pattern for r in rows if r.pattern != "dense"})
    swapped = [r for r in rows if r.chosen != "dense"]
    measured = [r for r in rows if r.dense_s is not None]
    parts = []
    if swapped:
        dense = sum(r.dense_s for r in measured)
        chosen = sum(r.chosen_s for r in measured)
        parts.append(f"kernels='auto' makes {len(swapped)} of {len(rows)} layers sparse on this CPU: their layer "
                     f"time {dense * 1e3:.2f} -> {chosen * 1e3:.2f} ms ({chosen / dense:.2f}x over the timed layers)")
    elif not measured:
        parts.append(f"no layer timed at {sparsity:.0%} sparsity ({', '.join(patterns) or 'dense'}): "
                     + ("timing was off (measure=False)" if any("measure=False" in r.reason for r in rows)
                        else "no eligible layer reaches min_sparsity; CSR is slower than dense at 50%"))
    else:
        parts.append(f"no speed-up expected on CPU at {sparsity:.0%} {'/'.join(patterns) or 'dense'} "
                     "(no sparse kernel measured faster than dense)")
    nm = [r for r in rows if r.semi_structured != "-"]
    if nm:
        ok = [r for r in nm if r.semi_structured == "yes"]
        parts.append(f"{len(ok)} of {len(nm)} 2:4 layers eligible for semi-structured kernels"
                     + ("" if ok else " (2:4 needs an NVIDIA GPU of compute capability >= 8.0, fp16/bf16)"))
    if "channel" in patterns:
        parts.append("channel-pruned layers get faster once cut out: convert(physical=True)")
    return "; ".join(parts)


def speedup_report(model: nn.Module, example_inputs: Any, *, measure: bool = True, margin: float = 0.8,
                   min_sparsity: float = 0.7, repeats: int = 9) -> SpeedupReport:
    """Per Linear/Conv2d layer of ``model``: shape, sparsity, pattern, MACs, bytes, latency, 2:4 eligibility.

    ``model`` is a converted or loaded model (a prepared one is converted on a
    copy first). Latency is what :func:`fxprune.kernels.choose_kernels`
    measures on ``example_inputs`` in the current dtype and thread count (the
    same decision ``convert(kernels='auto')`` makes); ``measure=False`` skips
    timing. The model is not modified.
    """
    from fxprune.graph_module import PreparedGraphModule

    if isinstance(model, PreparedGraphModule):
        from fxprune.convert import convert

        model = convert(model)
    choices = choose_kernels(model, example_inputs, margin=margin, min_sparsity=min_sparsity, repeats=repeats,
                             measure=measure)
    rows = [_row(model.get_submodule(c.name), c) for c in choices]
    return SpeedupReport(rows=tuple(rows), threads=torch.get_num_threads(), verdict=_verdict(rows))
