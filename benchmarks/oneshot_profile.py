"""Where ``fxprune.oneshot`` spends its time: per phase and per block, from outside the library.

Why from outside: the scale benchmark must say *what* is slow when a target
fails (the forward passes, the Hessian accumulation, the solver) without
changing the code it measures. The timer wraps the functions the sequential
runner calls, for the duration of a ``with`` block, and restores them after:

- ``capture``    ``capture_calls``: the model run up to the first block, recording every block's arguments
- ``observe``    the block's forward pass with the input observer (statistics pass), minus ``hessian``
- ``hessian``    ``InputStatistics.add``: folding input rows into ``H = sum x x^T`` / the squared norms
- ``solve``      ``prune_matrix``: mask selection and (SparseGPT) the weight update, per weight
- ``propagate``  the block's forward pass on its pruned weights, producing the next block's inputs

Wall seconds (``time.perf_counter``) and CPU seconds of the process (``time.process_time``) are both kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from typing import Callable, Iterator

__all__ = ["PhaseTimer"]


class PhaseTimer:
    """Accumulates wall/CPU seconds per phase and per block of one ``fxprune.oneshot`` call."""

    def __init__(self, dump: str | None = None) -> None:
        # A run stopped before the end still leaves the finished blocks' timings here.
        self.dump = dump
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.per_block: list[dict[str, float]] = []
        self._in_block = False

    def _timed(self, phase: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                dw, dc = time.perf_counter() - w0, time.process_time() - c0
                self.wall[phase] += dw
                self.cpu[phase] += dc
                if self.per_block and phase != "capture":
                    self.per_block[-1][phase] = self.per_block[-1].get(phase, 0.0) + dw

        return wrapper

    def _run_block(self, fn: Callable) -> Callable:
        """``run_block`` is a generator: time its iteration, as ``observe`` inside a block's pruning, else ``propagate``."""

        def wrapper(*args, **kwargs):
            phase = "observe" if self._in_block else "propagate"
            inner = fn(*args, **kwargs)
            while True:
                w0, c0 = time.perf_counter(), time.process_time()
                try:
                    item = next(inner)
                except StopIteration:
                    return
                finally:
                    dw, dc = time.perf_counter() - w0, time.process_time() - c0
                    self.wall[phase] += dw
                    self.cpu[phase] += dc
                    if self.per_block:
                        self.per_block[-1][phase] = self.per_block[-1].get(phase, 0.0) + dw
                yield item

        return wrapper

    def _prune_block(self, fn: Callable) -> Callable:
        def wrapper(runner, path, *args, **kwargs):
            if self.dump:  # the previous block is done (pruned and propagated)
                with open(self.dump + ".tmp", "w") as handle:
                    json.dump(self.as_dict(), handle, indent=1)
                os.replace(self.dump + ".tmp", self.dump)
            self.per_block.append({"block": path})
            self._in_block = True
            try:
                return fn(runner, path, *args, **kwargs)
            finally:
                self._in_block = False

        return wrapper

    @contextlib.contextmanager
    def patch(self) -> Iterator["PhaseTimer"]:
        from fxprune.oneshot import api, statistics

        saved = [(api, "capture_calls"), (api, "prune_matrix"), (api, "run_block"),
                 (api._Sequential, "_prune_block"), (statistics.InputStatistics, "add")]
        originals = [getattr(owner, name) for owner, name in saved]
        api.capture_calls = self._timed("capture", api.capture_calls)
        api.prune_matrix = self._timed("solve", api.prune_matrix)
        api.run_block = self._run_block(api.run_block)
        api._Sequential._prune_block = self._prune_block(api._Sequential._prune_block)
        statistics.InputStatistics.add = self._timed("hessian", statistics.InputStatistics.add)
        try:
            yield self
        finally:
            for (owner, name), original in zip(saved, originals):
                setattr(owner, name, original)

    def as_dict(self) -> dict:
        wall, cpu = dict(self.wall), dict(self.cpu)
        # InputStatistics.add runs inside the observed forward pass: report the pass without it.
        wall["observe"] = wall.get("observe", 0.0) - wall.get("hessian", 0.0)
        cpu["observe"] = cpu.get("observe", 0.0) - cpu.get("hessian", 0.0)
        blocks = [dict(b) for b in self.per_block]
        for block in blocks:
            block["observe"] = block.get("observe", 0.0) - block.get("hessian", 0.0)
        return {"wall_s": wall, "cpu_s": cpu, "per_block_wall_s": blocks}
