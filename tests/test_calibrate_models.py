"""calibrate() + wanda through the training path on tiny random Hugging Face models that read weights in every way.

GPT-2 (``Conv1D``: ``addmm`` with ``[in, out]`` weights), Falcon (``x @ W.T``),
Mixtral and Qwen2-MoE (stacked ``[E, out, in]`` experts, read per expert by
``F.linear`` / ``bmm`` / grouped mm), Mamba (``conv1d`` kernel read as a view
without calling the layer, ``dt_proj.weight @ x``). Each one: ``prepare`` with
``example_inputs`` + ``calibrate`` + a 50% wanda update + ``convert``; the
statistics are checked against a reference built from forward hooks on the
unprepared model (and, for experts, from the routing the experts module gets).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fxprune
from fxprune.policies.wanda import row_ranks

transformers = pytest.importorskip("transformers")
T = transformers


def _gpt2():
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                          bos_token_id=0, eos_token_id=0))


def _falcon():
    return T.FalconForCausalLM(T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              vocab_size=64, new_decoder_architecture=False, multi_query=True))


def _mixtral():
    return T.MixtralForCausalLM(T.MixtralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32))


def _qwen2_moe():
    return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64, num_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32))


def _mamba():
    return T.MambaForCausalLM(T.MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=64,
                                            expand=2, conv_kernel=4, time_step_rank=4))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared machine: intra-op threads only contend with each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MODELS = {"gpt2": _gpt2, "falcon": _falcon, "mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "mamba": _mamba}


def _build(kind: str, experts_implementation: str | None = None):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MODELS[kind]().eval()
    if experts_implementation is not None:
        model.config._experts_implementation = experts_implementation
    return model


def _targets(model) -> list[str]:
    """Every weight of the decoder blocks that multiplies inputs (2-D, 3-D experts, conv kernels)."""
    return sorted(n for n, p in model.named_parameters()
                  if (".h." in n or ".layers." in n) and p.dim() >= 2 and not n.endswith("A_log"))


def _batches():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 64, (2, 8), generator=g)} for _ in range(2)]


# ----------------------------------------------------------------------------- reference statistics
def _reference(model, names: list[str], batches) -> dict[tuple[str, int | None], torch.Tensor]:
    """Per (weight, expert): per-input-feature sum of squares, from hooks on the unprepared model."""
    ref: dict[tuple[str, int | None], torch.Tensor] = {}

    def add(key, x):
        x = x.detach().double().reshape(-1, x.shape[-1])
        ref[key] = ref.get(key, 0) + x.pow(2).sum(0)

    handles = []
    for name in names:
        owner_name, attr = name.rsplit(".", 1)
        owner = model.get_submodule(owner_name)
        kind = type(owner).__name__
        if attr == "weight" and (isinstance(owner, torch.nn.Linear) or kind in ("Conv1D", "MixtralTopKRouter")
                                 or kind.endswith("TopKRouter")) and not owner_name.endswith("dt_proj"):
            handles.append(owner.register_forward_pre_hook(lambda m, a, n=name: add((n, None), a[0])))
        elif kind.endswith("Experts") and attr == "gate_up_proj":
            handles.append(owner.register_forward_pre_hook(
                lambda m, a, n=owner_name: _expert_reference(m, n, a, add)))
        elif owner_name.endswith("conv1d"):  # Mamba: the conv input is the first half of in_proj's output
            in_proj = model.get_submodule(owner_name.rsplit(".", 1)[0] + ".in_proj")
            handles.append(in_proj.register_forward_hook(
                lambda m, a, out, n=name: add((n, None), out.chunk(2, dim=-1)[0])))
        elif owner_name.endswith("dt_proj"):  # Mamba: dt_proj.weight @ x, x = the first columns of x_proj's output
            mixer = model.get_submodule(owner_name.rsplit(".", 1)[0])
            handles.append(mixer.x_proj.register_forward_hook(
                lambda m, a, out, n=name, r=mixer.time_step_rank: add((n, None), out[..., :r])))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    return ref


def _expert_reference(experts, prefix, args, add):
    """What each expert's gate_up_proj and down_proj multiply, from the routing the experts module receives."""
    hidden, top_k_index = args[0], args[1]
    for e in range(experts.gate_up_proj.shape[0]):
        tokens = (top_k_index == e).any(-1).nonzero().reshape(-1)
        if tokens.numel() == 0:
            continue
        x = hidden[tokens]
        add((f"{prefix}.gate_up_proj", e), x)
        gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        add((f"{prefix}.down_proj", e), experts.act_fn(gate) * up)


def _observed(prepared, name: str) -> dict[tuple[str, int | None], torch.Tensor]:
    state = prepared.get_submodule(name).wanda
    if state.per_expert:
        return {(name, e): state.sq_sum[e].reshape(-1) for e in range(state.rows.shape[0])}
    if prepared.get_submodule(name).param.dim() == 3 and int(state.out_dim) == 0:  # conv kernel [C, 1, k]
        return {(name, None): state.sq_sum[:, 0, 0]}
    return {(name, None): state.sq_sum.reshape(-1)}


# ----------------------------------------------------------------------------- the training path
def _pruned_per_row(prepared, name: str) -> torch.Tensor:
    masked = prepared.get_submodule(name)
    out_dim, pruned = int(masked.wanda.out_dim), ~masked.mask
    if masked.wanda.per_expert:  # each output row of each expert
        return pruned.movedim(out_dim, 1).reshape(pruned.shape[0] * pruned.shape[out_dim], -1)
    return pruned.movedim(out_dim, 0).reshape(pruned.shape[out_dim], -1)


@pytest.mark.parametrize("kind", list(MODELS))
def test_real_models_calibrate_and_wanda_prune_through_the_training_path(kind):
    model = _build(kind)
    names = _targets(model)
    batches = _batches()
    ref = _reference(model, names, batches)
    cfg = {"wanda": {"w": {"weights": names, "target_sparsity": 0.5, "schedule": "oneshot"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, cfg, example_inputs=batches[0])
    rows = fxprune.calibrate(prepared, batches)
    assert set(rows) == set(names) and all(r > 0 for r in rows.values())

    observed = {k: v for n in names for k, v in _observed(prepared, n).items()}
    assert set(observed) == set(ref)  # every weight, and every expert of every stacked weight
    for key, sq in ref.items():
        torch.testing.assert_close(observed[key], sq, rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")

    prepared.pruner.on_epoch_begin(0)
    for name in names:
        per_row = _pruned_per_row(prepared, name)
        assert torch.all(per_row.sum(1) == per_row.shape[1] // 2), name
    batch = batches[0]
    dense = model(**batch).logits
    converted = fxprune.convert(prepared)
    pruned = converted(**batch).logits
    assert pruned.shape == dense.shape and not torch.allclose(pruned, dense)
    assert set(converted.state_dict()) == set(model.state_dict())
    for name in names:  # the masks were folded into the user's weights
        w = converted.get_parameter(name)
        assert int((w == 0).sum()) >= w.numel() // 2 - 1


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_every_experts_implementation_gives_the_same_per_expert_statistics(implementation):
    names = [n for n in _targets(_build("mixtral")) if ".experts." in n]
    cfg = {"wanda": {"w": {"weights": names, "target_sparsity": 0.5, "schedule": "oneshot"}}}
    stats = {}
    for impl in ("grouped_mm", implementation):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = fxprune.prepare(_build("mixtral", impl), cfg)
        fxprune.calibrate(prepared, _batches())
        stats[impl] = {n: (prepared.get_submodule(n).wanda.sq_sum, prepared.get_submodule(n).wanda.rows)
                       for n in names}
    for n in names:
        torch.testing.assert_close(stats[implementation][n][0], stats["grouped_mm"][n][0], rtol=1e-5, atol=1e-6)
        assert torch.equal(stats[implementation][n][1], stats["grouped_mm"][n][1])


def test_expert_statistics_resume_from_state_dict():
    model = _build("mixtral")
    name = "model.layers.0.mlp.experts.down_proj"
    cfg = {"wanda": {"w": {"weights": [name], "target_sparsity": 0.5, "schedule": "oneshot"}}}
    prepared = fxprune.prepare(model, cfg)
    fxprune.calibrate(prepared, _batches())
    fresh = fxprune.prepare(model, cfg)
    fresh.load_state_dict(prepared.state_dict())
    assert fresh.get_submodule(name).wanda.rows.shape == (4,)
    for m in (prepared, fresh):
        m.pruner.on_epoch_begin(0)
    assert torch.equal(fresh.get_submodule(name).mask, prepared.get_submodule(name).mask)


def test_an_expert_no_token_reached_is_an_error_naming_it():
    model = _build("mixtral")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    prepared = fxprune.prepare(model, {"wanda": {"w": {"weights": [name]}}})

    def never_expert_3(module, args, out):  # the router sends expert 3's tokens to expert 2 instead
        logits, scores, index = out
        return logits, scores, torch.where(index == 3, torch.full_like(index, 2), index)

    prepared.get_submodule("model.layers.0.mlp.gate").register_forward_hook(never_expert_3)
    before = prepared.get_submodule(name).wanda.seen()
    with pytest.raises(fxprune.PruningError, match=rf"expert\(s\) \[3\] of '{name}'"):
        fxprune.calibrate(prepared, _batches())
    assert prepared.get_submodule(name).wanda.seen() == before  # nothing was written


@settings(max_examples=20, deadline=None)
@given(experts=st.integers(1, 3), out=st.integers(1, 4), inp=st.integers(1, 5), transposed=st.booleans(),
       seed=st.integers(0, 999))
def test_per_expert_row_ranks_match_a_per_row_oracle(experts, out, inp, transposed, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (experts, inp, out) if transposed else (experts, out, inp)
    out_dim = 2 if transposed else 1
    importance = torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.3
    ranks = row_ranks(importance, out_dim, mask, expert_dim=0)
    for e in range(experts):
        for o in range(out):
            row = importance[e].select(out_dim - 1, o).clone()
            row[~mask[e].select(out_dim - 1, o)] = -float("inf")  # pruned entries rank lowest
            expected = torch.empty(inp)
            expected[torch.argsort(row, stable=True)] = torch.arange(inp, dtype=torch.float32) / inp
            assert torch.equal(ranks[e].select(out_dim - 1, o), expected)


def _llama4():  # all experts in one bmm: tokens viewed [E, T, in] @ [E, in, out]
    return T.Llama4ForCausalLM(T.Llama4TextConfig(
        hidden_size=32, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=32, num_local_experts=4,
        num_experts_per_tok=1))


def test_transposed_expert_layout_prunes_each_output_row_of_each_expert():
    """Llama4 keeps experts [E, in, out] (like GPT-OSS) and multiplies all of them in one bmm."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _llama4().eval()
    names = sorted(n for n, p in model.named_parameters() if ".experts." in n and p.dim() == 3)
    cfg = {"wanda": {"w": {"weights": names, "target_sparsity": 0.5, "schedule": "oneshot"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, cfg)
    fxprune.calibrate(prepared, _batches())
    for name in names:
        state = prepared.get_submodule(name).wanda
        # [E, in, out]: outputs along dim 2, input-feature norms [E, in, 1]
        assert state.per_expert and int(state.out_dim) == 2 and state.sq_sum.shape[2] == 1, name
    prepared.pruner.on_epoch_begin(0)
    for name in names:
        per_row = _pruned_per_row(prepared, name)
        assert torch.all(per_row.sum(1) == per_row.shape[1] // 2), name
