"""Models symbolic tracing cannot handle whole: per-submodule fallback and module-level masking."""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest

import torch
import torch.nn.functional as F
from torch import nn

import fxprune

CONFIG = {"magnitude": {"p": {}}, "start_epoch": 0, "end_epoch": 0, "target_sparsity": 0.5}


class DataDependent(nn.Module):
    """Branches on tensor values: untraceable, must become a leaf."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.gate = nn.Parameter(torch.randn(6, 6))

    def forward(self, x):
        if x.sum() > 0:
            return self.proj(x)
        return F.linear(x, self.gate)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.block = DataDependent()
        self.mha = nn.MultiheadAttention(6, 2, batch_first=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.block(torch.relu(self.inp(x)))
        a, _ = self.mha(h[:, None], h[:, None], h[:, None])
        return self.out(a[:, 0])


class UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)
        self.lstm = nn.LSTM(4, 4, batch_first=True)

    def forward(self, x):
        h = self.a(x)
        if h.mean() > 10:  # data-dependent, in the root's own forward
            h = h * 2
        y, _ = self.lstm(h[:, None])
        return self.b(y[:, 0])


def run_and_check(model, x, expected_routes):
    model.eval()
    with pytest.warns(fxprune.TraceFallbackWarning):
        prepared = fxprune.prepare(model, CONFIG)
    prepared.eval()
    torch.testing.assert_close(prepared(x), model(x), rtol=0, atol=1e-6)
    report = prepared.pruner.prepare_report
    assert report.routes == expected_routes
    prepared.pruner.on_epoch_begin(0)
    for t in prepared.pruner.targets:
        assert int((~t.masked.mask).sum()) == round(0.5 * t.masked.mask.numel() + 1e-9), t.name
    # Module-level masking is real: the masked forward differs from the dense one and equals convert.
    dense = model(x)
    masked = prepared(x)
    assert not torch.allclose(masked, dense)
    converted = fxprune.convert(prepared)
    assert type(converted) is type(model)
    assert list(converted.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(converted(x), masked, rtol=0, atol=1e-6)
    # deepcopy and pickle keep the module-level hooks working
    for clone in (copy.deepcopy(prepared), pickle.loads(pickle.dumps(prepared))):
        torch.testing.assert_close(clone(x), masked, rtol=0, atol=1e-6)
    return prepared


def test_untraceable_submodule_becomes_leaf_and_is_masked_at_module_level():
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    prepared = run_and_check(Net(), x, {
        "inp.weight": "graph",
        "block.proj.weight": "module",
        "block.gate": "module",
        "mha.in_proj_weight": "module",
        "mha.out_proj.weight": "module",
        "out.weight": "graph",
    })
    report = prepared.pruner.prepare_report
    assert list(report.fallback_leaves) == ["block"]
    assert "block" in str(report) and "inp.weight: graph" in str(report)
    # both branches of the leaf see masked weights
    torch.testing.assert_close(prepared(-x.abs() - 5), fxprune.convert(prepared)(-x.abs() - 5), rtol=0, atol=1e-6)


def test_untraceable_root_masks_everything_at_module_level_including_rnns():
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    prepared = run_and_check(UntraceableRoot(), x, {
        "a.weight": "module",
        "b.weight": "module",
        "lstm.weight_ih_l0": "module",
        "lstm.weight_hh_l0": "module",
    })
    report = prepared.pruner.prepare_report
    assert not report.traced and report.root_error


def test_module_level_weights_train_with_zero_gradients_on_pruned_entries():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(8, 4)
    with pytest.warns(fxprune.TraceFallbackWarning):
        prepared = fxprune.prepare(model, CONFIG)
    prepared.pruner.on_epoch_begin(0)
    opt = torch.optim.Adam(prepared.parameters(), lr=0.01)
    for _ in range(3):
        prepared.pruner.on_batch_begin()
        loss = prepared(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        with_grad = [t for t in prepared.pruner.targets if t.masked.param.grad is not None]
        assert {t.route for t in with_grad} == {"graph", "module"}  # block.gate sits in the branch not taken
        for t in with_grad:
            assert (t.masked.param.grad[~t.masked.mask] == 0).all(), t.name
        opt.step()
        prepared.pruner.on_batch_end()
    for t in prepared.pruner.targets:
        assert (t.masked.param[~t.masked.mask] == 0).all()


def test_torch_save_of_whole_prepared_model():
    torch.manual_seed(0)
    model = Net()
    with pytest.warns(fxprune.TraceFallbackWarning):
        prepared = fxprune.prepare(model, CONFIG)
    prepared.pruner.on_epoch_begin(0)
    buf = io.BytesIO()
    torch.save(prepared, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), prepared(x), rtol=0, atol=0)
    assert list(loaded.state_dict()) == list(prepared.state_dict())
    assert loaded.pruner.current_goals() == prepared.pruner.current_goals()


class TrainOnly(nn.Module):
    """Reads self.training: a graph traced in one mode would be wrong in the other."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if self.training else y


class ModeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.mode = TrainOnly()
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.mode(torch.relu(self.a(x))))


class ModeRoot(ModeNet):
    def forward(self, x):
        x = self.a(x)
        if self.training:
            x = x + 1
        return self.b(x)


@pytest.mark.parametrize("cls,leaves,traced", [(ModeNet, ["mode"], True), (ModeRoot, [], False)])
@pytest.mark.parametrize("prepare_in_train_mode", [True, False])
def test_forward_reading_self_training_is_right_in_both_modes(cls, leaves, traced, prepare_in_train_mode):
    torch.manual_seed(0)
    model = cls().train(prepare_in_train_mode)
    x = torch.randn(3, 4)
    with pytest.warns(fxprune.TraceFallbackWarning):
        prepared = fxprune.prepare(model, CONFIG)
    report = prepared.pruner.prepare_report
    assert list(report.fallback_leaves) == leaves and report.traced == traced
    assert all("train() and eval()" in r for r in report.fallback_leaves.values())
    for mode in (True, False, True):
        model.train(mode)
        prepared.train(mode)
        torch.testing.assert_close(prepared(x), model(x), rtol=0, atol=1e-6)
    prepared.pruner.on_epoch_begin(0)
    for mode in (False, True):
        prepared.train(mode)
        converted = fxprune.convert(prepared)
        assert converted.training == mode
        torch.testing.assert_close(converted(x), prepared(x), rtol=0, atol=1e-6)


class MakesTensors(nn.Module):
    """Tensors created in the forward become tensor constants of the trace (one per trace)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x + torch.zeros(4)) * torch.arange(4.0)


def test_tensors_made_in_the_forward_are_not_a_train_eval_difference():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no TraceFallbackWarning
        model = MakesTensors()
        prepared = fxprune.prepare(model, {"magnitude": {"p": {}}})
    assert prepared.pruner.prepare_report.traced
    x = torch.randn(3, 4)
    torch.testing.assert_close(prepared(x), model(x))


class ModeConstant(nn.Module):
    """A tensor made in the forward whose value depends on the mode: a real train/eval difference."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * (torch.tensor(0.5) if self.training else torch.tensor(2.0))


def test_a_mode_dependent_tensor_constant_is_a_train_eval_difference():
    import warnings

    model = ModeConstant()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, {"magnitude": {"p": {}}})
    x = torch.randn(3, 4)
    for mode in (True, False):
        prepared.train(mode), model.train(mode)
        torch.testing.assert_close(prepared(x), model(x))


class HasChildNamedSelf(nn.Module):
    """Like Hugging Face's ``BertAttention``, whose submodule is called ``self``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.self = nn.Tanh()  # an fx leaf: a call_module node whose target is "self"
        self.out = nn.Linear(4, 4)  # read after that node: through ``self``

    def forward(self, x):
        return self.out(self.self(self.lin(x)))


class BranchingRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = HasChildNamedSelf()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: the root stays Python, ``inner`` is captured on its own
            return self.inner(x)
        return -self.inner(x)


def test_a_child_named_self_does_not_shadow_the_graph_argument():
    torch.manual_seed(0)
    model = BranchingRoot().eval()
    x = torch.randn(3, 4).abs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, {"magnitude": {"p": {}}, "target_sparsity": 0.5}, example_inputs=(x,))
    assert prepared.pruner.prepare_report.modules["inner"] == "graph"
    torch.testing.assert_close(prepared.eval()(x), model(x))
