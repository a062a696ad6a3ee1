"""Channel pruning (pattern: channel) and physical shrinking: oracle = the masked model itself."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.structured import channel_plan_of, channel_report


def channel_config(goal: float = 0.5, **extra) -> dict:
    body = {"pattern": "channel", "target_sparsity": goal, "schedule": "oneshot", **extra}
    return {"magnitude": {"p": body}, "start_epoch": 0, "end_epoch": 0}


def prune_and_shrink(model: nn.Module, goal: float = 0.5):
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, channel_config(goal))
    prepared.pruner.on_epoch_begin(0)
    shrunk = fxprune.convert(prepared, physical=True)
    return prepared.eval(), shrunk.eval()


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def randomize_bn(model: nn.Module, calibration: torch.Tensor | None = None) -> None:
    """Non-trivial BN statistics, so that a BN-shifted pruned channel is not zero (the hard case).

    With ``calibration``, running statistics are measured on it (random
    statistics make a deep network's output ignore its input, and then a
    wrong cut in an early layer would not show); affine parameters are random.
    """
    g = torch.Generator().manual_seed(0)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        if calibration is not None:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the one batch
            model.train()(calibration)
            model.eval()
        for m in bns:
            if calibration is None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))
            else:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)


class Mixed(nn.Module):
    """Residual add + concatenation + grouped conv + depthwise conv + flatten -> linear."""

    def __init__(self, c: int, g: int, hw: int):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.abn = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 1)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.grouped = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=g)
        self.gbn = nn.BatchNorm2d(2 * c)
        self.head = nn.Linear(2 * c * hw * hw, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        r = torch.relu(self.abn(self.a(x))) + x  # residual: a's rows coupled with stem's
        y = torch.cat([r, self.b(x)], dim=1)  # concatenation: 2c channels
        y = torch.relu(self.gbn(self.grouped(self.dw(y))))
        return self.head(torch.flatten(y, 1))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c=st.sampled_from([4, 6, 8]),
    g=st.sampled_from([1, 2]),
    goal=st.sampled_from([0.25, 0.5, 0.75]),
    seed=st.integers(0, 1000),
)
def test_mixed_cnn_shrunk_equals_masked(c, g, goal, seed):
    torch.manual_seed(seed)
    model = Mixed(c, g, hw=4)
    randomize_bn(model)
    prepared, shrunk = prune_and_shrink(model, goal)
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        want, got = prepared(x), shrunk(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert n_params(shrunk) < n_params(model)

    # Coupled channels go together: the residual's two producers lose the same rows,
    # and every layer's shape agrees with the channels kept.
    stem_rows = prepared.stem.weight.mask.flatten(1).any(1)
    a_rows = prepared.a.weight.mask.flatten(1).any(1)
    assert torch.equal(stem_rows, a_rows)
    kept_stream = int(stem_rows.sum())
    assert shrunk.stem.out_channels == shrunk.a.out_channels == shrunk.bn.num_features == kept_stream
    assert shrunk.dw.groups == shrunk.dw.out_channels == shrunk.dw.in_channels
    assert shrunk.grouped.groups == g and shrunk.grouped.out_channels % g == 0
    assert shrunk.head.in_features == shrunk.grouped.out_channels * 16


class MLP(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, h)
        self.fc3 = nn.Linear(h, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.relu(self.fc2(h)) + h  # residual couples fc1 and fc2 outputs
        return self.fc3(h)


@settings(max_examples=10, deadline=None)
@given(d=st.integers(2, 6), h=st.integers(2, 12), goal=st.floats(0.05, 0.95), seed=st.integers(0, 1000))
def test_mlp_parameter_count_is_exact(d, h, goal, seed):
    torch.manual_seed(seed)
    model = MLP(d, h)
    prepared, shrunk = prune_and_shrink(model, goal)
    removed = min(int(goal * h + 0.5), h - 1)
    k = h - removed
    assert n_params(shrunk) == (d * k + k) + (k * k + k) + (k * 3 + 3)
    x = torch.randn(4, d)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), prepared(x), atol=1e-5, rtol=1e-5)


def test_importance_removes_the_weakest_channels():
    model = MLP(3, 4)
    with torch.no_grad():
        model.fc1.weight.fill_(1.0)
        model.fc2.weight.fill_(1.0)
        model.fc1.weight[1] = 0.01  # channel 1 and 3: small in fc1 rows, fc2 rows and columns, fc3 columns
        model.fc1.weight[3] = 0.02
        model.fc2.weight[[1, 3]] = 0.01
        model.fc2.weight[:, [1, 3]] = 0.01
        model.fc3.weight[:, [1, 3]] = 0.01
    prepared, _ = prune_and_shrink(model, 0.5)
    assert prepared.fc1.weight.mask.any(1).tolist() == [True, False, True, False]
    assert prepared.fc3.weight.mask.any(0).tolist() == [True, False, True, False]


class Reshaping(nn.Module):
    """conv -> view: channels read through an op the analysis does not follow."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.conv(x).view(x.shape[0], -1)
        z = self.fc(self.conv2(x).mean((2, 3)))
        return y.sum(1, keepdim=True) + z


def test_unshrinkable_layers_are_reported_not_pruned():
    model = Reshaping()
    prepared, shrunk = prune_and_shrink(model)
    report = channel_report(prepared)["p"]
    text = str(report)
    excluded = {tuple(layers): reasons for _, _, layers, reasons in report.excluded}
    assert any("view" in r for r in excluded[("conv",)])
    assert any("output" in r for r in excluded[("fc",)])
    assert prepared.conv.weight.mask.all()  # excluded: untouched
    assert shrunk.conv.out_channels == 8 and shrunk.conv2.out_channels == 4
    assert "excluded" in text and "conv" in text
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), prepared(x), atol=1e-5, rtol=1e-5)


def test_layer_norm_stream_is_pruned_and_a_norm_over_more_dims_is_excluded_with_reason():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 2))
    prepared, shrunk = prune_and_shrink(model)
    assert shrunk[0].out_features == 4 and shrunk[1].normalized_shape == (4,) and shrunk[2].out_features == 3
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), prepared(x), atol=1e-5, rtol=1e-5)
    # a LayerNorm over the channels and another dim at once is still a statistic the analysis cannot split
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm((2, 4)), nn.Flatten(), nn.Linear(8, 2))
    prepared, shrunk = prune_and_shrink(model)
    report = channel_report(prepared)["p"]
    assert any("LayerNorm" in r for *_, reasons in report.excluded for r in reasons)
    assert shrunk[0].out_features == 4


def test_physical_needs_a_channel_pruner():
    prepared = fxprune.prepare(MLP(2, 4), {"magnitude": {"p": {}}})
    with pytest.raises(fxprune.PruningError, match="pattern: channel"):
        fxprune.convert(prepared, physical=True)


def test_masks_are_monotone_and_plan_survives_deepcopy():
    import copy

    model = MLP(3, 10)
    cfg = {"magnitude": {"p": {"pattern": "channel", "target_sparsity": 0.6, "init_sparsity": 0.2}},
           "start_epoch": 0, "end_epoch": 2, "frequency": 1}
    prepared = fxprune.prepare(model, cfg)
    prepared.pruner.on_epoch_begin(0)
    before = prepared.fc1.weight.mask.clone()
    clone = copy.deepcopy(prepared)
    assert channel_plan_of(clone) is not channel_plan_of(prepared)
    clone.pruner.on_epoch_begin(2)
    after = clone.fc1.weight.mask
    assert not (after & ~before).any()  # nothing pruned comes back
    assert int(after.any(1).sum()) == 4  # 60% of 10 channels removed
    assert prepared.fc1.weight.mask.equal(before)  # the original is untouched


def test_resnet18_end_to_end():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    randomize_bn(model, calibration=torch.randn(8, 3, 64, 64))
    prepared, shrunk = prune_and_shrink(model, 0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), prepared(x), atol=1e-5, rtol=1e-4)
    assert 0.2 < n_params(shrunk) / n_params(model) < 0.3
    assert shrunk.layer1[0].conv1.out_channels == 32 and shrunk.fc.in_features == 256
    assert isinstance(shrunk, torchvision.models.ResNet)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 60), pairs=st.lists(st.tuples(st.integers(0, 59), st.integers(0, 59)), max_size=80))
def test_connected_components_match_networkx(n, pairs):
    import networkx as nx

    from fxprune.structured.dependency import connected_components

    pairs = [(a % n, b % n) for a, b in pairs]
    label, count = connected_components(n, torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).t())
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(pairs)
    want = sorted(nx.connected_components(g), key=min)  # labels are ordered by smallest member
    assert count == len(want)
    for cid, comp in enumerate(want):
        assert sorted(torch.nonzero(label == cid).reshape(-1).tolist()) == sorted(comp)


class CatIntoGrouped(nn.Module):
    """A concatenation feeding a grouped conv: cells (equal removal per conv group) and 'keep one per layer'."""

    def __init__(self, ca: int, cb: int, g: int):
        super().__init__()
        self.a = nn.Conv2d(3, ca, 1)
        self.b = nn.Conv2d(3, cb, 1)
        self.grouped = nn.Conv2d(ca + cb, 2 * g, 3, padding=1, groups=g)
        self.head = nn.Conv2d(2 * g, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        return self.head(torch.relu(self.grouped(y))).mean((2, 3))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.sampled_from([(1, 3, 2), (2, 6, 2), (1, 7, 2), (3, 9, 3), (2, 2, 2), (4, 4, 4)]),
    goal=st.sampled_from([0.5, 0.75, 0.9]),
    weak_a=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_concat_into_grouped_conv_keeps_every_layer(shape, goal, weak_a, seed):
    ca, cb, g = shape
    torch.manual_seed(seed)
    model = CatIntoGrouped(ca, cb, g)
    if weak_a:  # the lowest channels are all of one concatenation input: the plain choice would empty it
        with torch.no_grad():
            model.a.weight.mul_(1e-3)
    prepared, shrunk = prune_and_shrink(model, goal)
    assert shrunk.a.out_channels >= 1 and shrunk.b.out_channels >= 1
    assert shrunk.grouped.groups == g
    assert shrunk.grouped.in_channels == shrunk.a.out_channels + shrunk.b.out_channels
    assert shrunk.grouped.in_channels % g == 0
    # Every conv group lost the same number of input channels.
    cols = prepared.grouped.weight.mask.flatten(2).any(2)  # (out, in/g): kept columns per row
    per_block = cols.reshape(g, -1, cols.shape[1]).any(1).sum(1)
    assert per_block.eq(per_block[0]).all() and int(per_block[0]) == shrunk.grouped.in_channels // g
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), prepared(x), atol=1e-5, rtol=1e-5)


def test_masks_that_empty_a_layer_are_refused_before_shrinking():
    prepared = fxprune.prepare(MLP(3, 6), channel_config(0.5))
    prepared.pruner.on_epoch_begin(0)
    for layer in (prepared.fc1, prepared.fc2):
        layer.weight.set_mask(torch.zeros_like(layer.weight.mask))
    prepared.fc3.weight.set_mask(torch.zeros_like(prepared.fc3.weight.mask))
    with pytest.raises(fxprune.PruningError, match=r"fc\d\.weight.*no channels left"):
        fxprune.convert(prepared, physical=True)
    assert prepared.fc1.weight.param.shape == (6, 3)  # the prepared model is untouched


def test_dependency_graph_as_networkx():
    nx = pytest.importorskip("networkx")
    torch.manual_seed(0)
    model = Mixed(4, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model.eval(), channel_config(0.5))
    cg = channel_plan_of(prepared).channels
    g = cg.to_networkx()
    groups = [n for n in g if n[0] == "group"]
    assert len(groups) == len(cg.groups)
    for grp in cg.groups:
        node = ("group", grp.index)
        assert g.nodes[node]["size"] == grp.size and g.nodes[node]["blockers"] == grp.blockers
        assert {t for _, t in g.edges(node)} == {("tensor", s.tensor) for s in grp.slices}
    # a residual stream couples the stem conv's output rows with the BN and the consumers' columns
    comp = nx.node_connected_component(g, ("tensor", "stem.weight"))
    assert ("tensor", "bn.weight") in comp and ("tensor", "a.weight") in comp
    assert all(g.nodes[("tensor", w)]["is_weight"] for grp in cg.groups for w in grp.weights())


class Unfollowed(nn.Module):
    """A weight read by an op the analysis does not follow, beside a normal pair of layers."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.addmm(torch.zeros(6), x, self.w.t()))))


def test_every_dense_weight_comes_with_a_reason():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(Unfollowed().eval(), channel_config(0.5))
    report = channel_report(prepared)["p"]
    assert set(report.dense_weights) == set(report.dense_reasons)
    assert "read by an op the analysis does not follow: node 't'" in report.dense_reasons["w"]
    assert "w: read by an op" in str(report)
    assert prepared.pruner.prepare_report.traced  # a tensor made in the forward is not a train/eval difference
    assert "fc1.weight" not in report.dense_weights  # the hidden channels of fc1 -> fc2 are prunable


class Upsampled(nn.Module):
    """An FPN-style top-down add: a skip connection plus an interpolated coarser map (an op not followed)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.lateral = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        coarse = torch.relu(self.down(s))
        up = F.interpolate(coarse, scale_factor=2.0)
        return self.head(torch.relu(self.lateral(s) + up))


def test_add_with_an_untracked_tensor_blocks_the_channels():
    """lateral's channels meet F.interpolate(down): pruning them alone would break the add after shrinking."""
    torch.manual_seed(0)
    prepared, shrunk = prune_and_shrink(Upsampled(), 0.5)
    assert shrunk.lateral.out_channels == 8
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), prepared(x), atol=1e-5, rtol=1e-4)
    reasons = [r for _, _, _, rs in channel_report(prepared)["p"].excluded for r in rs]
    assert any("not tracked" in r for r in reasons)
