"""fxprune.oneshot: sequential runner vs a hand-written oracle, whole-model agreement, in place, report, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.errors import ConfigError, PruningError
from fxprune.masks import count_to_prune
from fxprune.oneshot.sparsegpt import sparsegpt_prune


class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x, scale=1.0):
        return x + scale * self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, d=8, h=16, n=2, d_in=6, d_out=4):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(n))
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        h = self.embed(x)
        for i, b in enumerate(self.blocks):
            h = b(h, scale=0.5 + i)
        return self.head(h)


def _batches(d_in=6, n=3, rows=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 3, d_in, generator=g) for _ in range(n)]


def _oracle(net: Net, batches, policy: str, nm=None) -> Net:
    """Block by block by hand: inputs of every layer of a block from the unpruned block, prune, run pruned."""
    net = copy.deepcopy(net)
    s = 0.5

    def prune(layer, xs):
        x = torch.cat([v.reshape(-1, v.shape[-1]) for v in xs])
        w = layer.weight.data
        if policy == "sparsegpt":
            new, _ = sparsegpt_prune(w, x.t() @ x, s, nm=nm)
            layer.weight.data.copy_(new)
        else:  # wanda: |w| * ||x_j||, the lowest half of every row
            imp = w.abs() * x.square().sum(0).sqrt()
            drop = imp.argsort(dim=1, stable=True)[:, : count_to_prune(s, w.shape[1])]
            layer.weight.data.scatter_(1, drop, 0.0)

    with torch.no_grad():
        hs = [net.embed(b) for b in batches]
        for i, blk in enumerate(net.blocks):
            x1 = hs
            x2 = [torch.relu(blk.fc1(h)) for h in hs]
            prune(blk.fc1, x1)
            prune(blk.fc2, x2)
            hs = [blk(h, scale=0.5 + i) for h in hs]
        prune(net.head, hs)
    return net


@settings(max_examples=6, deadline=None)
@given(st.integers(1, 3), st.sampled_from([4, 8]), st.sampled_from(["sparsegpt", "wanda"]), st.booleans(),
       st.integers(0, 100))
def test_sequential_matches_hand_written_oracle(n_blocks, width, policy, use_nm, seed):
    torch.manual_seed(seed)
    net = Net(d=width, h=2 * width, n=n_blocks)
    batches = _batches(seed=seed)
    pattern = "2:4" if use_nm and policy == "sparsegpt" else "unstructured"
    want = _oracle(net, batches, policy, nm=(2, 4) if pattern == "2:4" else None)
    cfg = {"pruning": {policy: {"p": {"weights": ["blocks.*.weight", "head.weight"]}}, "pattern": pattern,
                       "target_sparsity": 0.5}}
    report = fxprune.oneshot(net, cfg, batches)
    for name, p in net.named_parameters():
        q = want.get_parameter(name)
        assert torch.equal(p == 0, q == 0), name
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), name
    assert {w.name for w in report.weights} == {n for n, _ in net.named_parameters()
                                                 if n.endswith("weight") and n != "embed.weight"}
    assert report["head.weight"].block is None and report["blocks.0.fc1.weight"].block == "blocks.0"


def _tiny_llama(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


def _ids(n=2, length=8):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, length), generator=g) for _ in range(n)]


@settings(max_examples=3, deadline=None)
@given(st.sampled_from(["sparsegpt", "wanda", "magnitude"]), st.sampled_from(["unstructured", "2:4"]))
def test_sequential_equals_whole_model_when_earlier_blocks_are_not_pruned(policy, pattern):
    """Pruning only the last block: its inputs (and so its statistics) are the same either way."""
    pytest.importorskip("transformers")
    base = _tiny_llama(3)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    cfg = {"pruning": {policy: {"p": {"weights": ["model.layers.2.*"]}}, "pattern": pattern, "target_sparsity": 0.5}}
    ra = fxprune.oneshot(a, cfg, _ids())
    rb = fxprune.oneshot(b, cfg, _ids(), sequential=False)
    assert ra.sequential and not rb.sequential
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p == 0, q == 0), name
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    for wa, wb in zip(ra.weights, rb.weights):
        assert wa.name == wb.name and wa.rows == wb.rows and wa.error == pytest.approx(wb.error, rel=1e-4)


def _fingerprint(model: nn.Module):
    return {
        "params": [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [n for n, _ in model.named_buffers()],
        "state": list(model.state_dict()),
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(getattr(m, "_forward_hooks_with_kwargs", {}))) for n, m in model.named_modules()],
        "attrs": [(n, sorted(m.__dict__)) for n, m in model.named_modules()],
        "modules": [(n, type(m)) for n, m in model.named_modules()],
    }


@pytest.mark.parametrize("sequential", [True, False])
def test_in_place_leaves_an_ordinary_model(sequential):
    pytest.importorskip("transformers")
    model = _tiny_llama()
    model.train()
    before = _fingerprint(model)
    cfg = {"pruning": {"sparsegpt": {"p": {"weights": ["model.layers.*"]}}, "target_sparsity": 0.5}}
    fxprune.oneshot(model, cfg, _ids(), sequential=sequential)
    assert _fingerprint(model) == before
    assert model.training and all(m.training for m in model.modules())
    assert type(model).__name__ == "LlamaForCausalLM"
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5


def test_report_error_is_the_reconstruction_error():
    """The report's error equals ||W X - W' X||^2 / ||W X||^2 computed from the inputs directly."""
    for rows in (2, 40):  # fewer rows than inputs (rows kept) and more (from the Hessian)
        torch.manual_seed(0)
        net = Net(d=8, h=16, n=2)
        original = copy.deepcopy(net)
        batches = _batches(rows=rows)
        inputs: dict[str, list] = {}
        hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
                 for n, m in original.named_modules() if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for b in batches:
                original(b)
        for h in hooks:
            h.remove()
        for policy in ("sparsegpt", "magnitude"):
            pruned = copy.deepcopy(net)
            cfg = {"pruning": {policy: {"p": {"weights": ["blocks.*.weight", "head.weight"]}}, "target_sparsity": 0.5}}
            report = fxprune.oneshot(pruned, cfg, batches, sequential=False)
            for w in report.weights:
                layer = w.name.rsplit(".", 1)[0]
                x = torch.cat(inputs[layer]).double()
                w0 = original.get_parameter(w.name).double()
                w1 = pruned.get_parameter(w.name).double()
                want = float((((x @ (w0 - w1).t()) ** 2).sum() / ((x @ w0.t()) ** 2).sum()).detach())
                assert w.error == pytest.approx(want, rel=2e-3, abs=1e-6), (rows, policy, w.name)
                assert w.rows == x.shape[0]
    d = report.to_dict()
    assert d["total_sparsity"] == pytest.approx(0.5) and len(d["weights"]) == 5
    text = str(report)
    assert "blocks.0.fc1.weight" in text and "rel. error" in text


def test_shared_inputs_share_one_hessian():
    pytest.importorskip("transformers")
    from fxprune.observe import WeightInputObserver
    from fxprune.oneshot.statistics import InputCollector

    model = _tiny_llama(1)
    layer = model.model.layers[0]
    names = [n for n, p in layer.named_parameters() if n.endswith("proj.weight")]
    coll = InputCollector(lambda key: True)
    hidden = model.model.embed_tokens(_ids(1)[0])
    pos = model.model.rotary_emb(hidden, torch.arange(hidden.shape[1])[None])
    with torch.no_grad(), WeightInputObserver(layer, {n: layer.get_parameter(n) for n in names}, coll):
        layer(hidden, position_embeddings=pos)
        coll.end_batch()
    g = {n.split(".")[-2]: coll.group_of[(n, None)] for n in names}
    assert g["q_proj"] is g["k_proj"] is g["v_proj"] and g["gate_proj"] is g["up_proj"]
    assert len({id(v) for v in g.values()}) == 4


@settings(max_examples=8, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=4))
def test_groups_split_when_inputs_stop_agreeing(plan):
    """Two weights that share inputs in some batches and not in others: each ends with its own exact H."""
    from fxprune.observe import WeightInputObserver
    from fxprune.oneshot.statistics import InputCollector

    a, b = nn.Linear(4, 3, bias=False), nn.Linear(4, 2, bias=False)
    mod = nn.ModuleDict({"a": a, "b": b})
    coll = InputCollector(lambda key: True)
    want = {"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(4, 4)}
    g = torch.Generator().manual_seed(len(plan))
    with torch.no_grad(), WeightInputObserver(mod, {"a.weight": a.weight, "b.weight": b.weight}, coll):
        for same, b_runs in plan:
            x = torch.randn(5, 4, generator=g)
            y = x if same else torch.randn(5, 4, generator=g)
            a(x)
            want["a.weight"] += x.t() @ x
            if b_runs:
                b(y)
                want["b.weight"] += y.t() @ y
            coll.end_batch()
    for name, h in want.items():
        if (name, None) in coll.group_of:
            assert torch.allclose(coll.group_of[(name, None)].hessian_sum(), h, atol=1e-4), name


# ----------------------------------------------------------------------------- config and errors


def test_minimal_config_and_schedule_keys_have_no_effect():
    torch.manual_seed(0)
    net = Net()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    fxprune.oneshot(a, {"pruning": {"sparsegpt": {"p": {"weights": ["blocks.*.weight"]}}, "target_sparsity": 0.5}},
                    _batches())
    fxprune.oneshot(b, {"pruning": {"sparsegpt": {"p": {"weights": ["blocks.*.weight"], "block_size": 128,
                                                        "dampening_frac": 0.01}},
                                    "target_sparsity": 0.5, "start_epoch": 2, "end_epoch": 9, "frequency": 3,
                                    "schedule": "cubic", "init_sparsity": 0.1}}, _batches())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_magnitude_without_calibration_and_on_cpu_device():
    torch.manual_seed(0)
    net = Net()
    a, b, c = copy.deepcopy(net), copy.deepcopy(net), copy.deepcopy(net)
    cfg = {"pruning": {"magnitude": {"p": {"weights": ["blocks.*.weight"]}}, "pattern": "2:4"}}
    ra = fxprune.oneshot(a, cfg, None)
    fxprune.oneshot(b, cfg, _batches())
    fxprune.oneshot(c, cfg, _batches(), device="cpu")
    assert all(w.error is None for w in ra.weights)
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q) and torch.equal(q, r)


def _unchanged(model, state):
    return all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


class Branchy(Net):
    """Block ``k`` has a layer its forward never calls."""

    def __init__(self, k: int):
        super().__init__()
        self.blocks[k].unused = nn.Linear(16, 8)


@pytest.mark.parametrize("k", [0, 1])
def test_layer_that_never_runs(k):
    net = Branchy(k)
    state = copy.deepcopy(net.state_dict())
    with pytest.raises(PruningError, match=f"blocks.{k}.unused.weight") as e:
        fxprune.oneshot(net, {"pruning": {"wanda": {"p": {"weights": ["blocks.*.weight"]}}}}, _batches())
    if k == 0:
        assert _unchanged(net, state)
    else:
        assert "already pruned in place" in str(e.value) and "blocks.0" in str(e.value)


def test_calibration_errors_leave_the_model_untouched():
    net = Net()
    state = copy.deepcopy(net.state_dict())
    cfg = {"pruning": {"sparsegpt": {"p": {"weights": ["blocks.*.weight"]}}}}
    with pytest.raises(PruningError, match="no batches"):
        fxprune.oneshot(net, cfg, [])
    with pytest.raises(PruningError, match="needs calibration"):
        fxprune.oneshot(net, cfg, None)
    with pytest.raises(PruningError, match="no tokens"):
        fxprune.oneshot(net, cfg, [torch.zeros(0, 6)])
    with pytest.raises(ConfigError, match="embed.weight.*divisible by 4"):
        fxprune.oneshot(net, {"pruning": {"sparsegpt": {"p": {"weights": ["embed.weight"]}}, "pattern": "2:4"}},
                        _batches())
    assert _unchanged(net, state)


def test_unobservable_weight_fails_before_any_change():
    pytest.importorskip("transformers")
    model = _tiny_llama()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match="embed_tokens"):
        fxprune.oneshot(model, {"pruning": {"wanda": {"p": {"weights": ["model.layers.*", "model.embed_tokens.weight"]}}}},
                        _ids())
    assert _unchanged(model, state)


def test_no_repeated_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    state = copy.deepcopy(model.state_dict())
    cfg = {"pruning": {"sparsegpt": {"p": {}}}}
    with pytest.raises(PruningError, match="no repeated blocks.*sequential_targets.*sequential=False"):
        fxprune.oneshot(model, cfg, _batches())
    assert _unchanged(model, state)
    report = fxprune.oneshot(model, cfg, _batches(), sequential=False)
    assert [w.sparsity for w in report.weights] == [0.5, 0.5]


def test_sequential_targets():
    torch.manual_seed(0)
    net = Net()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    cfg = {"pruning": {"sparsegpt": {"p": {"weights": ["blocks.*.weight"]}}}}
    fxprune.oneshot(a, cfg, _batches())
    fxprune.oneshot(b, {"pruning": {**cfg["pruning"], "sequential_targets": "Block"}}, _batches())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ConfigError, match="pruning.sequential_targets.*matches no module"):
        fxprune.oneshot(net, {"pruning": {**cfg["pruning"], "sequential_targets": ["decoder.*"]}}, _batches())


def test_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'dampening_frac'"):
        fxprune.load_config({"sparsegpt": {"p": {"dampening_fracc": 0.1}}})
    with pytest.raises(ConfigError, match="pruning.magnitude.p.block_size.*sparsegpt"):
        fxprune.load_config({"magnitude": {"p": {"block_size": 64}}})
    with pytest.raises(ConfigError, match="block_size"):
        fxprune.load_config({"sparsegpt": {"p": {"block_size": 0}}})
    with pytest.raises(ConfigError, match="fxprune.oneshot"):
        fxprune.prepare(Net(), {"sparsegpt": {"p": {"weights": ["head.weight"]}}})
    with pytest.raises(ConfigError, match="scope"):
        fxprune.oneshot(Net(), {"wanda": {"p": {"scope": "global"}}}, _batches())
    with pytest.raises(ConfigError, match="needs training"):
        fxprune.oneshot(Net(), {"movement": {"p": {}}}, _batches())
    cfg = fxprune.load_config({"sparsegpt": {"p": {"dampening_frac": 0.05}}, "sequential_targets": ["Block"]})
    assert fxprune.load_config(cfg.to_dict()) == cfg


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 9), st.integers(1, 12), st.sampled_from([0.0, 0.3, 0.5, 0.77]), st.integers(0, 999),
       st.booleans())
def test_one_shot_masks_equal_the_training_selection(out_f, in_f, sparsity, seed, ties):
    """The slab-wise magnitude and Wanda masks equal masks.py's whole-tensor selection (the training path)."""
    from fxprune.config import PrunerConfig
    from fxprune.masks import local_unstructured_mask
    from fxprune.oneshot import solve
    from fxprune.policies.wanda import importance_from, row_ranks

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if ties:
        w = w.round()
    sq = torch.rand(in_f, generator=g).double()
    ones = torch.ones_like(w, dtype=torch.bool)
    pruner = PrunerConfig(name="p", policy="wanda", target_sparsity=sparsity)
    old = solve._SLAB
    try:
        solve._SLAB = 2  # several slabs even for small matrices
        wanda = solve._wanda_keep(w, sq, pruner, "w")
        mag = solve._magnitude_keep(w, pruner, "w")
    finally:
        solve._SLAB = old
    assert torch.equal(wanda, local_unstructured_mask(row_ranks(importance_from(w, sq[None, :]), 0, ones), ones, sparsity))
    assert torch.equal(mag, local_unstructured_mask(w.abs(), ones, sparsity))
