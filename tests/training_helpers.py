"""Small models, deterministic data and state snapshots shared by the training-integration tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """Two Linear layers and a raw functional parameter: graph route for all three weights."""

    def __init__(self, seed: int = 0, d_in: int = 12, hidden: int = 16, d_out: int = 4):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d_in, hidden)
        self.proj = nn.Parameter(torch.randn(hidden, hidden) / hidden**0.5)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = torch.relu(F.linear(h, self.proj))
        return self.fc2(h)


def batches(n: int, seed: int = 1, batch: int = 8, d_in: int = 12, d_out: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed (x, y) batches of a regression task: the same data order on every run."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g), torch.randn(batch, d_out, generator=g)) for _ in range(n)]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def epoch_config(**overrides) -> dict:
    cfg = {"start_epoch": 0, "end_epoch": 3, "frequency": 1, "init_sparsity": 0.2, "target_sparsity": 0.8}
    cfg.update(overrides)
    return {"pruning": {"magnitude": {"prune1": {}}, **cfg}}


def step_config(**overrides) -> dict:
    cfg = {"start_step": 2, "end_step": 10, "frequency_steps": 3, "init_sparsity": 0.1, "target_sparsity": 0.7}
    cfg.update(overrides)
    return {"pruning": {"magnitude": {"prune1": {}}, **cfg}}


def snapshot(prepared: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the prepared model's state (weights, masks, pruner counters), cloned."""
    return {k: v.detach().clone() for k, v in prepared.state_dict().items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical state: same keys, same dtypes, equal values (no tolerance)."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def pruned_entries_are_zero(prepared: nn.Module) -> bool:
    return all(bool((t.masked.param.detach()[~t.masked.mask] == 0).all()) for t in prepared.pruner.targets)
