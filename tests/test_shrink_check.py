"""A shrunk model must run (issue 9, item 8).

ALBERT's attention returns ``LayerNorm(hidden_states + dense(context))`` and
its one layer is shared by every repetition: the head proof holds, but the
module's input is also read by the residual and its output is not the output
projection's. Those channels must be reported, never cut, and
``convert(physical=True)`` checks the shrunk model against the masked one on
the example input, naming the groups that break it.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fxprune
from fxprune.structured import attention as attention_module

transformers = pytest.importorskip("transformers")

CONFIG = {"magnitude": {"p": {"pattern": "channel", "target_sparsity": 0.5, "schedule": "oneshot"}},
          "start_epoch": 0, "end_epoch": 0}


def _albert(classifier: bool = False):
    cfg = transformers.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128, max_position_embeddings=32,
                                    num_labels=3)
    torch.manual_seed(0)
    cls = transformers.AlbertForSequenceClassification if classifier else transformers.AlbertModel
    return cls(cfg).eval(), {"input_ids": torch.randint(0, 100, (2, 7))}


def _prepared(classifier: bool = False):
    model, example = _albert(classifier)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, CONFIG, example_inputs=example)
    prepared.pruner.on_epoch_begin(0)
    return prepared, example


def test_albert_shrinks_its_heads_and_runs():
    prepared, example = _prepared()
    attn = "encoder.albert_layer_groups.0.albert_layers.0.attention"
    report = fxprune.structured.channel_report(prepared)["p"]
    reasons = " ".join(r for *_, rs in report.excluded for r in rs)
    assert "also reads its input outside its query/key/value projections" in reasons
    assert "returns more than its output projection dense" in reasons
    shrunk = fxprune.convert(prepared, physical=True)
    layer_attn = shrunk.get_submodule(attn)
    assert layer_attn.query.weight.shape == (32, 64)  # half the heads gone, the residual stream kept whole
    assert layer_attn.dense.weight.shape == (64, 32)
    with torch.no_grad():
        got = shrunk(**example).last_hidden_state
        want = prepared(**example).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_convert_fails_loudly_when_the_analysis_is_wrong(monkeypatch):
    # Pretend the analysis misses ALBERT's residual (what it did before): the cut hidden channels break the model.
    # A classifier, so that the hidden stream is not the model's output (which would keep it whole anyway).
    monkeypatch.setattr(attention_module, "_reads_and_returns", lambda *a, **k: (True, True))
    prepared, example = _prepared(classifier=True)
    state = {k: v.clone() for k, v in prepared.state_dict().items()}
    with torch.no_grad():
        before = prepared(**example).logits
    with pytest.raises(fxprune.PruningError, match=r"does not give the masked model's outputs.*group \d+ \(.*"
                                                   r"embedding_hidden_mapping_in"):
        fxprune.convert(prepared, physical=True)
    after = prepared.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    with torch.no_grad():
        torch.testing.assert_close(prepared(**example).logits, before, rtol=0, atol=0)
    # an explicit example input is used the same way
    with pytest.raises(fxprune.PruningError, match="does not give the masked model's outputs"):
        fxprune.convert(prepared, physical=True, example_inputs={"input_ids": torch.randint(0, 100, (1, 5))})


def test_without_an_example_the_check_is_skipped_with_a_warning():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    prepared = fxprune.prepare(model, CONFIG)
    prepared.pruner.on_epoch_begin(0)
    with pytest.warns(UserWarning, match="not checked against the masked model"):
        fxprune.convert(prepared, physical=True)
    prepared = fxprune.prepare(model, CONFIG, example_inputs=torch.randn(2, 6))
    prepared.pruner.on_epoch_begin(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shrunk = fxprune.convert(prepared, physical=True)
    assert shrunk[0].weight.shape == (4, 6)
