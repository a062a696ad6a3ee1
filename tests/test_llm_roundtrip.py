"""One-shot SparseGPT on a tiny Llama, then the compressed checkpoints: same weights and logits after reload.

Needs ``fxprune.oneshot`` (the LLM one-shot work) next to the checkpoint formats.
"""
from __future__ import annotations

import json

import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")


def pruned_llama(pattern: str):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    calibration = [torch.randint(0, 96, (2, 16)) for _ in range(4)]
    body = {"weights": ["re:.*layers.*proj.weight"]}
    if pattern != "unstructured":
        body["pattern"] = pattern
    config = {"pruning": {"sparsegpt": {"p": body}, "target_sparsity": 0.5}}
    fxprune.oneshot(model, config, calibration)
    return model


@pytest.mark.parametrize("pattern, fmt", [("unstructured", "sparse-bitmask"), ("2:4", "sparse-24-bitmask")])
def test_oneshot_then_save_pretrained_and_reload(tmp_path, pattern, fmt):
    model = pruned_llama(pattern)
    saved = fxprune.save_pretrained(model, tmp_path / "m")
    assert saved.format == fmt
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == fmt
    loaded = fxprune.load_pretrained(tmp_path / "m")
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    x = torch.randint(0, 96, (1, 12))
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert loaded.generate(x[:, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_oneshot_then_save_sparse_and_reload(tmp_path):
    model = pruned_llama("unstructured")
    fxprune.save_sparse(model, tmp_path / "m.safetensors")
    fresh = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    fxprune.load_sparse(tmp_path / "m.safetensors", fresh)
    x = torch.randint(0, 96, (1, 12))
    assert torch.equal(fresh(x).logits, model(x).logits)
