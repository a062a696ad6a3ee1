"""fxprune: pruning for PyTorch models, built on torch.fx.

``prepare(model, config)`` -> train with ``prepared.pruner``'s hooks ->
``convert(prepared)`` gives back the original model class with pruned weights.
"""
from fxprune.calibrate import calibrate
from fxprune.checkpoints import (
    SavedCheckpoint,
    load_pretrained,
    load_sparse,
    load_sparse_state_dict,
    save_pretrained,
    save_sparse,
)
from fxprune.config import PrunerConfig, PruningConfig, load_config
from fxprune.convert import convert
from fxprune.distributed import check_masks_consistent
from fxprune.errors import ConfigError, PruningError, TraceError
from fxprune.masked import MaskedParameter
from fxprune.oneshot import OneshotReport, oneshot
from fxprune.prepare import TraceFallbackWarning, prepare
from fxprune.pruner import Pruner
from fxprune.report import PrepareReport, SparsityReport, sparsity_report
from fxprune.sensitivity import SensitivityTable, sensitivity

__all__ = [
    "prepare",
    "convert",
    "load_config",
    "sparsity_report",
    "calibrate",
    "oneshot",
    "OneshotReport",
    "sensitivity",
    "save_pretrained",
    "load_pretrained",
    "save_sparse",
    "load_sparse",
    "load_sparse_state_dict",
    "SavedCheckpoint",
    "check_masks_consistent",
    "SensitivityTable",
    "Pruner",
    "PruningConfig",
    "PrunerConfig",
    "MaskedParameter",
    "SparsityReport",
    "PrepareReport",
    "ConfigError",
    "TraceError",
    "PruningError",
    "TraceFallbackWarning",
]

__version__ = "0.1.0"
