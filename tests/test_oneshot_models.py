"""One-shot pruning of real Hugging Face architectures (tiny random configs): exact sparsity, generate works."""
from __future__ import annotations

import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL))


def _mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=8))


def _gemma2():
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SMALL, head_dim=8, sliding_window=8))


def _phi3():
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**SMALL, pad_token_id=0))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def _opt():
    return transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                             num_attention_heads=4, max_position_embeddings=64,
                                                             word_embed_proj_dim=32))


def _mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2))


MODELS = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral, "gemma2": _gemma2, "phi3": _phi3, "gpt2": _gpt2,
          "opt": _opt, "mixtral": _mixtral}
BLOCKS = {"gpt2": "transformer.h.*", "opt": "model.decoder.layers.*"}


def _batches(n=3, length=12):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 96, (2, length), generator=g) for _ in range(n)]


def _targets(model, glob):
    import fnmatch

    return {n: p for n, p in model.named_parameters() if fnmatch.fnmatchcase(n, glob) and p.dim() >= 2
            and "norm" not in n and "router" not in n and "gate.weight" not in n}


#: Per architecture: (attention weights, MLP / expert weights); attention goes to a 50% unstructured
#: SparseGPT pruner, the MLP to a 2:4 one, so that every model runs both patterns in one one-shot call.
WEIGHTS = {
    "gpt2": (["transformer.h.*.attn.c_*.weight"], ["transformer.h.*.mlp.c_*.weight"]),
    "opt": (["model.decoder.layers.*.self_attn.*_proj.weight"], ["model.decoder.layers.*.fc*.weight"]),
    "mixtral": (["model.layers.*.self_attn.*_proj.weight"], ["model.layers.*.mlp.experts.*"]),
}
DEFAULT_WEIGHTS = (["model.layers.*.self_attn.*_proj.weight"], ["model.layers.*.mlp.*_proj.weight"])


def _check_pattern(model, report, arch):
    for w in report.weights:
        p = model.get_parameter(w.name).detach()
        assert int((p == 0).sum()) == p.numel() // 2, w.name
        assert w.sparsity == 0.5 and w.rows > 0 and w.error is not None and 0 <= w.error < 1.5, w
        if w.pattern == "2:4":
            m = p.t() if arch == "gpt2" else p  # Conv1D keeps [in, out]: groups run along the inputs, dim 0
            assert int((m.reshape(*m.shape[:-1], -1, 4) != 0).sum(-1).max()) <= 2, w.name


@pytest.mark.parametrize("arch", list(MODELS))
def test_sparsegpt_real_models(arch):
    """SparseGPT 50% unstructured on attention and 2:4 on the MLP (experts one by one for Mixtral)."""
    torch.manual_seed(0)
    model = MODELS[arch]().eval()
    attention, mlp = WEIGHTS.get(arch, DEFAULT_WEIGHTS)
    cfg = {"pruning": {"sparsegpt": {"attn": {"weights": attention, "target_sparsity": 0.5},
                                     "mlp": {"weights": mlp, "pattern": "2:4"}}}}
    report = fxprune.oneshot(model, cfg, _batches())
    assert {w.pattern for w in report.weights} == {"unstructured", "2:4"}
    assert len(report.weights) >= 2 * (4 if arch != "mixtral" else 6) - (2 if arch == "gpt2" else 0)
    _check_pattern(model, report, arch)
    out = model.generate(_batches(1, 5)[0], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8)


@pytest.mark.parametrize("arch,policy", [("gpt2", "wanda"), ("mixtral", "wanda"), ("llama", "magnitude")])
def test_wanda_and_magnitude(arch, policy):
    torch.manual_seed(0)
    model = MODELS[arch]().eval()
    block = {"gpt2": "transformer.h.*"}.get(arch, "model.layers.*")
    cfg = {"pruning": {policy: {"p": {"weights": [f"{block}.weight"] if arch != "mixtral" else
                                      ["model.layers.*_proj.weight", "model.layers.*.experts.*"]}},
                       "target_sparsity": 0.5}}
    report = fxprune.oneshot(model, cfg, _batches())
    for w in report.weights:
        assert w.sparsity == pytest.approx(0.5, abs=1e-9), w.name
    out = model.generate(_batches(1, 5)[0], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)
