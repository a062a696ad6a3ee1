"""Hugging Face folders in compressed-tensors' sparse formats: formats picked, read back bit-identically
by fxprune and by compressed-tensors' own decompressor, sizes as the format allows."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")


def tiny_llama(tie: bool = False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def prunable(model):
    """(name, weight) of the projections a one-shot run prunes."""
    return [(n, p) for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() == 2
            and ("proj" in n or "c_attn" in n or "c_fc" in n)]


@torch.no_grad()
def zero_unstructured(model, sparsity=0.5):
    for _, w in prunable(model):
        k = int(w.numel() * sparsity)
        threshold = w.abs().flatten().kthvalue(k).values
        w.mul_(w.abs() > threshold)  # leaves -0.0 where negative weights are cut, as convert does


@torch.no_grad()
def zero_24(model, input_dim=-1):
    for _, w in prunable(model):
        g = w.movedim(input_dim, -1).reshape(-1, 4)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.abs().topk(2, dim=1).indices, True)
        g.masked_fill_(~keep, 0)
        w.copy_(g.reshape(w.movedim(input_dim, -1).shape).movedim(-1, input_dim))


def folder_data_bytes(path) -> int:
    """Bytes of tensor data in a folder's safetensors files (their JSON headers aside)."""
    total = 0
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with open(os.path.join(path, f), "rb") as fh:
                total += os.path.getsize(os.path.join(path, f)) - 8 - struct.unpack("<Q", fh.read(8))[0]
    return total


def assert_same_state(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def ct_decompressed(path, fresh):
    from compressed_tensors.compressors import ModelCompressor

    compressor = ModelCompressor.from_pretrained(str(path))
    compressor.decompress(str(path), fresh)
    return fresh.state_dict()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_llama_round_trip(tmp_path, pattern):
    model = tiny_llama()
    (zero_unstructured if pattern == "unstructured" else zero_24)(model)
    saved = fxprune.save_pretrained(model, tmp_path / "sparse")
    expected_format = "sparse-bitmask" if pattern == "unstructured" else "sparse-24-bitmask"
    assert saved.format == expected_format
    assert all(saved.layouts[n] == expected_format for n, _ in prunable(model))
    assert saved.layouts["lm_head.weight"] == "dense"

    sparsity = json.loads((tmp_path / "sparse" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == expected_format
    assert sparsity["sparsity_structure"] == ("unstructured" if pattern == "unstructured" else "2:4")
    assert sparsity["targets"] == ["Linear"] and sparsity["ignore"] == ["lm_head"]

    loaded = fxprune.load_pretrained(tmp_path / "sparse")
    assert type(loaded) is type(model) and loaded.dtype == torch.bfloat16
    assert_same_state(loaded.state_dict(), model.state_dict())
    x = torch.randint(0, 96, (2, 12))
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert loaded.generate(x[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)

    assert_same_state(ct_decompressed(tmp_path / "sparse", tiny_llama()), model.state_dict())

    # Size: each compressed weight costs its values + mask + row offsets (+ its shape), the rest as dense.
    model.save_pretrained(tmp_path / "dense")
    dense, sparse = folder_data_bytes(tmp_path / "dense"), folder_data_bytes(tmp_path / "sparse")
    if pattern == "unstructured":  # values + mask + row offsets + shape
        cost = [int((w != 0).sum()) * 2 + w.numel() // 8 + 8 * w.shape[0] + 8 * 2 for _, w in prunable(model)]
    else:  # two values in every four + mask + shape
        cost = [w.numel() + w.numel() // 8 + 8 * 2 for _, w in prunable(model)]
    saved_bytes = sum(w.numel() * 2 for _, w in prunable(model)) - sum(cost)
    assert abs(sparse - (dense - saved_bytes)) <= 8 * 4 * len(cost)  # safetensors may align each tensor


def test_gpt2_conv1d_24_along_its_input_dim_is_saved_as_bitmask(tmp_path):
    """Conv1D stores [in, out]: 2:4 along the input is along dim 0, which the 2:4 layout (rows) cannot hold."""
    model = tiny_gpt2()
    zero_24(model, input_dim=0)
    saved = fxprune.save_pretrained(model, tmp_path / "g")
    assert saved.format == "sparse-bitmask"
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert cfg["targets"] == ["Conv1D"]
    loaded = fxprune.load_pretrained(tmp_path / "g")
    assert_same_state(loaded.state_dict(), model.state_dict())
    x = torch.randint(0, 96, (1, 10))
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert_same_state(ct_decompressed(tmp_path / "g", tiny_gpt2()), model.state_dict())


def test_tied_embeddings_and_a_dense_layer(tmp_path):
    model = tiny_llama(tie=True)
    zero_unstructured(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.normal_()  # dense again: stays dense
    saved = fxprune.save_pretrained(model, tmp_path / "t", max_shard_size="100KB")
    assert saved.layouts["model.layers.1.mlp.down_proj.weight"] == "dense"
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert "model.layers.1.mlp.down_proj" in cfg["ignore"]
    assert (tmp_path / "t" / "model.safetensors.index.json").exists()
    loaded = fxprune.load_pretrained(tmp_path / "t")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_state(loaded.state_dict(), model.state_dict())


def test_reads_folders_compressed_tensors_wrote(tmp_path):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import BitmaskConfig

    model = tiny_llama()
    zero_unstructured(model, 0.6)
    compressor = ModelCompressor(sparsity_config=BitmaskConfig(targets=["Linear"], ignore=["lm_head"]))
    model.save_pretrained(tmp_path / "ct", state_dict=compressor.compress(model))
    compressor.update_config(str(tmp_path / "ct"))
    loaded = fxprune.load_pretrained(tmp_path / "ct")
    expected = {k: torch.where(v == 0, torch.zeros_like(v), v) for k, v in model.state_dict().items()}
    assert_same_state(loaded.state_dict(), expected)


def test_dense_model_is_saved_dense_with_a_warning(tmp_path):
    model = tiny_llama()
    with pytest.warns(UserWarning, match="saved dense"):
        saved = fxprune.save_pretrained(model, tmp_path / "d")
    assert saved.format == "dense"
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())
    assert_same_state(fxprune.load_pretrained(tmp_path / "d").state_dict(), model.state_dict())
