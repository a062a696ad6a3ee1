"""Model and config generators shared by the tests (hypothesis strategies + small fixed models)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn


@dataclass(frozen=True)
class MLPSpec:
    """An MLP whose layers read their weights in different ways.

    kinds: 'module' (nn.Linear), 'functional' (raw nn.Parameter through F.linear),
    'transposed' (raw parameter stored [in, out], used as ``x @ w``), 'tied'
    (reuses the previous layer's module weight; needs a square previous layer).
    """

    widths: tuple[int, ...]
    kinds: tuple[str, ...]
    seed: int


class GeneratedMLP(nn.Module):
    def __init__(self, spec: MLPSpec):
        super().__init__()
        torch.manual_seed(spec.seed)
        self.kinds = spec.kinds
        self.layers = nn.ModuleList()
        self.raw = nn.ParameterList()
        for i, kind in enumerate(spec.kinds):
            fan_in, fan_out = spec.widths[i], spec.widths[i + 1]
            if kind == "module":
                self.layers.append(nn.Linear(fan_in, fan_out))
            elif kind == "tied":
                lin = nn.Linear(fan_in, fan_out)
                lin.weight = self.layers[i - 1].weight  # tied with the previous module layer
                self.layers.append(lin)
            else:
                self.layers.append(nn.Identity())
                shape = (fan_out, fan_in) if kind == "functional" else (fan_in, fan_out)
                self.raw.append(nn.Parameter(torch.randn(*shape) / fan_in**0.5))
        self.norm = nn.LayerNorm(spec.widths[-1])

    def forward(self, x):
        r = 0
        for i, kind in enumerate(self.kinds):
            if kind in ("module", "tied"):
                x = self.layers[i](x)
            elif kind == "functional":
                x = F.linear(x, self.raw[r])
                r += 1
            else:
                x = x @ self.raw[r]
                r += 1
            if i < len(self.kinds) - 1:
                x = torch.tanh(x)
        return self.norm(x)


@st.composite
def mlp_specs(draw) -> MLPSpec:
    depth = draw(st.integers(1, 4))
    widths = [draw(st.integers(2, 12))]
    kinds: list[str] = []
    for i in range(depth):
        options = ["module", "functional", "transposed"]
        if i > 0 and kinds[-1] in ("module", "tied") and widths[-1] == widths[-2]:
            options.append("tied")
        kind = draw(st.sampled_from(options))
        kinds.append(kind)
        widths.append(widths[-1] if kind == "tied" else draw(st.integers(2, 12)))
    return MLPSpec(tuple(widths), tuple(kinds), draw(st.integers(0, 2**16)))


@dataclass(frozen=True)
class CNNSpec:
    channels: tuple[int, ...]
    kernels: tuple[int, ...]
    batchnorm: bool
    seed: int
    size: int = 8


class GeneratedCNN(nn.Module):
    def __init__(self, spec: CNNSpec):
        super().__init__()
        torch.manual_seed(spec.seed)
        layers: list[nn.Module] = []
        c_in = 1
        for c, k in zip(spec.channels, spec.kernels):
            layers.append(nn.Conv2d(c_in, c, k, padding=k // 2))
            if spec.batchnorm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.ReLU())
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in * spec.size * spec.size, 5)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


@st.composite
def cnn_specs(draw) -> CNNSpec:
    depth = draw(st.integers(1, 3))
    return CNNSpec(
        channels=tuple(draw(st.integers(1, 6)) for _ in range(depth)),
        kernels=tuple(draw(st.sampled_from([1, 3])) for _ in range(depth)),
        batchnorm=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def build(spec) -> tuple[nn.Module, torch.Tensor]:
    """The model for a spec and an input batch for it."""
    g = torch.Generator().manual_seed(spec.seed)
    if isinstance(spec, MLPSpec):
        return GeneratedMLP(spec), torch.randn(5, spec.widths[0], generator=g)
    return GeneratedCNN(spec), torch.randn(3, 1, spec.size, spec.size, generator=g)


model_specs = st.one_of(mlp_specs(), cnn_specs())


@st.composite
def schedules(draw) -> dict:
    """Global schedule keys of a valid config."""
    start = draw(st.integers(0, 3))
    end = start + draw(st.integers(0, 5))
    init = draw(st.floats(0.0, 0.5))
    target = draw(st.floats(init, 0.95))
    return {
        "start_epoch": start,
        "end_epoch": end,
        "frequency": draw(st.integers(1, 3)),
        "init_sparsity": init,
        "target_sparsity": target,
    }


def config_for(schedule: dict, weights: list[str] | None = None) -> dict:
    body = {} if weights is None else {"weights": weights}
    return {"pruning": {"magnitude": {"prune1": body}, **schedule}}


def snapshot(model: nn.Module) -> dict:
    """Everything a half-modifying prepare() could change: tensors, their identity, module types."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": [(n, id(p)) for n, p in model.named_parameters()],
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "dict": sorted(model.__dict__),
    }


def same_snapshot(a: dict, b: dict) -> bool:
    return (
        a["params"] == b["params"]
        and a["modules"] == b["modules"]
        and a["dict"] == b["dict"]
        and a["state"].keys() == b["state"].keys()
        and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    )
