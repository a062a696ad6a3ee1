"""The model, config, data and training loop shared by the FSDP2 test's workers and its single-process oracle."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 8
STEPS_PER_EPOCH = 2
GLOBAL_BATCH = 8


class ConvStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class BlockNet(nn.Module):
    """A conv stem, three residual MLP blocks and a head: the units FSDP2 shards, traced through by fx."""

    def __init__(self, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.stem = ConvStem()
        self.blocks = nn.ModuleList([Block(d) for _ in range(3)])
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def config() -> dict:
    """Local and global magnitude, 2:4, LAMP and movement pruners, several mask updates each (by epoch)."""
    return {
        "pruning": {
            "magnitude": {
                "local": {"weights": ["stem.conv.weight", "blocks.0.*"], "target_sparsity": 0.7},
                "glob": {"weights": ["blocks.1.*"], "scope": "global", "target_sparsity": 0.8},
                "nm": {"weights": ["blocks.2.fc2.weight"], "pattern": "2:4"},
            },
            "lamp": {"lp": {"weights": ["blocks.2.fc1.weight"], "target_sparsity": 0.6}},
            "movement": {"mv": {"weights": ["head.weight"], "target_sparsity": 0.5, "start_epoch": 1}},
            "start_epoch": 0,
            "end_epoch": 3,
            "frequency": 1,
            "init_sparsity": 0.2,
        }
    }


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (every run sees the same data order)."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 4, 5, 5, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g)


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    n = GLOBAL_BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimizer-mode step (the pruner is attached): mean loss over this process's part of the batch."""
    loss = F.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def hook_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.01)


def hook_style_run(model: nn.Module, opt: torch.optim.Optimizer, data) -> None:
    """The seed's loop: every pruner hook called by hand, the optimizer not attached."""
    pruner = model.pruner
    for step, (x, y) in enumerate(data):
        if step % STEPS_PER_EPOCH == 0:
            pruner.on_epoch_begin(step // STEPS_PER_EPOCH)
        pruner.on_batch_begin()
        loss = pruner.on_minibatch_end(model, F.mse_loss(model(x), y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.on_batch_end()
        if step % STEPS_PER_EPOCH == STEPS_PER_EPOCH - 1:
            pruner.on_epoch_end(step // STEPS_PER_EPOCH)


CHANNEL_CONFIG = {"pruning": {"magnitude": {"c": {"weights": ["blocks.0.fc1.weight"], "pattern": "channel"}},
                              "target_sparsity": 0.5, "start_epoch": 0, "end_epoch": 0, "schedule": "oneshot"}}
WANDA_CONFIG = {"pruning": {"wanda": {"w": {"weights": ["head.weight"]}}, "target_sparsity": 0.5}}
