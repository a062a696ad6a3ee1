"""Channel pruning (``pattern: channel``) at 50% on real architectures: what is prunable, what shrinks, is it exact.

Why: ``structured_resnet18.py`` measures one model in depth; this sweep asks
the breadth question of the structured-pruning issue -- on the torchvision
CNNs and transformers people actually prune (residual adds, squeeze-excite,
depthwise convs, LayerNorm over channels, attention heads), how much of each
model can channel pruning reach, does ``convert(physical=True)`` compute
exactly what the masked model computes, and what does the shrinking buy.

Per model (random init, eval mode; BatchNorm layers get running statistics
measured on random images and random affine parameters, see
:func:`expose_wrong_shrinks`, so that a channel shrunk wrongly -- e.g. a
pruned conv whose BN still shifts it -- changes the output and shows up in
the diff):

1. ``prepare`` with one magnitude pruner ``{pattern: channel,
   target_sparsity: 0.5, schedule: oneshot}`` (BERT: only
   ``re:encoder\\..*\\.weight``, with ``example_inputs``), then
   ``pruner.on_epoch_begin(0)`` and ``convert(physical=True, inplace=True)``.
   That wall time is the "pass seconds" column (prepare includes its deepcopy
   of the model). The masked model's output is taken between the mask update
   and the convert (outside the timer), so nothing is run twice.
2. From ``channel_report``: prunable and excluded groups, the excluded
   groups' reasons (layer names stripped, "xN" = in N groups, most frequent
   first) and how many of the pruner's weights no prunable group reaches.
3. Attention heads before -> after: the proven attention modules of the
   channel plan (separate or fused projections) and every
   ``nn.MultiheadAttention``, counted from their projection shapes and head
   counts. ``-`` when the model has no provable attention.
4. Parameters, MACs (:func:`sweep_measure.count_macs`: torch's FLOP
   counter / 2) and CPU latency at batch 1, shrunk / dense (models
   interleaved in every repeat, median); max |shrunk(x) - masked(x)| on a
   fresh input, and that over max |masked(x)| ("rel").
5. Torch-Pruning 1.6.1 on a fresh copy of the same model at the same goal
   (:func:`sweep_measure.torch_pruning_run`): its parameter and MACs ratio,
   or why it does not count (error, time-out, its pruned model fails or
   changes the output shape).
6. The "target" column (:attr:`Result.target`): fxprune's parameter ratio
   <= Torch-Pruning's + 0.03 where Torch-Pruning's model counts, fxprune
   prunes every model Torch-Pruning prunes, shrunk == masked (rel < 1e-4).

Every finished row is appended to a JSON-lines file (default
``benchmarks/.cache/structured_sweep_<size>px.jsonl``): a stopped run
resumes where it was, ``--fresh`` starts over, ``--report`` prints the table
of what is there. One model at a time is built, measured and freed (the
largest hold ~2.5 GB of weights). Run::

    python benchmarks/structured_sweep.py --hf-zoo --image-size 64 --repeats 3   # the 80 torchvision classifiers + HF zoo
    python benchmarks/structured_sweep.py --only resnet18 --only bert --no-torch-pruning
    python benchmarks/structured_sweep.py --image-size 64 --report

Each model runs in its own ``try``: a failure is a table row with the
exception, and the traceback is printed after the table.
``tests/test_structured_models.py`` runs :func:`run_case` on the cheap models.
"""
from __future__ import annotations

import argparse
import functools
import gc
import math
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import fxprune
from fxprune.structured import channel_plan_of, channel_report
from fxprune.structured.head_layout import heads_left

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_measure import (count_macs, latency_pair, n_params, output_tensor, read_rows,  # noqa: E402
                           torch_pruning_run, write_row)

__all__ = ["EXTRA_CASES", "HF_ZOO", "Case", "Result", "bert_case", "expose_wrong_shrinks", "make_case",
           "markdown_table", "main", "n_params", "run_case", "summarize_reasons", "summary",
           "torchvision_classifiers", "vision_case"]

GOAL = 0.5
TARGET_SLACK = 0.03  # the target: fxprune's params ratio <= Torch-Pruning's + this
EXACT = 1e-4  # shrunk == masked: max |difference| / max |masked output| below this


@dataclass(frozen=True)
class Case:
    """One model of the sweep: constructor, example input, which weights the channel pruner gets."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]  # positional args of one forward (a fresh draw per call)
    weights: tuple[str, ...] | None = None  # the pruner's ``weights``; None = every weight (the default)
    pass_example_inputs: bool = False  # HF models: prepare needs them for the per-submodule capture
    note: str = ""  # shown after the model name (input size, config)


@dataclass
class Result:
    """One table row, plus the shrunk model for callers (tests) that check its structure."""

    name: str
    prunable: int = 0
    excluded: int = 0
    reasons: list[tuple[str, int]] = field(default_factory=list)  # (short reason, how many groups)
    dense_weights: int = 0  # weights of the pruner that no prunable group covers
    heads_before: int = 0
    heads_after: int = 0
    params_dense: int = 0
    params_shrunk: int = 0
    latency_dense: float = math.nan  # seconds, median, batch 1
    latency_shrunk: float = math.nan
    max_abs_diff: float = math.nan
    rel_diff: float = math.nan  # max abs diff / max |masked output|
    seconds: float = 0.0
    error: str = ""
    shrunk: nn.Module | None = None
    macs_dense: int = 0  # multiply-accumulates of one forward on the example input (torch's FLOP counter / 2)
    macs_shrunk: int = 0
    tp_ratio: float = math.nan  # Torch-Pruning's params ratio on the same model, same goal
    tp_macs_ratio: float = math.nan
    tp_note: str = ""  # "" = it pruned and its model runs; else why not (error, time-out, its model fails)
    tp_seconds: float = 0.0

    @property
    def params_ratio(self) -> float:
        return self.params_shrunk / self.params_dense if self.params_dense else math.nan

    @property
    def target(self) -> str:
        """``ok`` / ``ok (TP: why it does not count)`` / ``MISS: why``, by the issue's targets.

        A row misses when shrunk != masked, when fxprune fails where
        Torch-Pruning's pruned model runs, or when fxprune leaves more than
        Torch-Pruning's parameter ratio + 0.03 on a model both prune.
        """
        tp_counts = not math.isnan(self.tp_ratio) and not self.tp_note
        if self.error:
            return "MISS: fxprune fails" if tp_counts else f"MISS: fxprune fails (TP: {self.tp_note or 'n/a'})"
        if not self.rel_diff <= EXACT:
            return f"MISS: shrunk != masked (rel {self.rel_diff:.0e})"
        if not tp_counts:
            return f"ok (TP: {self.tp_note or 'not run'})"
        if self.params_ratio > self.tp_ratio + TARGET_SLACK:
            return f"MISS: {self.params_ratio:.3f} > TP {self.tp_ratio:.3f} + {TARGET_SLACK}"
        return "ok"


# ----------------------------------------------------------------------------- models
def expose_wrong_shrinks(model: nn.Module, calibration: torch.Tensor | None = None, seed: int = 0) -> None:
    """Make a wrong shrink visible in the output of a randomly initialised model.

    BatchNorm: running statistics measured on ``calibration`` (a train-mode
    forward), then random affine weights and biases, so that a pruned channel
    that BN would shift is not zero. Random *statistics* would not do: with
    running means and biases of N(0, 1) against the activations' own scale,
    the signal dies out in a deep network (measured here: MobileNetV3 and
    EfficientNet outputs differed by ~1e-7 relative between two random
    inputs), and an output that ignores its early layers cannot catch a
    wrong cut there.

    ConvNeXt's layer scales become O(1) (at their 1e-6 init a block's output
    vanishes in the residual sum, and so would a wrongly shrunk block's);
    zero-initialised weights (ViT's classifier) become small random ones
    (otherwise the output is a constant and any model matches).
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    with torch.no_grad():
        if bns and calibration is not None:
            momenta = [m.momentum for m in bns]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average: the statistics of this one batch
            was_training = model.training
            model.train()
            model(calibration)
            model.train(was_training)
            for m, mom in zip(bns, momenta):
                m.momentum = mom
        for m in bns:
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            if calibration is None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if name.rpartition(".")[2] == "layer_scale":  # ConvNeXt's 1e-6 init would hide a wrong hidden channel
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.dim() >= 2 and not p.any():  # zero-initialised weights (ViT's head): the output would be constant
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


#: Smallest input side a torchvision classifier accepts (its stem's strides and pools), where above 32.
_MIN_SIDE = {"inception_v3": 299}  # its train-mode aux head (run by the BN calibration) needs 17x17 at Mixed_6e


def vision_input_side(name: str, image_size: int) -> int:
    """The side ``name`` runs at for a requested ``image_size``.

    ViTs are built for that size (``image_size=`` of ``VisionTransformer``,
    rounded down to a multiple of the patch; the position embedding follows
    the patch count), maxvit_t only runs at 224 (its window partitions),
    inception_v3 needs 299 (its aux head, run by the BN calibration).
    """
    if name == "maxvit_t":
        return 224
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        return max(patch, image_size // patch * patch)
    return max(image_size, _MIN_SIDE.get(name, 32))


def vision_case(name: str, image_size: int = 224) -> Case:
    """A torchvision classifier, ``weights=None``, at :func:`vision_input_side` of ``image_size``."""
    side = vision_input_side(name, image_size)

    def build() -> nn.Module:
        import torchvision

        kwargs = {"image_size": side} if name.startswith("vit_") else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        expose_wrong_shrinks(model, torch.randn(8, 3, side, side))
        return model.eval()

    # The example goes to prepare as well: where fx cannot trace the root (inception_v3 and googlenet branch
    # on self.training), the channel analysis then records that run whole (README, structured pruning).
    return Case(name, build, lambda: (torch.randn(1, 3, side, side),), pass_example_inputs=True, note=f"{side}px")


@functools.lru_cache(maxsize=1)
def torchvision_classifiers() -> tuple[str, ...]:
    """Every classifier of ``torchvision.models``, smallest first (by its weights' recorded parameter count).

    Smallest first so that a run that is stopped has covered the most models,
    and the big ones (vit_h_14 and regnet_y_128gf, ~630M parameters) come last.
    """
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return tuple(sorted(names, key=lambda n: torchvision.models.get_model_weights(n).DEFAULT.meta["num_params"]))


def bert_case(hidden: int = 768, layers: int = 12, heads: int = 12, intermediate: int = 3072, vocab: int = 30522,
              seq: int = 128, name: str = "bert") -> Case:
    """Hugging Face ``BertModel`` (random init; defaults are bert-base), encoder weights pruned."""

    def build() -> nn.Module:
        import transformers

        cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                      intermediate_size=intermediate, vocab_size=vocab)
        return transformers.BertModel(cfg).eval()

    return Case(name, build, lambda: (torch.randint(0, vocab, (1, seq)),), weights=(r"re:encoder\..*\.weight",),
                pass_example_inputs=True, note=f"h{hidden} L{layers} H{heads} seq{seq}")


def llama_case(hidden: int = 512, layers: int = 8, heads: int = 8, kv_heads: int = 4, intermediate: int = 1376,
               vocab: int = 32000, seq: int = 128, name: str = "llama") -> Case:
    """Hugging Face ``LlamaModel`` with grouped-query attention (random init), decoder-layer weights pruned.

    Its attention needs ``position_embeddings``, so it is proven with the call the example run made; a
    channel of its attention is one key/value head with the query heads that share it.
    """

    def build() -> nn.Module:
        import transformers

        cfg = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                       num_key_value_heads=kv_heads, intermediate_size=intermediate,
                                       vocab_size=vocab)
        return transformers.LlamaModel(cfg).eval()

    return Case(name, build, lambda: (torch.randint(0, vocab, (1, seq)),), weights=(r"re:layers\..*\.weight",),
                pass_example_inputs=True, note=f"h{hidden} L{layers} H{heads} KV{kv_heads} seq{seq}")


def vit_small_case() -> Case:
    """torchvision ``VisionTransformer`` at a small size (4 layers, 6 heads of 64, 64x64 images)."""

    def build() -> nn.Module:
        import torchvision

        return torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=4, num_heads=6,
                                                    hidden_dim=384, mlp_dim=1536).eval()

    return Case("vit_small_tv", build, lambda: (torch.randn(1, 3, 64, 64),), pass_example_inputs=True,
                note="64px L4 H6 d384")


class _TorchEncoderClassifier(nn.Module):
    """A text classifier built on ``nn.TransformerEncoder`` (the torch.nn container, nested tensors allowed)."""

    def __init__(self, vocab: int = 1000, hidden: int = 256, layers: int = 4, heads: int = 8, ff: int = 1024):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(hidden))
        self.head = nn.Linear(hidden, 1000)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(dim=1))


def torch_encoder_case() -> Case:
    """:class:`_TorchEncoderClassifier`: 4 ``nn.TransformerEncoderLayer`` of d256, 8 heads, in the container."""
    return Case("torch_encoder", lambda: _TorchEncoderClassifier().eval(),
                lambda: (torch.randint(0, 1000, (1, 32)),), pass_example_inputs=True,
                note="nn.TransformerEncoder L4 H8 d256")


#: The Hugging Face tiny-config zoo: (class name, config class, config kwargs, input kind). Random init, 2 layers.
_TEXT = dict(vocab_size=1000)
HF_ZOO: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "hf_bert": ("BertModel", "BertConfig", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=512, **_TEXT), "ids"),
    "hf_roberta": ("RobertaModel", "RobertaConfig", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=512, **_TEXT), "ids"),
    "hf_vit": ("ViTModel", "ViTConfig", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=512, image_size=32, patch_size=8), "image32"),
    "hf_swin": ("SwinModel", "SwinConfig", dict(image_size=32, patch_size=4, embed_dim=32, depths=[2, 2],
                                                num_heads=[2, 4], window_size=4), "image32"),
    "hf_clip_vision": ("CLIPVisionModel", "CLIPVisionConfig", dict(hidden_size=128, num_hidden_layers=2,
                                                                  num_attention_heads=4, intermediate_size=512,
                                                                  image_size=32, patch_size=8), "image32"),
    "hf_gpt2": ("GPT2Model", "GPT2Config", dict(n_embd=128, n_layer=2, n_head=4, n_positions=64, **_TEXT), "ids"),
    "hf_llama": ("LlamaModel", "LlamaConfig", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, intermediate_size=344, **_TEXT), "ids"),
    "hf_qwen2": ("Qwen2Model", "Qwen2Config", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, intermediate_size=344, **_TEXT), "ids"),
    "hf_mistral": ("MistralModel", "MistralConfig", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2, intermediate_size=344, **_TEXT), "ids"),
    "hf_phi3": ("Phi3Model", "Phi3Config", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=344, pad_token_id=0,
                                                **_TEXT), "ids"),
    "hf_gemma2": ("Gemma2Model", "Gemma2Config", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, head_dim=32, intermediate_size=344,
                                                      **_TEXT), "ids"),
    "hf_falcon": ("FalconModel", "FalconConfig", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                      new_decoder_architecture=True, num_kv_heads=2, alibi=False,
                                                      **_TEXT), "ids"),
    "hf_t5_encoder": ("T5EncoderModel", "T5Config", dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4,
                                                         **_TEXT), "ids"),
}


def hf_case(name: str) -> Case:
    """One model of :data:`HF_ZOO`, every weight given to the channel pruner (outputs stay their size)."""
    cls_name, cfg_name, kwargs, kind = HF_ZOO[name]

    def build() -> nn.Module:
        import transformers

        return getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**kwargs)).eval()

    def inputs() -> tuple:
        return (torch.randn(1, 3, 32, 32),) if kind == "image32" else (torch.randint(0, 1000, (1, 16)),)

    return Case(name, build, inputs, pass_example_inputs=True, note=cls_name)


#: Cases besides the torchvision classifiers (``--only`` names them; ``--hf-zoo`` runs the HF zoo).
EXTRA_CASES: tuple[str, ...] = ("vit_small_tv", "torch_encoder", "bert", "llama", *HF_ZOO)


def make_case(name: str, image_size: int = 224) -> Case:
    """The sweep's case for a torchvision classifier or a name of :data:`EXTRA_CASES` (BERT at bert-base size)."""
    if name == "bert":
        return bert_case()
    if name == "llama":
        return llama_case()
    if name == "vit_small_tv":
        return vit_small_case()
    if name == "torch_encoder":
        return torch_encoder_case()
    if name in HF_ZOO:
        return hf_case(name)
    if name in torchvision_classifiers():
        return vision_case(name, image_size)
    raise ValueError(f"unknown model {name!r}: a torchvision classifier or one of {', '.join(EXTRA_CASES)}")


# ----------------------------------------------------------------------------- measurements
_REASON_RULES: tuple[tuple[str, str], ...] = (
    # (regex on the full reason, short label with its groups); the first match wins, the rest fall to _normalize
    (r"^model input", "model input"),
    (r"come from outside the analysed graph|^input of module", "input from outside / unfollowed op"),
    (r"reaches the output of the traced graph", "model output"),
    (r"nn\.MultiheadAttention", "nn.MultiheadAttention"),
    (r"normalizes over these channels", "LayerNorm over channels"),
    (r"consumed by (?:node '[^']*' )?\(call_\w+ ([^)]*)\)", r"op not followed: \1"),
    (r"weights not selected by pruner", "weights outside the pruner"),
    (r"a single channel", "single channel"),
    (r"depthwise convolution with a channel multiplier", "depthwise conv with multiplier"),
    (r"reads the number of channels", "channel count read by code"),
    (r"pruned by several pruners", "several pruners"),
)


def _normalize(reason: str) -> str:
    """Strip layer and node names so that the same cause in many layers counts once."""
    s = re.sub(r"node '([^']*)' \((call_\w+) ([^)]*)\)", r"\2 \3", reason)
    s = re.sub(r"'[^']*'", "'…'", s)
    s = re.sub(r"\b[\w]+(\.[\w]+)+\b", "…", s)  # dotted module paths
    s = re.sub(r"\s+", " ", s).strip()
    return s if len(s) <= 60 else s[:59] + "…"


def summarize_reasons(excluded: list[tuple[int, int, list[str], list[str]]]) -> list[tuple[str, int]]:
    """Short reason -> number of excluded groups it applies to, most frequent first."""
    counts: Counter[str] = Counter()
    for _, _, _, reasons in excluded:
        shorts: dict[str, None] = {}  # ordered, so ties keep the reasons' order
        for r in reasons:
            for pat, label in _REASON_RULES:
                hit = re.search(pat, r)
                if hit:
                    shorts[hit.expand(label)] = None
                    break
            else:
                shorts[_normalize(r)] = None
        counts.update(shorts.keys())
    return counts.most_common()


def run_case(case: Case, repeats: int = 5, keep_model: bool = False, torch_pruning: bool = False,
             tp_timeout: int = 300) -> Result:
    """Prune one model at 50% channels, shrink it, and measure; exceptions propagate (``main`` catches them).

    ``repeats=0`` leaves the latency columns empty (NaN). The dense and shrunk
    models are freed before Torch-Pruning builds its own copy (the largest
    torchvision models hold ~2.5 GB of weights each).
    """
    res = Result(case.name)
    torch.manual_seed(0)
    dense = case.build()
    example = case.inputs()
    body: dict[str, Any] = {"pattern": "channel", "target_sparsity": GOAL, "schedule": "oneshot"}
    if case.weights is not None:
        body["weights"] = list(case.weights)
    cfg = {"magnitude": {"p": body}, "start_epoch": 0, "end_epoch": 0}
    kw = {"example_inputs": example} if case.pass_example_inputs else {}
    x = case.inputs()  # a fresh input for the comparison, not the one prepare has seen

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        prepared = fxprune.prepare(dense, cfg, **kw)
        prepared.pruner.on_epoch_begin(0)
        t_prune = time.perf_counter() - t0
        prepared.eval()
        with torch.no_grad():
            masked_out = output_tensor(prepared(*x)).clone()
        plan = channel_plan_of(prepared)
        report = channel_report(prepared)["p"]
        t0 = time.perf_counter()
        shrunk = fxprune.convert(prepared, inplace=True, physical=True)
        res.seconds = t_prune + time.perf_counter() - t0
    del prepared
    shrunk.eval()

    res.prunable, res.excluded = len(report.prunable), len(report.excluded)
    res.reasons = summarize_reasons(report.excluded)
    res.dense_weights = len(report.dense_weights)
    for name, spec in plan.channels.attention.items():
        res.heads_before += spec.heads
        res.heads_after += heads_left(shrunk.get_submodule(name) if name else shrunk, spec)[0]
    for name, kind in plan.channels.layer_attrs.items():  # nn.MultiheadAttention (maybe replaced at convert)
        if kind == "multihead":
            res.heads_before += dense.get_submodule(name).num_heads
            res.heads_after += shrunk.get_submodule(name).num_heads
    res.params_dense, res.params_shrunk = n_params(dense), n_params(shrunk)
    with torch.no_grad():
        got = output_tensor(shrunk(*x))
    if got.shape != masked_out.shape:
        raise AssertionError(f"{case.name}: shrunk output shape {tuple(got.shape)} != masked {tuple(masked_out.shape)}")
    res.max_abs_diff = (got - masked_out).abs().max().item()
    res.rel_diff = res.max_abs_diff / max(masked_out.abs().max().item(), 1e-12)
    res.macs_dense, res.macs_shrunk = count_macs(dense, x), count_macs(shrunk, x)
    if repeats > 0:
        res.latency_dense, res.latency_shrunk = latency_pair(dense, shrunk, x, repeats)
    if keep_model:
        res.shrunk = shrunk
    del dense, shrunk, plan, report
    gc.collect()
    if torch_pruning:
        tp = torch_pruning_run(case.build, x, res.macs_dense, GOAL, timeout=tp_timeout)
        res.tp_ratio, res.tp_macs_ratio, res.tp_note, res.tp_seconds = tp.params_ratio, tp.macs_ratio, tp.note, tp.seconds
    return res


# ----------------------------------------------------------------------------- table
def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}G"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and not (math.isnan(a) or math.isnan(b)) else "-"


def markdown_table(results: list[Result], notes: dict[str, str] | None = None, top: int = 4) -> str:
    """The sweep's table; ``notes`` (model -> input size / config) go after the name, ``top`` reasons per row."""
    notes = notes or {}
    head = ("| model | target | params (shrunk/dense) | MACs | latency b=1 | Torch-Pruning params (MACs) "
            "| shrunk vs masked (rel) | heads | prunable / excluded groups (main reasons) | pass s |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        label = f"{r.name} ({notes[r.name]})" if notes.get(r.name) else r.name
        if r.error:
            lines.append(f"| {label} | {r.target} | FAIL | | | {_tp_cell(r)} | | | {r.error} | {r.seconds:.1f} |")
            continue
        why = "; ".join(f"{s} ×{n}" for s, n in r.reasons[:top])
        if len(r.reasons) > top:
            why += f"; +{len(r.reasons) - top} more"
        groups = f"{r.prunable} / {r.excluded}" + (f" ({why})" if why else "")
        if r.dense_weights:
            groups += f"; {r.dense_weights} weights left dense"
        heads = f"{r.heads_before}→{r.heads_after}" if r.heads_before else "-"
        params = f"{_m(r.params_shrunk)} / {_m(r.params_dense)} = {r.params_ratio:.3f}"
        lat = "-" if math.isnan(r.latency_dense) else (
            f"{r.latency_shrunk * 1e3:.1f} / {r.latency_dense * 1e3:.1f} ms = {_ratio(r.latency_shrunk, r.latency_dense)}")
        lines.append(f"| {label} | {r.target} | {params} | {_ratio(r.macs_shrunk, r.macs_dense)} | {lat} | "
                     f"{_tp_cell(r)} | {r.max_abs_diff:.1e} ({r.rel_diff:.0e}) | {heads} | {groups} | "
                     f"{r.seconds:.1f} |")
    return "\n".join(lines)


def _tp_cell(r: Result) -> str:
    if math.isnan(r.tp_ratio):
        return r.tp_note or "-"
    macs = "" if math.isnan(r.tp_macs_ratio) else f" ({r.tp_macs_ratio:.2f})"
    return f"{r.tp_ratio:.3f}{macs}" + (f", {r.tp_note}" if r.tp_note else "")


def summary(results: list[Result]) -> str:
    """One line per outcome: how many rows met the targets, and which missed (the README quotes it)."""
    met = [r for r in results if r.target.startswith("ok")]
    missed = [r for r in results if not r.target.startswith("ok")]
    lines = [f"{len(results)} rows: {len(met)} meet the targets "
             f"({sum(r.target == 'ok' for r in results)} against a Torch-Pruning model that runs), "
             f"{len(missed)} miss"]
    lines += [f"  MISS {r.name}: {r.target}" for r in missed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="run only this model (repeatable): a torchvision classifier, "
                         f"or one of {', '.join(EXTRA_CASES)}")
    ap.add_argument("--hf-zoo", action="store_true", help="also run the Hugging Face tiny-config zoo")
    ap.add_argument("--no-torchvision", action="store_true", help="skip the 80 torchvision classifiers")
    ap.add_argument("--image-size", type=int, default=224,
                    help="CNN input side (ViTs take the nearest multiple of their patch; maxvit_t stays 224); "
                         "parameter ratios do not depend on it, MACs and latency do")
    ap.add_argument("--repeats", type=int, default=5, help="latency runs per model (median); 0 skips latency")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a shared machine)")
    ap.add_argument("--no-torch-pruning", action="store_true", help="skip the Torch-Pruning baseline")
    ap.add_argument("--tp-timeout", type=int, default=300, help="seconds Torch-Pruning gets per model")
    ap.add_argument("--rows", type=Path, default=None,
                    help="JSON-lines file of finished rows (a rerun skips them); default benchmarks/.cache/"
                         "structured_sweep_<image-size>px.jsonl")
    ap.add_argument("--fresh", action="store_true", help="discard the rows file first")
    ap.add_argument("--report", action="store_true", help="run nothing: print the table of the rows file's models")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.only:
        names = list(dict.fromkeys(args.only))
        unknown = [n for n in names if n not in EXTRA_CASES and n not in torchvision_classifiers()]
        if unknown:
            ap.error(f"unknown model(s) {', '.join(unknown)}: a torchvision classifier or one of "
                     f"{', '.join(EXTRA_CASES)}")
    else:
        names = ([] if args.no_torchvision else list(torchvision_classifiers())) + (list(HF_ZOO) if args.hf_zoo else [])
    rows_path = args.rows or Path(__file__).resolve().parent / ".cache" / f"structured_sweep_{args.image_size}px.jsonl"
    if args.fresh and rows_path.exists():
        rows_path.unlink()
    done = {r.name: r for r in read_rows(rows_path, Result)}
    if args.report:
        names = [n for n in names if n in done]
    print(f"{len(names)} models; {sum(n in done for n in names)} already in {rows_path}", flush=True)
    results, notes, failures = [], {}, []
    t_all = time.perf_counter()
    for name in names:
        case = make_case(name, args.image_size)
        notes[name] = case.note
        if name in done:
            results.append(done[name])
            continue
        t0 = time.perf_counter()
        try:
            res = run_case(case, repeats=args.repeats, torch_pruning=not args.no_torch_pruning,
                           tp_timeout=args.tp_timeout)
        except Exception as e:  # noqa: BLE001 -- one failure is a row, not a crash
            first = str(e).splitlines()[0][:120].replace("|", "\\|") if str(e) else ""
            res = Result(name, error=f"{type(e).__name__}: {first}", seconds=time.perf_counter() - t0)
            failures.append((name, traceback.format_exc()))
            gc.collect()
            if not args.no_torch_pruning:  # a model fxprune cannot prune still gets its baseline cell
                try:
                    tp = torch_pruning_run(case.build, case.inputs(), 0, GOAL, timeout=args.tp_timeout)
                    res.tp_ratio, res.tp_note, res.tp_seconds = tp.params_ratio, tp.note, tp.seconds
                except Exception as e2:  # noqa: BLE001
                    res.tp_note = type(e2).__name__
        write_row(rows_path, res)
        results.append(res)
        print(f"  {name}: {res.target}; params {res.params_ratio:.3f} vs TP {res.tp_ratio:.3f} {res.tp_note}; "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        gc.collect()

    print(f"\nchannel pruning at {GOAL:.0%}, CPU threads={args.threads}, latency median of {args.repeats} "
          f"interleaved runs; this run's wall time {time.perf_counter() - t_all:.0f} s "
          f"(rows from earlier runs: {sum(n in done for n in names)})\n")
    print(markdown_table(results, notes))
    print()
    print(summary(results))
    for name, tb in failures:
        print(f"\n--- {name} failed:\n{tb}")


if __name__ == "__main__":
    main()
