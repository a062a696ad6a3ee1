"""The prepared model presents the original ``forward`` signature (issue 9, item 1).

Trainer's ``remove_unused_columns``, Lightning and accelerate decide which
inputs to pass by reading ``inspect.signature(model.forward)``; a prepared
model whose forward reads as ``(*args, **kwargs)`` gets every column removed.
"""
from __future__ import annotations

import copy
import inspect
import io
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune

CONFIG = {"pruning": {"magnitude": {"p": {"target_sparsity": 0.5, "start_epoch": 0, "end_epoch": 0}}}}


# ------------------------------------------------------------------ generated signatures
_KINDS = ("posonly", "plain", "plain_default", "varargs", "kwonly", "kwonly_default", "varkw")


@st.composite
def signatures(draw) -> str:
    """Source text of a parameter list after ``self, x``: any mix Python allows, in its order."""
    extra_pos_only = draw(st.integers(0, 2))
    plain = draw(st.integers(0, 2))
    plain_defaults = draw(st.integers(0, 2))
    varargs = draw(st.booleans())
    kwonly = draw(st.lists(st.booleans(), max_size=3))  # True: with a default
    varkw = draw(st.booleans())
    annotate = draw(st.booleans())
    parts = ["x"] + [f"p{i}" for i in range(extra_pos_only)]
    if extra_pos_only or draw(st.booleans()):
        parts.append("/")
    ann = ": int" if annotate else ""
    parts += [f"a{i}{ann}" for i in range(plain)]
    parts += [f"d{i}{ann} = {i}" for i in range(plain_defaults)]
    if varargs:
        parts.append("*rest")
    elif kwonly:
        parts.append("*")
    parts += [f"k{i}=None" if default else f"k{i}" for i, default in enumerate(kwonly)]
    if varkw:
        parts.append("**options")
    return ", ".join(parts)


def _model_class(params: str, route: str) -> type[nn.Module]:
    """A model with the given forward parameters; ``route`` picks how prepare will handle its root."""
    body = "    return self.head(torch.relu(self.body(x)))\n"
    if route == "python":  # data-dependent control flow: the root cannot be traced
        body = "    h = self.body(x)\n    if h.sum() > 0:\n        h = torch.relu(h)\n    return self.head(h)\n"
    namespace = {"torch": torch}
    exec(f"def forward(self, {params}):\n{body}", namespace)  # noqa: S102 - generated test models

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(6, 8)
            self.head = nn.Linear(8, 3)

    Net.forward = namespace["forward"]
    return Net


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=signatures(), route=st.sampled_from(["traced", "python", "module"]))
def test_prepared_forward_has_the_original_signature(params, route):
    torch.manual_seed(0)
    model = _model_class(params, route)()
    x = torch.randn(4, 6)
    kwargs = {}
    needed = [p for p in inspect.signature(model.forward).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)][1:]
    args = [0 for p in needed if p.kind != p.KEYWORD_ONLY]
    kwargs = {p.name: 0 for p in needed if p.kind == p.KEYWORD_ONLY}
    options = {}
    if route == "python":
        options["example_inputs"] = ((x, *args), kwargs)
    if route == "module":
        options["leaf_modules"] = [nn.Linear]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, CONFIG, **options)
    want = inspect.signature(model.forward)
    assert inspect.signature(prepared.forward) == want
    assert inspect.signature(copy.deepcopy(prepared).forward) == want
    # the signature is only presented: calls still run the model
    assert torch.allclose(prepared(x, *args, **kwargs), model(x, *args, **kwargs))
    prepared.pruner.prune_now()
    assert inspect.signature(fxprune.convert(prepared).forward) == want


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None, *, scale: float = 1.0):
        return self.fc(x) * scale


class ScaledPython(Scaled):
    def forward(self, x, *rest, scale: float = 1.0, **options):
        return self.fc(x) * scale if x.sum() > 0 else self.fc(x)


@pytest.mark.parametrize("cls", [Scaled, ScaledPython])
def test_signature_survives_recompile_and_pickling(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(cls(), CONFIG)
    want = inspect.signature(cls().forward)
    prepared.recompile()
    assert inspect.signature(prepared.forward) == want
    buffer = io.BytesIO()
    torch.save(prepared, buffer)
    buffer.seek(0)
    assert inspect.signature(torch.load(buffer, weights_only=False).forward) == want


# ------------------------------------------------------------------ the Trainer with its defaults
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class _Rows(torch.utils.data.Dataset):
    """Token rows with labels and a column the model does not take (the Trainer must drop it)."""

    def __init__(self, n: int, length: int, vocab: int, label):
        self.n, self.length, self.vocab, self.label = n, length, vocab, label

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, self.vocab, (self.length,), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones(self.length, dtype=torch.long),
                "labels": self.label(i, ids), "source_text": f"row {i}"}


def _train_with_defaults(model, rows, tmp_path, example):
    from fxprune.integrations.huggingface import FxpruneTrainerCallback

    config = {"pruning": {"magnitude": {"p": {"weights": ["re:.*(query|key|value|proj|dense)\\.weight"]}},
                          "start_epoch": 0, "end_epoch": 1, "init_sparsity": 0.25, "target_sparsity": 0.5}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, config, example_inputs=example)
    assert inspect.signature(prepared.forward) == inspect.signature(model.forward)
    args = transformers.TrainingArguments(  # Trainer's defaults otherwise: remove_unused_columns=True
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    assert args.remove_unused_columns
    trainer = transformers.Trainer(model=prepared, args=args, train_dataset=rows,
                                   callbacks=[FxpruneTrainerCallback()])
    before = {t.name: t.masked.param.detach().clone() for t in prepared.pruner.targets}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = trainer.train()
    assert trainer.state.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    assert prepared.pruner.current_goals() == {"p": 0.5}
    for t in prepared.pruner.targets:
        m = t.masked
        assert abs(1 - m.mask.float().mean().item() - 0.5) < 0.01, t.name
        assert bool((m.param[~m.mask] == 0).all()), t.name
        assert not torch.equal(m.param.detach(), before[t.name]), f"{t.name} was not trained"
    return prepared


def test_hf_trainer_defaults_bert_sequence_classification(tmp_path):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    rows = _Rows(8, 8, 64, lambda i, ids: i % 2)
    _train_with_defaults(model, rows, tmp_path, {"input_ids": torch.randint(0, 64, (2, 8))})


def test_hf_trainer_defaults_causal_lm(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    rows = _Rows(8, 8, 64, lambda i, ids: ids.clone())
    _train_with_defaults(model, rows, tmp_path, {"input_ids": torch.randint(0, 64, (2, 8))})


def test_a_specialized_argument_keeps_its_name():
    """fx names the placeholder of a concrete argument ``flag_1``; the signature the prepared model shows says
    ``flag``, so a keyword call must be accepted."""

    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x, flag=True):
            return self.fc(x) if flag else -self.fc(x)

    model = Flagged()
    prepared = fxprune.prepare(model, CONFIG, concrete_args={"flag": False})
    assert prepared.pruner.prepare_report.traced
    x = torch.randn(2, 6)
    assert inspect.signature(prepared.forward) == inspect.signature(model.forward)
    assert torch.allclose(prepared(x, flag=False), model(x, flag=False))
