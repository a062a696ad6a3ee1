"""Movement and Wanda policies, and fxprune.calibrate, against brute-force oracles."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fxprune
from fxprune import PruningError
from fxprune.masks import count_to_prune
from fxprune.policies.wanda import wanda_importance


# ----------------------------------------------------------------------------- helpers
class MLP(nn.Module):
    def __init__(self, d_in: int = 12, hidden: int = 16, d_out: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().double()


def _data(n_batches: int = 6, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    # Feature scales spread over two orders of magnitude, as in LLM activations: Wanda and magnitude disagree.
    scale = torch.logspace(-1, 1, 12, dtype=torch.float64)
    return [
        (torch.randn(8, 12, generator=g, dtype=torch.float64) * scale, torch.randn(8, 4, generator=g, dtype=torch.float64))
        for _ in range(n_batches)
    ]


def _masked(prepared, name: str):
    return prepared.get_submodule(name)


def _lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Oracle: keep-mask pruning the k lowest scores of a tensor (scores here have no ties)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores.reshape(-1))[:k]] = False
    return keep.reshape(scores.shape)


def _per_row_oracle(importance: torch.Tensor, out_dim: int, sparsity: float) -> torch.Tensor:
    """Oracle: every output row prunes its own lowest ``sparsity`` fraction of entries."""
    imp = importance.movedim(out_dim, 0).reshape(importance.shape[out_dim], -1)
    k = round(sparsity * imp.shape[1])
    keep = torch.ones_like(imp, dtype=torch.bool)
    for i in range(imp.shape[0]):
        keep[i, torch.argsort(imp[i])[:k]] = False
    moved_shape = importance.movedim(out_dim, 0).shape
    return keep.reshape(moved_shape).movedim(0, out_dim)


def _input_sq_sums(model: nn.Module, modules: dict[str, nn.Module], batches, call) -> dict[str, torch.Tensor]:
    """Oracle: per-input-feature sums of squares, from forward pre-hooks on an unprepared model."""
    sums: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().double()
            x = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + (x**2).sum(0)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    with torch.no_grad():
        for b in batches:
            call(model, b)
    for h in handles:
        h.remove()
    return sums


MOVEMENT = {"movement": {"mv": {"weights": ["fc1.weight", "fc2.weight"]}},
            "start_epoch": 1, "end_epoch": 1, "target_sparsity": 0.5, "schedule": "oneshot"}


# ----------------------------------------------------------------------------- movement
def _train_with_oracle(prepared, twin, data, opt, opt_twin, *, hooks: bool):
    """Train the prepared model and an unprepared twin in lockstep; return the brute-force movement sums."""
    expected = {n: torch.zeros_like(twin.get_parameter(n)) for n in ("fc1.weight", "fc2.weight")}
    for x, y in data:
        for model, optimizer in ((prepared, opt), (twin, opt_twin)):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        if hooks:
            prepared.pruner.on_batch_end()
        for n, acc in expected.items():
            p = twin.get_parameter(n)
            acc -= p.detach() * p.grad
    return expected


@pytest.mark.parametrize("hooks", [True, False], ids=["hook-style", "optimizer-mode"])
def test_movement_scores_equal_bruteforce_sum_and_masks_follow(hooks):
    model = _mlp()
    prepared = fxprune.prepare(model, MOVEMENT)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05, momentum=0.9)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    if hooks:
        prepared.pruner.on_epoch_begin(0)
    else:
        prepared.pruner.attach(opt, steps_per_epoch=1000)
    data = _data()
    expected = _train_with_oracle(prepared, twin, data, opt, opt_twin, hooks=hooks)

    for name, acc in expected.items():
        state = _masked(prepared, name).movement
        assert int(state.steps) == len(data)
        torch.testing.assert_close(state.score, acc, rtol=1e-12, atol=1e-14)
        assert bool(_masked(prepared, name).mask.all())  # nothing pruned before start_epoch

    prepared.pruner.on_epoch_begin(1) if hooks else (prepared.pruner.epoch.fill_(1), prepared.pruner.update_masks())
    for name, acc in expected.items():
        m = _masked(prepared, name)
        k = count_to_prune(0.5, acc.numel())
        assert torch.equal(m.mask, _lowest_k_mask(acc, k))
        # The lowest-movement entries are pruned, not the smallest ones.
        assert not torch.equal(m.mask, _lowest_k_mask(twin.get_parameter(name).detach().abs(), k))


def test_movement_state_is_in_state_dict_and_resumes():
    model = _mlp()
    prepared = fxprune.prepare(model, MOVEMENT)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    prepared.pruner.on_epoch_begin(0)
    for x, y in _data(3):
        opt.zero_grad()
        nn.functional.mse_loss(prepared(x), y).backward()
        opt.step()
        prepared.pruner.on_batch_end()
    sd = prepared.state_dict()
    assert {"fc1.weight.movement.score", "fc1.weight.movement.steps"} <= set(sd)
    fresh = fxprune.prepare(model, MOVEMENT)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.fc1.weight.movement.score, prepared.fc1.weight.movement.score)
    prepared.pruner.on_epoch_begin(1)
    fresh.pruner.on_epoch_begin(1)
    assert torch.equal(fresh.fc1.weight.mask, prepared.fc1.weight.mask)
    # convert removes the policy state with the masks
    assert set(fxprune.convert(prepared).state_dict()) == set(model.state_dict())


def test_movement_state_keeps_its_dtype_under_half():
    prepared = fxprune.prepare(_mlp().float(), MOVEMENT)
    prepared.to(torch.bfloat16)
    assert prepared.fc1.weight.param.dtype == torch.bfloat16
    assert prepared.fc1.weight.movement.score.dtype == torch.float32


def test_movement_without_any_step_is_an_error_naming_the_weight():
    prepared = fxprune.prepare(_mlp(), {**MOVEMENT, "start_epoch": 0, "end_epoch": 0})
    with pytest.raises(PruningError, match=r"pruning\.movement\.mv: weight 'fc1\.weight': movement scores are empty"):
        prepared.pruner.on_epoch_begin(0)


# ----------------------------------------------------------------------------- wanda: Linear (graph route)
WANDA = {"wanda": {"w": {"weights": ["fc1.weight", "fc2.weight"], "target_sparsity": 0.5, "schedule": "oneshot"}}}


def test_wanda_linear_graph_route_matches_bruteforce_and_rows_are_exact():
    model = _mlp()
    prepared = fxprune.prepare(model, WANDA)
    assert prepared.pruner.prepare_report.routes["fc1.weight"] == "graph"
    data = _data()
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    prepared.train()
    rows = fxprune.calibrate(prepared, data, forward=lambda m, b: m(b[0]))
    assert prepared.training  # mode restored
    assert rows == {"fc1.weight": 6 * 8, "fc2.weight": 6 * 8}
    for k, v in before.items():  # weights and masks untouched; only the wanda statistics changed
        if ".wanda." not in k:
            assert torch.equal(prepared.state_dict()[k], v), k

    sq = _input_sq_sums(model, {"fc1.weight": model.fc1, "fc2.weight": model.fc2}, data, lambda m, b: m(b[0]))
    for name, s in sq.items():
        w = model.get_parameter(name).detach()
        torch.testing.assert_close(wanda_importance(_masked(prepared, name)), w.abs() * s.sqrt()[None, :])

    prepared.pruner.on_epoch_begin(0)
    for name, s in sq.items():
        w = model.get_parameter(name).detach()
        mask = _masked(prepared, name).mask
        per_row_pruned = (~mask).sum(1)
        assert torch.all(per_row_pruned == w.shape[1] // 2), per_row_pruned
        assert torch.equal(mask, _per_row_oracle(w.abs() * s.sqrt()[None, :], 0, 0.5))
    # Activation-aware: differs from magnitude on these unevenly scaled inputs.
    w1 = model.fc1.weight.detach()
    assert not torch.equal(prepared.fc1.weight.mask, _per_row_oracle(w1.abs(), 0, 0.5))


def test_wanda_state_resumes_and_calibration_accumulates():
    model = _mlp()
    data = _data()
    prepared = fxprune.prepare(model, WANDA)
    fxprune.calibrate(prepared, data[:3], forward=lambda m, b: m(b[0]))
    fxprune.calibrate(prepared, data[3:], forward=lambda m, b: m(b[0]), reset=False)
    whole = fxprune.prepare(model, WANDA)
    fxprune.calibrate(whole, [b[0] for b in data])  # tensors are passed as prepared(batch)
    torch.testing.assert_close(prepared.fc1.weight.wanda.sq_sum, whole.fc1.weight.wanda.sq_sum)

    fresh = fxprune.prepare(model, WANDA)  # never calibrated: empty statistics, filled by load_state_dict
    fresh.load_state_dict(prepared.state_dict())
    for m in (prepared, fresh):
        m.pruner.on_epoch_begin(0)
    assert torch.equal(fresh.fc1.weight.mask, prepared.fc1.weight.mask)
    assert torch.equal(fresh.fc2.weight.mask, prepared.fc2.weight.mask)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_wanda_per_row_sparsity_is_exact(sparsity):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    cfg = {"wanda": {"w": {"target_sparsity": sparsity, "schedule": "oneshot"}}}
    prepared = fxprune.prepare(model, cfg)
    fxprune.calibrate(prepared, [torch.randn(5, 16) for _ in range(3)])
    prepared.pruner.on_epoch_begin(0)
    for name in ("0.weight", "2.weight"):
        mask = _masked(prepared, name).mask
        assert torch.all((~mask).sum(1) == round(sparsity * mask.shape[1]))


def test_wanda_gradual_schedule_keeps_rows_balanced_and_masks_monotone():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(20, 10))
    cfg = {"wanda": {"w": {"init_sparsity": 0.2, "target_sparsity": 0.6, "start_epoch": 0, "end_epoch": 2,
                           "frequency": 1}}}
    prepared = fxprune.prepare(model, cfg)
    old = prepared.get_submodule("0.weight").mask.clone()
    for epoch, pruned_per_row in [(0, 4), (1, 8), (2, 12)]:
        fxprune.calibrate(prepared, [torch.randn(7, 20) * torch.linspace(0.1, 3, 20)])
        prepared.pruner.on_epoch_begin(epoch)
        mask = prepared.get_submodule("0.weight").mask
        assert torch.all((~mask).sum(1) == pruned_per_row)
        assert not torch.any(mask & ~old)  # pruned entries stay pruned
        old = mask.clone()


def test_wanda_grouped_conv2d_matches_channel_norm_oracle():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(6, 3, 1))
    prepared = fxprune.prepare(model, {"wanda": {"w": {"target_sparsity": 0.5, "schedule": "oneshot"}}})
    xs = [torch.randn(2, 4, 5, 5) * torch.tensor([0.1, 1.0, 3.0, 0.5]).view(1, 4, 1, 1) for _ in range(2)]
    fxprune.calibrate(prepared, xs)
    ch = sum((x.double() ** 2).sum(dim=(0, 2, 3)) for x in xs)  # per input channel
    w = model[0].weight.detach().double()
    # output o in group g reads channels 2g, 2g+1
    norms = torch.stack([ch[(o // 3) * 2:(o // 3) * 2 + 2] for o in range(6)]).sqrt()[:, :, None, None]
    torch.testing.assert_close(wanda_importance(prepared.get_submodule("0.weight")).double(), w.abs() * norms)
    prepared.pruner.on_epoch_begin(0)
    mask = prepared.get_submodule("0.weight").mask
    assert torch.all((~mask).reshape(6, -1).sum(1) == 9)  # 18 entries per output channel, half pruned


# ----------------------------------------------------------------------------- wanda: Hugging Face (module route)
def _hf_check(model, names: list[str], layers: dict[str, nn.Module], conv1d: bool):
    cfg = {"wanda": {"llm": {"weights": names, "target_sparsity": 0.5, "schedule": "oneshot"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, cfg)
    assert all(r == "module" for r in prepared.pruner.prepare_report.routes.values())
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (2, 9), generator=g)} for _ in range(3)]
    rows = fxprune.calibrate(prepared, batches)
    assert set(rows.values()) == {3 * 2 * 9}
    sq = _input_sq_sums(model, layers, batches, lambda m, b: m(**b))
    # Conv1D: weight [in, out], x @ W -- the input features run along dim 0, outputs along dim 1.
    norms = {n: sq[n].sqrt()[:, None] if conv1d else sq[n].sqrt()[None, :] for n in names}
    out_dim = 1 if conv1d else 0
    importance = {}
    for name in names:
        w = model.get_parameter(name).detach().double()
        importance[name] = wanda_importance(_masked(prepared, name))
        torch.testing.assert_close(importance[name].double(), w.abs() * norms[name], rtol=1e-5, atol=1e-7)
    prepared.pruner.on_epoch_begin(0)
    for name in names:
        w = model.get_parameter(name).detach().double()
        mask = _masked(prepared, name).mask
        assert torch.all((~mask).sum(1 - out_dim) == w.shape[1 - out_dim] // 2)
        assert torch.equal(mask, _per_row_oracle(importance[name], out_dim, 0.5))
    dense_logits = model(**batches[0]).logits
    converted = fxprune.convert(prepared)
    pruned_logits = converted(**batches[0]).logits
    assert pruned_logits.shape == dense_logits.shape and not torch.allclose(pruned_logits, dense_logits)
    assert set(converted.state_dict()) == set(model.state_dict())


def test_wanda_hf_gpt2_conv1d():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                bos_token_id=0, eos_token_id=0)
    ).eval()
    names = [n for n, _ in model.named_parameters() if n.startswith("transformer.h.") and n.endswith("weight")
             and ".ln_" not in n]
    layers = {n: model.get_submodule(n.rsplit(".", 1)[0]) for n in names}
    assert type(layers[names[0]]).__name__ == "Conv1D"
    _hf_check(model, names, layers, conv1d=True)


def test_wanda_hf_llama_linear():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    ).eval()
    names = [n for n, _ in model.named_parameters() if n.endswith("proj.weight")]
    layers = {n: model.get_submodule(n.rsplit(".", 1)[0]) for n in names}
    _hf_check(model, names, layers, conv1d=False)


# ----------------------------------------------------------------------------- calibrate errors
def test_calibrate_errors():
    model = _mlp()
    with pytest.raises(TypeError, match="fxprune.prepare"):
        fxprune.calibrate(model, [])
    magnitude_only = fxprune.prepare(model, {"magnitude": {"m": {}}})
    with pytest.raises(PruningError, match="no pruner of this model uses an activation-aware policy"):
        fxprune.calibrate(magnitude_only, [torch.randn(2, 12)])
    prepared = fxprune.prepare(model, WANDA)
    with pytest.raises(PruningError, match=r"never reached .*'fc1\.weight'"):
        fxprune.calibrate(prepared, [])
    # A mask update before any calibration names the weight and says what to do.
    with pytest.raises(PruningError, match=r"pruning\.wanda\.w: weight 'fc1\.weight'.*fxprune\.calibrate"):
        prepared.pruner.on_epoch_begin(0)


class _EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, idx):
        return self.fc(self.emb(idx))


class _AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.spare = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize(
    "model,weight,x,message",
    [
        (_EmbedNet(), "emb.weight", torch.randint(0, 10, (2, 5)), r"'emb\.weight'.*graph node.*embedding"),
        (_AttnNet(), "attn.in_proj_weight", torch.randn(2, 3, 8),
         r"'attn\.in_proj_weight'.*attribute 'in_proj_weight' of MultiheadAttention"),
        (_Unused(), "spare.weight", torch.randn(2, 4), r"'spare\.weight' is never read"),
    ],
    ids=["embedding", "multihead-attention", "unused"],
)
def test_calibrate_names_weights_whose_input_cannot_be_observed(model, weight, x, message):
    prepared = fxprune.prepare(model, {"wanda": {"w": {"weights": [weight]}}})
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    with pytest.raises(PruningError, match=message):
        fxprune.calibrate(prepared, [x])
    assert all(torch.equal(prepared.state_dict()[k], v) for k, v in before.items())
    assert "forward" not in prepared.__dict__


def test_config_accepts_movement_and_wanda_and_suggests_names():
    cfg = fxprune.load_config({"wanda": {"a": {"weights": ["x"]}}, "movement": {"b": {"weights": ["y"]}}})
    assert [p.policy for p in cfg.pruners] == ["movement", "wanda"] or [p.policy for p in cfg.pruners] == [
        "wanda", "movement"]
    with pytest.raises(fxprune.ConfigError, match="did you mean 'wanda'"):
        fxprune.load_config({"wandaa": {"a": {}}})


class _Branchy(nn.Module):
    """Data-dependent control flow: not traceable as a whole, its children are traced on their own."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 8))
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > 0:
            x = self.a(x)
        return self.b(torch.relu(x))


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Branchy()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inner(x))


def test_calibrate_reaches_weights_in_child_graphs():
    torch.manual_seed(6)
    model = _Outer()
    xs = [torch.randn(4, 8).abs() for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, {"wanda": {"w": {"target_sparsity": 0.5, "schedule": "oneshot"}}},
                                   example_inputs=(xs[0],))
    rows = fxprune.calibrate(prepared, xs)
    assert rows == {"inner.a.0.weight": 8, "inner.b.weight": 8, "head.weight": 8}
    layers = {"inner.a.0.weight": model.inner.a[0], "inner.b.weight": model.inner.b, "head.weight": model.head}
    sq = _input_sq_sums(model, layers, xs, lambda m, b: m(b))
    for name, s in sq.items():
        w = model.get_parameter(name).detach()
        torch.testing.assert_close(wanda_importance(_masked(prepared, name)).double(), (w.abs() * s.sqrt()).double())
    assert not any("forward" in m.__dict__ for m in prepared.modules() if isinstance(m, torch.fx.GraphModule))
