"""Config loading and errors: every bad config raises ConfigError naming key path and file, model untouched."""
from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import fxprune
from fxprune import ConfigError
from generated import MLPSpec, build, same_snapshot, snapshot

SEED_YAML = """
pruning:
  magnitude:
      prune1:
        # weights: ['layer1.0.conv1.weight',  'layer1.0.conv2.weight']
        # target_sparsity: 0.3
        # start_epoch: 1
  start_epoch: 0
  end_epoch: 4
  frequency: 1
  init_sparsity: 0.05
  target_sparsity: 0.25
"""


def model():
    return build(MLPSpec(widths=(6, 5, 4), kinds=("module", "functional"), seed=0))[0]


def test_seed_config_from_file(tmp_path):
    path = tmp_path / "seed.yaml"
    path.write_text(SEED_YAML)
    cfg = fxprune.load_config(path)
    (p,) = cfg.pruners
    assert (p.name, p.policy, p.weights) == ("prune1", "magnitude", None)
    assert (p.start_epoch, p.end_epoch, p.frequency) == (0, 4, 1)
    assert (p.init_sparsity, p.target_sparsity) == (0.05, 0.25)
    assert cfg.source == str(path)
    # the same config as a dict, with and without the top-level key, and typed
    data = yaml.safe_load(SEED_YAML)
    assert fxprune.load_config(data).pruners == cfg.pruners
    assert fxprune.load_config(data["pruning"]).pruners == cfg.pruners
    assert fxprune.load_config(cfg) is cfg
    assert fxprune.load_config(cfg.to_dict()).pruners == cfg.pruners


def test_per_pruner_overrides_take_precedence():
    cfg = fxprune.load_config({
        "pruning": {
            "magnitude": {"a": {"target_sparsity": 0.3, "start_epoch": 1}, "b": {"weights": "raw.*"}},
            "target_sparsity": 0.6,
            "end_epoch": 3,
        }
    })
    a, b = cfg.pruners
    assert (a.target_sparsity, a.start_epoch, a.end_epoch) == (0.3, 1, 3)
    assert (b.target_sparsity, b.start_epoch, b.weights) == (0.6, 0, ("raw.*",))


def test_typed_config_is_validated():
    with pytest.raises(ConfigError, match=r"pruning\.magnitude\.p\.target_sparsity"):
        fxprune.PruningConfig(pruners=(fxprune.PrunerConfig(name="p", target_sparsity=1.5),))


BAD = [
    ({"magnitud": {"p": {}}}, "pruning.magnitud", "unknown policy 'magnitud' \\(did you mean 'magnitude'"),
    ({"snip": {"p": {}}}, "pruning.snip", "unknown policy 'snip'"),
    ({"magnitude": {"p": {}}, "target_sparsty": 0.5}, "pruning.target_sparsty", "did you mean 'target_sparsity'"),
    ({"magnitude": {"p": {"wieghts": ["raw.0"]}}}, "pruning.magnitude.p.wieghts", "did you mean 'weights'"),
    ({"magnitude": {"p": {"target_sparsity": 1.0}}}, "pruning.magnitude.p.target_sparsity", r"\[0, 1\)"),
    ({"magnitude": {"p": {}}, "init_sparsity": -0.1}, "pruning.init_sparsity", r"\[0, 1\)"),
    ({"magnitude": {"p": {"start_epoch": 5, "end_epoch": 2}}}, "pruning.magnitude.p.start_epoch", "<= end_epoch"),
    ({"magnitude": {"p": {}}, "frequency": 0}, "pruning.frequency", ">= 1"),
    ({"magnitude": {"p": {}}, "end_epoch": "4"}, "pruning.end_epoch", "integer"),
    ({"magnitude": {"p": {}}, "start_epoch": True}, "pruning.start_epoch", "integer"),
    ({"magnitude": {"p": {"target_sparsity": "high"}}}, "pruning.magnitude.p.target_sparsity", "number"),
    ({"magnitude": {"p": {"weights": ["layers.9.weight"]}}}, "pruning.magnitude.p.weights", "no parameter named"),
    ({"magnitude": {"p": {"weights": ["layers.0.wieght"]}}}, "pruning.magnitude.p.weights", "did you mean 'layers.0.weight'"),
    ({"magnitude": {"p": {"weights": ["encoder.*"]}}}, "pruning.magnitude.p.weights", "matches no parameter"),
    ({"magnitude": {"p": {"weights": ["*.bias"]}}}, "pruning.magnitude.p.weights", "name them exactly"),
    ({"magnitude": {"p": {"weights": ["raw.0"]}, "q": {"weights": ["raw.*"]}}}, "pruning.magnitude.q.weights", "two pruners"),
    ({"magnitude": {"p": {}, "q": {}}}, "pruning.magnitude.q.weights", "both have no 'weights'"),
    ({"magnitude": {"p": {"weights": 3}}}, "pruning.magnitude.p.weights", "list"),
    ({"magnitude": {"p": {"schedule": "cubik"}}}, "pruning.magnitude.p.schedule", "did you mean 'cubic'"),
    ({"magnitude": None}, "pruning.magnitude", "pruner names"),
    ({"start_epoch": 0}, "pruning", "no pruner defined"),
    ({"magnitude": {"p": {"init_sparsity": 0.5, "target_sparsity": 0.2}}}, "pruning.magnitude.p.init_sparsity", "<= target"),
]


@pytest.mark.parametrize("section,key_path,message", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_config_names_key_and_file_and_leaves_model_untouched(tmp_path, section, key_path, message):
    m = model()
    before = snapshot(m)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"pruning": section}))
    with pytest.raises(ConfigError, match=message) as info:
        fxprune.prepare(m, str(path))
    assert info.value.key_path == key_path
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: {key_path}:")
    assert same_snapshot(before, snapshot(m))


@settings(max_examples=60, deadline=None)
@given(
    key=st.sampled_from(["start_epoch", "end_epoch", "frequency", "init_sparsity", "target_sparsity"]),
    value=st.one_of(st.text(max_size=3), st.floats(allow_nan=True), st.integers(-5, 5), st.booleans(), st.none(),
                    st.lists(st.integers(), max_size=2)),
    per_pruner=st.booleans(),
)
def test_generated_values_either_load_or_raise_config_error_with_key_path(key, value, per_pruner):
    body = {key: value} if per_pruner else {}
    section = {"magnitude": {"p": body}, **({} if per_pruner else {key: value})}
    m = model()
    before = snapshot(m)
    try:
        prepared = fxprune.prepare(m, section)
    except ConfigError as e:
        expected = f"pruning.magnitude.p.{key}" if per_pruner else f"pruning.{key}"
        # a value may be fine alone and wrong against another key (start > end): both name a key
        assert e.key_path in (expected, "pruning.magnitude.p.start_epoch", "pruning.magnitude.p.init_sparsity")
        assert same_snapshot(before, snapshot(m))
        return
    p = prepared.pruner.pruner_configs[0]
    assert getattr(p, key) == value
    assert not isinstance(value, bool)


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        fxprune.load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("pruning: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        fxprune.load_config(bad)
    assert info.value.source == str(bad)


def test_exact_name_selects_non_default_parameter_and_glob_does_not():
    m = model()
    prepared = fxprune.prepare(m, {"magnitude": {"p": {"weights": ["layers.0.bias", "layers.*"]}}})
    assert sorted(t.name for t in prepared.pruner.targets) == ["layers.0.bias", "layers.0.weight"]


def test_default_selection_excludes_biases_norms_and_broadcast_parameters():
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)
            self.scale = nn.Parameter(torch.ones(4, 1, 1))
            self.token = nn.Parameter(torch.zeros(1, 1, 4))
            self.table = nn.Parameter(torch.randn(3, 4, 4))

        def forward(self, x):
            return self.bn(self.fc(x)) * self.scale[:, 0, 0] + self.token[0, 0] + (self.table.sum(0) @ x.T).T

    prepared = fxprune.prepare(Net(), {"magnitude": {"p": {}}})
    assert sorted(t.name for t in prepared.pruner.targets) == ["fc.weight", "table"]
