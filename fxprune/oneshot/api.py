"""``fxprune.oneshot``: prune a model once, in place, from calibration batches.

The data flow, top to bottom (each step its own module)::

    load_config + make_plan   which weights, which policy/pattern   (fxprune.config, fxprune.plan)
    find_blocks               the repeated decoder layers             (blocks.py)
    capture_calls             the first block's inputs, every block's arguments   (runner.py)
    for each block:           observe its weights' inputs             (fxprune.observe, statistics.py)
                              prune them                              (solve.py, sparsegpt.py)
                              run it again, pruned -> next block's inputs   (runner.py)
    weights after the blocks  observed on the pruned blocks' outputs
    OneshotReport                                                     (report.py)

Everything that can be checked without pruning is checked before the first
weight changes: the config against the model, N:M widths, blocks and their
call order, reads that cannot be observed (embeddings), weights of the first
block that never run. A weight of a later block that receives no input is
only found when that block is reached; the error then says which blocks are
already pruned.
"""
from __future__ import annotations

import os
import time
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from fxprune.config import PruningConfig, load_config, nm_ratio
from fxprune.errors import ConfigError, PruningError
from fxprune.observe import WeightInputObserver
from fxprune.oneshot.blocks import block_of, find_blocks
from fxprune.oneshot.precision import compute_dtype, computing_in, release_freed_memory
from fxprune.oneshot.report import OneshotReport, WeightResult
from fxprune.oneshot.runner import call_model, capture_calls, move_calls, replay_tail, run_block
from fxprune.oneshot.solve import check_width, prune_matrix
from fxprune.oneshot.statistics import InputCollector
from fxprune.plan import WeightTarget, make_plan

__all__ = ["oneshot"]

ONESHOT_POLICIES = ("magnitude", "wanda", "sparsegpt")


def oneshot(
    model: nn.Module,
    config: str | os.PathLike | Mapping[str, Any] | PruningConfig,
    calibration: Iterable[Any] | None,
    *,
    sequential: bool = True,
    device: str | torch.device | None = None,
) -> OneshotReport:
    """Prune ``model`` in place to each pruner's ``target_sparsity``, once; returns an :class:`OneshotReport`.

    ``config`` is the training path's ``pruning:`` section (a YAML path or a
    dict); policies ``magnitude``, ``wanda`` and ``sparsegpt``; schedule keys
    are accepted and have no effect. ``calibration`` is an iterable of batches
    (a tensor -> ``model(b)``, a tuple/list -> ``model(*b)``, a dict ->
    ``model(**b)``; a DataLoader works); it is read once and kept for the run.
    ``None`` is allowed when every pruner is ``magnitude`` (no error numbers
    then).

    ``sequential=True`` goes through the repeated blocks one at a time, each
    calibrated on the outputs of the blocks before it *after* they were pruned
    (as SparseGPT and Wanda do); ``False`` observes the whole model in one pass
    first (all statistics in memory at once). ``device`` runs one block at a
    time there while the model stays where it is.

    Afterwards the model is an ordinary model of its own class: same
    parameters (the same objects), no hooks, buffers or attributes added, its
    train/eval mode restored.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"oneshot() expects an nn.Module, got {type(model).__name__}")
    cfg = load_config(config)
    _check_oneshot_config(cfg)
    plan = make_plan(model, cfg)
    params = {t.name: model.get_parameter(t.name) for t in plan.targets}
    _check_static_widths(model, plan.targets, plan.pruners)
    batches = None if calibration is None else list(calibration)
    if batches is None and any(p.policy != "magnitude" for p in cfg.pruners):
        needs = sorted({p.policy for p in cfg.pruners if p.policy != "magnitude"})
        raise PruningError(f"oneshot(): {', '.join(needs)} needs calibration batches; got calibration=None")
    if batches is not None and not batches:
        raise PruningError("oneshot(): the calibration iterable yielded no batches")
    dev = None if device is None else torch.device(device)
    report = OneshotReport(sequential=sequential and batches is not None, calibration_batches=len(batches or []))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if batches is None:
                _prune_static(model, plan, params, report)
            elif sequential:
                _Sequential(model, cfg, plan, params, batches, dev, report).run()
            else:
                _whole_model(model, plan, params, batches, dev, report)
    finally:
        model.train(was_training)
    order = {t.name: i for i, t in enumerate(plan.targets)}
    report.weights.sort(key=lambda w: order[w.name])
    report.seconds = time.perf_counter() - start
    return report


def _check_oneshot_config(cfg: PruningConfig) -> None:
    for p in cfg.pruners:
        if p.policy not in ONESHOT_POLICIES:
            raise ConfigError(
                f"policy {p.policy!r} needs training; one-shot pruning supports {', '.join(ONESHOT_POLICIES)}",
                p.key_path,
                cfg.source,
            )
        if p.pattern == "channel":
            raise ConfigError(
                "one-shot pruning prunes weights (unstructured or N:M); for channels use fxprune.prepare",
                f"{p.key_path}.pattern",
                cfg.source,
            )
        if p.scope != "local":
            raise ConfigError(
                "one-shot pruning prunes each weight to the target on its own (layer by layer, as SparseGPT and "
                "Wanda do); scope 'global' is only supported by fxprune.prepare. Use scope: local",
                f"{p.key_path}.scope",
                cfg.source,
            )


def _check_static_widths(model: nn.Module, targets: tuple[WeightTarget, ...], pruners: dict) -> None:
    """N:M widths for the layouts known without running (HF Conv1D stores its weight [in, out])."""
    for t in targets:
        owner = model.get_submodule(t.name.rpartition(".")[0]) if "." in t.name else model
        if type(owner).__name__ == "Conv1D" and len(t.shape) == 2:
            check_width((t.shape[1], t.shape[0]), pruners[t.pruner], t.name)


class _Results:
    """Per-weight sums over its keys (experts), turned into :class:`WeightResult` rows."""

    def __init__(self, plan, report: OneshotReport):
        self.plan, self.report = plan, report
        self.acc: dict[str, dict[str, Any]] = {}

    def add(self, name: str, solved, rows: int, block: str | None) -> None:
        a = self.acc.setdefault(name, {"zeros": 0, "numel": 0, "delta": 0.0, "energy": 0.0, "rows": 0, "measured": True})
        a["zeros"] += solved.zeros
        a["numel"] += solved.numel
        a["rows"] += rows
        a["block"] = block
        if solved.energy is None:
            a["measured"] = False
        else:
            a["delta"] += solved.delta_energy
            a["energy"] += solved.energy

    def finish(self, name: str, param: torch.Tensor) -> None:
        a = self.acc.pop(name)
        t = next(t for t in self.plan.targets if t.name == name)
        p = self.plan.pruners[t.pruner]
        zeros = int(param.numel() - torch.count_nonzero(param))
        error = (a["delta"] / a["energy"] if a["energy"] > 0 else 0.0) if a["measured"] else None
        self.report.weights.append(
            WeightResult(
                name=name,
                shape=tuple(param.shape),
                policy=p.policy,
                pattern=p.pattern,
                pruner=p.name,
                sparsity=zeros / param.numel(),
                error=error,
                rows=a["rows"],
                block=a["block"],
            )
        )


def _prune_keys(
    collector: InputCollector,
    names: list[str],
    params: dict[str, torch.Tensor],
    plan,
    results: _Results,
    block: str | None,
    where: str,
) -> None:
    """Check every weight of ``names`` got inputs (every expert), then prune them key by key, freeing as we go."""
    by_name: dict[str, list] = {n: [] for n in names}
    for key in collector.reads:
        if key[0] in by_name:
            by_name[key[0]].append(key)
    for name in names:
        keys = by_name[name]
        if not keys:
            raise PruningError(
                f"weight {name!r} was never read while running {where} on the calibration batches (a layer that "
                "never runs, or a branch the inputs do not take), so it has no inputs to calibrate on; exclude it "
                "from the pruner or use other batches"
            )
        experts = [k[1] for k in keys if k[1] is not None]
        if experts:
            count = params[name].shape[0]
            missing = sorted(set(range(count)) - set(experts))
            if missing:
                raise PruningError(
                    f"weight {name!r}: expert(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} received no tokens "
                    f"from the calibration batches while running {where}; use more calibration data or exclude "
                    "this weight"
                )
        for key in keys:
            if collector.rows_seen[key] == 0:
                raise PruningError(f"weight {name!r}: the calibration batches gave it no tokens while running {where}")
            read = collector.reads[key]
            check_width(tuple(read.matrix(params[name]).shape), plan.pruners[_pruner_of(plan, name)], name)
    # The widest inputs first (a Llama's down_proj): their solve is the largest temporary, and it then
    # runs while the fewest other statistics are still held. Keys sharing statistics stay together.
    order = sorted(collector.reads, key=lambda k: (-collector.group_of[k].in_features, id(collector.group_of[k])))
    for key in order:
        name = key[0]
        if name not in by_name:
            continue
        read = collector.reads[key]
        stats = collector.group_of[key]
        label = name if key[1] is None else f"{name}[expert {key[1]}]"
        last = len(collector.members(stats)) == 1
        solved = prune_matrix(
            read.matrix(params[name]), plan.pruners[_pruner_of(plan, name)], stats, label, last_use=last
        )
        results.add(name, solved, collector.rows_seen[key], block)
        collector.pop_group(key)
        del stats
    for name in names:
        results.finish(name, params[name])


def _pruner_of(plan, name: str) -> str:
    return next(t.pruner for t in plan.targets if t.name == name)


def _collector(plan, params: dict[str, torch.Tensor]) -> InputCollector:
    return InputCollector(hessian_for=lambda key: plan.pruners[_pruner_of(plan, key[0])].policy == "sparsegpt")


class _Sequential:
    """The block-by-block run (see the module docstring)."""

    def __init__(self, model, cfg, plan, params, batches, device, report):
        self.model, self.cfg, self.plan, self.params = model, cfg, plan, params
        self.batches, self.device, self.report = batches, device, report
        self.results = _Results(plan, report)
        self.pruned_blocks: list[str] = []

    def run(self) -> None:
        blocks = find_blocks(self.model, self.cfg)
        owner = {t.name: block_of(t.aliases, blocks) for t in self.plan.targets}
        inside = {i: [n for n, b in owner.items() if b == i] for i in range(len(blocks))}
        outside = [n for n, b in owner.items() if b is None]
        # Validation run: blocks replaced by recorders; reads of weights outside the blocks are checked too.
        with WeightInputObserver(self.model, {n: self.params[n] for n in outside}, lambda read: read.n_rows):
            captured = capture_calls(
                self.model, blocks, self.batches, needed={i for i, ns in inside.items() if ns}, run_tail=bool(outside)
            )
        move_calls(captured, self.device)
        hidden = captured.hidden
        try:
            from tqdm.auto import tqdm

            steps = tqdm(captured.order, desc="fxprune.oneshot", unit="block", disable=None)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            steps = captured.order
        try:
            for i in steps:
                path, block = blocks[i]
                home = _device_of(block)
                if self.device is not None:
                    block.to(self.device)
                try:
                    names = inside.get(i, [])
                    dtype = compute_dtype(block, self.cfg.calibration_dtype, self.device)
                    if names:
                        self._prune_block(path, block, names, hidden, captured.calls[i], dtype)
                    with computing_in(block, dtype):  # the pruned weights as the model's dtype holds them
                        hidden = list(run_block(block, hidden, captured.calls[i], dtype=dtype))
                    release_freed_memory()
                finally:
                    if self.device is not None and home is not None:
                        block.to(home)
            if outside:
                self._prune_outside(blocks, outside, hidden, captured.template)
        except PruningError as e:
            if self.pruned_blocks:
                raise PruningError(
                    f"{e}\n(blocks already pruned in place before this error: {', '.join(self.pruned_blocks)}; "
                    "the rest of the model is unchanged)"
                ) from None
            raise

    def _prune_block(self, path, block, names, hidden, calls, dtype) -> None:
        collector = _collector(self.plan, self.params)
        # Only the forward runs in the compute dtype: the solvers work in float32 on their own copies,
        # and the block back in its own dtype meanwhile keeps the float32 block out of the solve's peak.
        with computing_in(block, dtype), WeightInputObserver(block, {n: self.params[n] for n in names}, collector):
            for _ in run_block(block, hidden, calls, after_each=collector.end_batch, dtype=dtype):
                pass
        release_freed_memory()  # the forward's activations: freed, but glibc keeps them resident otherwise
        _prune_keys(collector, names, self.params, self.plan, self.results, path, f"block {path!r}")
        self.pruned_blocks.append(path)

    def _prune_outside(self, blocks, outside, final, template) -> None:
        collector = _collector(self.plan, self.params)
        home = [_device_of(b) for _, b in blocks]
        final = [h.to(home[0]) if home[0] is not None else h for h in final]
        with WeightInputObserver(self.model, {n: self.params[n] for n in outside}, collector):
            replay_tail(self.model, blocks, self.batches, final, template, after_each=collector.end_batch)
        _prune_keys(collector, outside, self.params, self.plan, self.results, None, "the layers outside the blocks")


def _device_of(module: nn.Module) -> torch.device | None:
    p = next(module.parameters(), None)
    return None if p is None else p.device


def _whole_model(model, plan, params, batches, device, report) -> None:
    """One pass of the whole model observes every weight; then all are pruned (the reference for sequential)."""
    results = _Results(plan, report)
    home = _device_of(model)
    if device is not None:
        model.to(device)
    try:
        collector = _collector(plan, params)
        with WeightInputObserver(model, params, collector):
            for batch in batches:
                call_model(model, _batch_to(batch, device))
                collector.end_batch()
        _prune_keys(collector, list(params), params, plan, results, None, "the model")
    finally:
        if device is not None and home is not None:
            model.to(home)


def _batch_to(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_batch_to(v, device) for v in batch)
    return batch


def _prune_static(model, plan, params, report) -> None:
    """Magnitude without calibration: each weight as its layer multiplies it ([out, in]; experts one by one)."""
    results = _Results(plan, report)
    for t in plan.targets:
        p = params[t.name]
        owner = model.get_submodule(t.name.rpartition(".")[0]) if "." in t.name else model
        if p.dim() == 3:
            matrices = [(e, p[e]) for e in range(p.shape[0])]
        elif p.dim() == 2:
            matrices = [(None, p.t() if type(owner).__name__ == "Conv1D" else p)]
        else:
            matrices = [(None, p.flatten(1))]
        pruner = plan.pruners[t.pruner]
        if p.dim() > 3 and nm_ratio(pruner.pattern) is not None:
            raise PruningError(f"weight {t.name!r}: N:M one-shot pruning of convolution kernels is not supported")
        for expert, m in matrices:
            label = t.name if expert is None else f"{t.name}[expert {expert}]"
            results.add(t.name, prune_matrix(m, pruner, None, label), 0, None)
        results.finish(t.name, p)
