"""One-shot pruning of large models from a few calibration batches: SparseGPT, Wanda, magnitude.

Its own room, next to the training path (prepare -> train -> convert), sharing
its config (:mod:`fxprune.config`), weight selection (:mod:`fxprune.plan`),
mask patterns (:mod:`fxprune.masks`) and Wanda scoring. Files, in data-flow
order: ``api.py`` (:func:`oneshot`), ``blocks.py`` (which modules are the
repeated blocks), ``runner.py`` (capture block inputs, replay blocks),
``statistics.py`` (what a weight's inputs were), ``solve.py`` (one matrix per
policy), ``sparsegpt.py`` (the solver), ``report.py``.
"""
from fxprune.oneshot.api import oneshot
from fxprune.oneshot.report import OneshotReport, WeightResult

__all__ = ["oneshot", "OneshotReport", "WeightResult"]
