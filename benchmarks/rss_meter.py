"""Peak resident memory of one phase of a process, above the memory it held before.

Why above a baseline: the libraries' import footprint (0.7-0.9 GiB for torch and
transformers) and the model's own weights are the same for every tool; what a
pruning method costs is what it allocates *on top* of that. The meter takes the
baseline when entered (imports done, weights resident) and samples VmRSS from
/proc/self/status on a thread every ``interval`` seconds, so short spikes between
samples can be missed by at most one interval's worth of growth.

Standard library only: both benchmark venvs (main and llm-compressor's) import it.
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time

__all__ = ["RssMeter", "make_resident", "rss_bytes"]


def make_resident(model) -> None:
    """Copies every parameter into ordinary (anonymous) memory before the baseline is taken.

    transformers 5 can leave loaded weights backed by the memory-mapped
    safetensors file: their pages become resident only when first read, so
    pruning would show up as "extra" memory merely by touching the model.
    Cloning each tensor (one at a time) makes the weights count in the baseline.
    """
    for param in model.parameters():
        param.data = param.data.clone()
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.clone()


def rss_bytes() -> int:
    """Current resident set size of this process in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


class RssMeter:
    """Context manager: wall time, CPU time and peak RSS above the RSS at entry."""

    def __init__(self, interval: float = 0.02, snapshot: str | None = None, snapshot_every: float = 10.0) -> None:
        self.interval = interval
        # A run that cannot finish in the time available (a shared machine) still
        # leaves its peak so far, wall and CPU time in this JSON file.
        self.snapshot = snapshot
        self.snapshot_every = snapshot_every
        self.baseline = 0
        self.peak = 0
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            if self.snapshot and time.perf_counter() - last >= self.snapshot_every:
                last = time.perf_counter()
                self._write_snapshot()
            self._stop.wait(self.interval)

    def _write_snapshot(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        data = {"unfinished": True, "wall_s": time.perf_counter() - self._wall0,
                "cpu_s": usage.ru_utime + usage.ru_stime - self._cpu0, "baseline_rss_bytes": self.baseline,
                "peak_rss_bytes": self.peak, "extra_rss_bytes": self.peak - self.baseline}
        with open(self.snapshot + ".tmp", "w") as handle:
            json.dump(data, handle)
        os.replace(self.snapshot + ".tmp", self.snapshot)

    def __enter__(self) -> "RssMeter":
        self.baseline = rss_bytes()
        self.peak = self.baseline
        self._wall0 = time.perf_counter()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self._cpu0 = usage.ru_utime + usage.ru_stime
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.wall_s = time.perf_counter() - self._wall0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_s = usage.ru_utime + usage.ru_stime - self._cpu0

    def as_dict(self) -> dict:
        return {
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "baseline_rss_bytes": self.baseline,
            "peak_rss_bytes": self.peak,
            "extra_rss_bytes": self.peak - self.baseline,
        }
