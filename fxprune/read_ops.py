"""The ops that multiply a weight with inputs, one small handler each: which argument is the weight, which the input.

Each handler gets the op's arguments and ``alias_of(tensor)`` -- where a
tensor's elements sit in a watched weight (:class:`Alias`), or ``None`` --
and returns the :class:`~fxprune.weight_read.WeightRead` s of that call. The
layouts they accept are the ones real models use:

- ``F.linear(x, W)`` with ``W`` ``[out, in]`` (nn.Linear; ``F.linear(x, experts[e])`` for MoE experts);
- ``addmm(b, x, W)`` / ``mm`` / ``matmul`` / ``@`` / ``bmm`` / ``mv`` with the weight on either side:
  ``x @ W`` reads ``W`` as ``[in, out]`` (Hugging Face ``Conv1D``), ``W @ x`` as ``[out, in]`` with the
  input vectors in the columns of ``x`` (Mamba's ``dt_proj``), ``x @ W.T`` (Falcon); batch dimensions of
  the weight operand may run over the experts of a stacked ``[E, ., .]`` parameter (``bmm`` on
  ``experts[ids]``) or broadcast one matrix;
- grouped matrix multiplication over experts (``torch._grouped_mm``, transformers' fallback op):
  rows ``offs[g-1]:offs[g]`` of the input belong to expert ``g``;
- ``F.conv1d/2d/3d`` with the whole kernel.

Anything else that computes with a weight is an error naming the weight and the op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from fxprune.errors import PruningError
from fxprune.weight_read import WeightRead, conv_read, matmul_read

__all__ = ["Alias", "Gathered", "READ_OPS", "UNATTRIBUTABLE", "unattributable"]


@dataclass(frozen=True)
class Gathered:
    """A tensor dimension whose index ``i`` stands for index ``ids[i]`` of the weight's dimension ``root_dim``."""

    root_dim: int
    ids: torch.Tensor


@dataclass(frozen=True)
class Alias:
    """Where a tensor's elements sit in a watched weight.

    ``dims[k]`` says what the tensor's dimension ``k`` runs along: a weight
    dimension (int), a gathered weight dimension (:class:`Gathered`), or
    nothing (``None``: size 1 or broadcast). ``selected`` are weight dimensions
    fixed at one index (``experts[3]``). ``partial``: some dimension covers only
    a slice of the weight's. ``problem``: why the layout cannot be followed.
    """

    name: str
    root_shape: torch.Size
    dims: tuple
    selected: tuple[tuple[int, int], ...] = ()
    partial: bool = False
    problem: str | None = None


AliasOf = Callable[[Any], "Alias | None"]

#: Ops that read a weight in a way no input vectors multiply it, with the reason.
UNATTRIBUTABLE = {
    "embedding": "an embedding lookup selects rows by index; no input features multiply the weight",
    "embedding_bag": "an embedding lookup selects rows by index; no input features multiply the weight",
    "conv_transpose1d": "transposed convolutions are not supported",
    "conv_transpose2d": "transposed convolutions are not supported",
    "conv_transpose3d": "transposed convolutions are not supported",
}


def unattributable(alias: Alias, op: str, why: str) -> PruningError:
    return PruningError(
        f"weight {alias.name!r} is read by {op!r}: {why}; fxprune cannot tell which input vectors it multiplies "
        "(exclude the weight from the pruner that needs calibration statistics)"
    )


def _arg(args: tuple, kwargs: dict, i: int, *keys: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    for k in keys:
        if k in kwargs:
            return kwargs[k]
    return default


def _not_weights(op: str, alias_of: AliasOf, **roles: Any) -> None:
    """The op's non-weight arguments (input, bias, offsets) must not be a watched weight."""
    for role, t in roles.items():
        alias = alias_of(t) if isinstance(t, torch.Tensor) else None
        if alias is not None:
            raise unattributable(alias, op, f"it is passed as the {role}, not as the multiplied weight")


def _check(alias: Alias, op: str) -> None:
    if alias.problem:
        raise unattributable(alias, op, alias.problem)
    if alias.partial:
        raise unattributable(alias, op, "only a slice of it is multiplied (a part of its rows or columns)")


def _matrix_dims(alias: Alias, w: torch.Tensor, in_op: int, out_op: int, op: str) -> tuple[int, int]:
    """The weight dimensions that the operand's input / output dimensions run along."""
    shift = w.dim() - len(alias.root_shape)
    matrix = {2: {0, 1}, 3: {1, 2}}.get(len(alias.root_shape), set())
    dims = [alias.dims[k] for k in (in_op, out_op)]
    missing = sorted(matrix - set(dims))
    for i, k in enumerate((in_op, out_op)):
        if dims[i] is None and w.shape[k] == 1 and missing:
            # A size-1 dimension runs along no weight dimension in memory: the one left over, by position if both.
            dims[i] = k - shift if len(missing) == 2 else missing[0]
    r_in, r_out = dims
    if not all(isinstance(d, int) for d in dims) or {r_in, r_out} != matrix:
        raise unattributable(alias, op, f"it is multiplied as a matrix over its dimensions {dims} (of shape "
                                        f"{tuple(alias.root_shape)}); only [out, in] / [in, out] matrices, or "
                                        "one expert of a stacked [experts, ., .] parameter, are understood")
    return r_in, r_out


def _expert_ids(alias: Alias, batch: torch.Size, op: str) -> tuple[torch.Tensor | None, int | None]:
    """Per batch element of the weight operand, the expert it is: (ids over ``batch``, or a fixed expert)."""
    selected = dict(alias.selected).get(0)
    stacked = len(alias.root_shape) == 3
    if stacked and selected is None and alias.root_shape[0] == 1:
        selected = 0
    ids = None
    for j, d in enumerate(alias.dims[:len(batch)]):
        if d is None:
            continue
        if stacked and isinstance(d, Gathered) and d.root_dim == 0:
            src = d.ids.reshape(-1)
        elif stacked and d == 0:
            src = torch.arange(batch[j])
        else:
            raise unattributable(alias, op, f"its dimension {d} runs along a batch dimension of {op}")
        if ids is not None:
            raise unattributable(alias, op, "two batch dimensions run over its experts")
        ids = src.reshape([-1 if k == j else 1 for k in range(len(batch))])
    if stacked and ids is None and selected is None:
        raise unattributable(alias, op, "all its experts are multiplied as one matrix")
    return ids, selected


def _matmul_reads(op: str, alias: Alias, w: torch.Tensor, x: torch.Tensor, layout: str,
                  alpha: float = 1.0) -> list[WeightRead]:
    """Reads of ``x @ W.T`` (layout ``linear``), ``x @ W`` (``right``) or ``W @ x`` (``left``)."""
    _check(alias, op)
    if w.dim() < 2:
        raise unattributable(alias, op, "it is multiplied as a vector")
    scale = (lambda v: v * alpha) if alpha != 1 else (lambda v: v)
    if layout == "linear":
        in_op, out_op, batch = 1, 0, torch.Size()
        xv = x.reshape(-1, 1, w.shape[1])  # every token its own batch element of one row
    elif layout == "right":
        in_op, out_op, batch = w.dim() - 2, w.dim() - 1, w.shape[:-2]
        xv = x if x.dim() >= 2 else x.unsqueeze(0)
    else:
        in_op, out_op, batch = w.dim() - 1, w.dim() - 2, w.shape[:-2]
        xv = (x.unsqueeze(-1) if x.dim() == 1 else x).transpose(-2, -1)
    r_in, r_out = _matrix_dims(alias, w, in_op, out_op, op)
    ids, selected = _expert_ids(alias, batch, op)
    features, n = xv.shape[-1], xv.shape[-2]
    if layout == "linear":
        b_shape = xv.shape[:-2]
    else:
        b_shape = torch.broadcast_shapes(batch, xv.shape[:-2])
    flat = xv.expand(*b_shape, n, features).reshape(-1, n, features)
    shape = alias.root_shape
    if ids is None:
        return [matmul_read(alias.name, op, selected, lambda: scale(flat.reshape(-1, features)), flat.shape[0] * n,
                            r_out, r_in, shape)]
    ids = ids.reshape((1,) * (len(b_shape) - ids.dim()) + tuple(ids.shape)).expand(b_shape).reshape(-1)
    reads = []
    for e in torch.unique(ids).tolist():
        chosen = (ids == e).nonzero().reshape(-1).to(flat.device)
        reads.append(matmul_read(alias.name, op, int(e), lambda c=chosen: scale(flat[c].reshape(-1, features)),
                                 chosen.numel() * n, r_out, r_in, shape))
    return reads


def _two_operands(op: str, a: Any, b: Any, alias_of: AliasOf, alpha: float = 1.0,
                  **others: Any) -> list[WeightRead]:
    _not_weights(op, alias_of, **others)
    wa = alias_of(a) if isinstance(a, torch.Tensor) else None
    wb = alias_of(b) if isinstance(b, torch.Tensor) else None
    if wa is not None and wb is not None:
        raise unattributable(wa, op, f"it is multiplied with another watched weight ({wb.name!r})")
    if wa is not None:
        return _matmul_reads(op, wa, a, b, "left", alpha)
    if wb is not None:
        return _matmul_reads(op, wb, b, a, "right", alpha)
    return []


def _linear(op, args, kwargs, alias_of):
    x, w, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    _not_weights(op, alias_of, input=x, bias=b)
    alias = alias_of(w)
    return [] if alias is None else _matmul_reads(op, alias, w, x, "linear")


def _product(op, args, kwargs, alias_of):
    a = _arg(args, kwargs, 0, "input", "self", "mat1")
    b = _arg(args, kwargs, 1, "other", "mat2", "vec")
    return _two_operands(op, a, b, alias_of)


def _reflected(op, args, kwargs, alias_of):  # Tensor.__rmatmul__(self, other) is other @ self
    return _two_operands(op, args[1], args[0], alias_of)


def _add_product(op, args, kwargs, alias_of):  # addmm / baddbmm / addmv: beta * input + alpha * (a @ b)
    bias = _arg(args, kwargs, 0, "input", "self")
    a = _arg(args, kwargs, 1, "mat1", "batch1", "mat")
    b = _arg(args, kwargs, 2, "mat2", "batch2", "vec")
    return _two_operands(op, a, b, alias_of, float(kwargs.get("alpha", 1)), bias=bias)


def _grouped(op, args, kwargs, alias_of):
    """``out[offs[g-1]:offs[g]] = x[offs[g-1]:offs[g]] @ W[g]``, W ``[groups, in, out]``."""
    x = _arg(args, kwargs, 0, "input", "self", "mat_a")
    w = _arg(args, kwargs, 1, "weight", "mat2", "mat_b")
    offs, bias = _arg(args, kwargs, 2, "offs"), _arg(args, kwargs, 3, "bias")
    _not_weights(op, alias_of, input=x, offsets=offs, bias=bias)
    alias = alias_of(w) if isinstance(w, torch.Tensor) else None
    if alias is None:
        return []
    _check(alias, op)
    if x.dim() != 2 or w.dim() != 3 or offs is None:
        raise unattributable(alias, op, "only the 2-D input x 3-D weight form with offsets is understood")
    r_in, r_out = _matrix_dims(alias, w, 1, 2, op)
    ids, selected = _expert_ids(alias, w.shape[:1], op)
    ends = [int(e) for e in offs.tolist()]
    reads, start = [], 0
    for g, end in enumerate(ends):
        if end > start:
            expert = int(ids.reshape(-1)[g]) if ids is not None else selected
            reads.append(matmul_read(alias.name, op, expert, lambda s=start, e=end: x[s:e], end - start,
                                     r_out, r_in, alias.root_shape))
        start = max(start, end)
    return reads


def _conv(op, args, kwargs, alias_of):
    x, w, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    _not_weights(op, alias_of, input=x, bias=b)
    alias = alias_of(w)
    if alias is None:
        return []
    _check(alias, op)
    whole = tuple(w.shape) == tuple(alias.root_shape) and not alias.selected and all(
        alias.dims[d] == d for d in range(w.dim()) if w.shape[d] > 1)
    if not whole:
        raise unattributable(alias, op, "the convolution's kernel is not the weight itself (a reshaped or "
                                        "sliced view of it)")
    stride, padding = _arg(args, kwargs, 3, "stride", default=1), _arg(args, kwargs, 4, "padding", default=0)
    dilation, groups = _arg(args, kwargs, 5, "dilation", default=1), _arg(args, kwargs, 6, "groups", default=1)
    return [conv_read(alias.name, op, x, w.shape, stride, padding, dilation, int(groups))]


Handler = Callable[[str, tuple, dict, AliasOf], "list[WeightRead]"]

#: op name (as :func:`fxprune.observe.op_name` spells it) -> handler.
READ_OPS: dict[str, Handler] = {
    "linear": _linear,
    **dict.fromkeys(["matmul", "__matmul__", "mm", "bmm", "mv"], _product),
    "__rmatmul__": _reflected,
    **dict.fromkeys(["addmm", "baddbmm", "addmv"], _add_product),
    **dict.fromkeys(["conv1d", "conv2d", "conv3d"], _conv),
    **dict.fromkeys(["_grouped_mm", "grouped_mm", "transformers::grouped_mm_fallback"], _grouped),
}
