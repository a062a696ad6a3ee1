"""``calibration_dtype``: half-precision blocks calibrate in float32 on CPU, one block at a time, exactly."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.oneshot.sparsegpt import sparsegpt_prune


class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, d: int, h: int, n: int = 2, d_in: int = 6):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(n))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _setup(d, h, seed, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    net = Net(d, h).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randn(4, 3, 6, generator=g).to(dtype) for _ in range(3)]
    return net, batches


def _config(dtype_setting, weights=("blocks.0.*.weight",)):
    return {"pruning": {"sparsegpt": {"p": {"weights": list(weights)}}, "target_sparsity": 0.5,
                        "calibration_dtype": dtype_setting}}


@settings(max_examples=6, deadline=None)
@given(st.sampled_from([8, 16]), st.sampled_from([16, 24]), st.integers(0, 1000),
       st.sampled_from([torch.bfloat16, torch.float16]))
def test_half_block_calibrates_in_float32_exactly(d, h, seed, dtype):
    """``auto`` on CPU: the first block's statistics are float32 products of its half-precision inputs and
    weights, so the pruned weights equal SparseGPT on Hessians computed that way by hand, bit for bit."""
    net, batches = _setup(d, h, seed, dtype)
    block = net.blocks[0]
    h1 = torch.zeros(d, d)
    h2 = torch.zeros(h, h)
    with torch.no_grad():
        for x in batches:
            a1 = net.embed(x).float().reshape(-1, d)  # what the model hands block 0 (its own dtype), upcast
            a2 = torch.relu(F.linear(a1, block.fc1.weight.float(), block.fc1.bias.float()))
            h1.addmm_(a1.t(), a1)
            h2.addmm_(a2.t(), a2)
    want1 = sparsegpt_prune(block.fc1.weight, h1, 0.5)[0]
    want2 = sparsegpt_prune(block.fc2.weight, h2, 0.5)[0]
    ids = [id(p) for p in net.parameters()]
    fxprune.oneshot(net, _config("auto"), batches)
    assert [id(p) for p in net.parameters()] == ids
    assert all(p.dtype == dtype for p in net.parameters())
    assert torch.equal(block.fc1.weight, want1)
    assert torch.equal(block.fc2.weight, want2)


def test_dtype_each_setting_computes_in():
    net, batches = _setup(8, 16, 0)
    seen: list[torch.dtype] = []
    handle = net.blocks[1].fc2.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    cfg = _config("auto", ["blocks.*.weight"])
    fxprune.oneshot(copy.deepcopy(net), cfg, batches)  # the copy has the hook too
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    fxprune.oneshot(copy.deepcopy(net), _config("model", ["blocks.*.weight"]), batches)
    assert seen and set(seen) == {torch.bfloat16}
    handle.remove()
    seen.clear()
    # A float32 model is never cast, whatever the setting.
    f32, b32 = _setup(8, 16, 0, torch.float32)
    f32.blocks[0].fc1.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    fxprune.oneshot(f32, _config("float32"), b32)
    assert set(seen) == {torch.float32}


def test_auto_and_model_dtype_agree_closely():
    """Same method, the arithmetic inside the block more precise: the masks barely differ."""
    net, batches = _setup(32, 64, 3)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    cfg = ["blocks.*.weight"]
    ra = fxprune.oneshot(a, _config("auto", cfg), batches)
    rb = fxprune.oneshot(b, _config("model", cfg), batches)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if name.endswith("weight") and name.startswith("blocks"):
            assert float((p == 0).float().mean()) == 0.5
            assert float(((p == 0) == (q == 0)).float().mean()) > 0.9, name
    for wa, wb in zip(ra.weights, rb.weights):
        assert wa.error == pytest.approx(wb.error, rel=0.2, abs=1e-3)


def test_bad_calibration_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="pruning.calibration_dtype.*one of auto, model, float32"):
        fxprune.load_config(_config("bf16"))
