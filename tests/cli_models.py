"""Model factories for the command-line tests (``--model cli_models:tiny_cnn``)."""
from __future__ import annotations

from torch import nn


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().flatten(1))


def tiny_cnn() -> nn.Module:
    return TinyCNN()
