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
4. Parameters shrunk / dense; CPU latency at batch 1 shrunk / dense (models
   interleaved in every repeat, median); max |shrunk(x) - masked(x)| on a
   fresh input, and that over max |masked(x)| ("rel").

Run::

    python benchmarks/structured_sweep.py                       # all models, 224x224 images, bert-base
    python benchmarks/structured_sweep.py --only resnet18 --only bert
    python benchmarks/structured_sweep.py --image-size 64 --repeats 3   # CNNs only go small; vit_b_16 stays 224
    python benchmarks/structured_sweep.py --hf-zoo --only vit_small_tv --torch-pruning --repeats 3

Each model runs in its own ``try``: a failure is a table row with the
exception, and the traceback is printed after the table.
``tests/test_structured_models.py`` runs :func:`run_case` on the cheap models.
"""
from __future__ import annotations

import argparse
import math
import re
import signal
import statistics
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

import fxprune
from fxprune.structured import channel_plan_of, channel_report
from fxprune.structured.head_layout import heads_left

__all__ = ["CASES", "Case", "Result", "bert_case", "expose_wrong_shrinks", "make_case", "markdown_table", "main",
           "n_params", "run_case", "summarize_reasons", "vision_case"]

GOAL = 0.5


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
    tp_ratio: float = math.nan  # Torch-Pruning's params ratio on the same model (--torch-pruning)
    tp_note: str = ""

    @property
    def params_ratio(self) -> float:
        return self.params_shrunk / self.params_dense if self.params_dense else math.nan


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


def vision_case(name: str, image_size: int = 224) -> Case:
    """A torchvision classifier, ``weights=None``; ``vit_b_16`` only accepts 224x224."""
    if name == "vit_b_16":
        image_size = 224

    def build() -> nn.Module:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        expose_wrong_shrinks(model, torch.randn(8, 3, image_size, image_size))
        return model.eval()

    return Case(name, build, lambda: (torch.randn(1, 3, image_size, image_size),), note=f"{image_size}px")


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

    return Case("vit_small_tv", build, lambda: (torch.randn(1, 3, 64, 64),), note="64px L4 H6 d384")


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


VISION = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
          "vit_b_16")
CASES: tuple[str, ...] = (*VISION, "vit_small_tv", "bert", "llama", *HF_ZOO)


def make_case(name: str, image_size: int = 224) -> Case:
    """The sweep's case for a name of :data:`CASES` (BERT at bert-base size)."""
    if name == "bert":
        return bert_case()
    if name == "llama":
        return llama_case()
    if name in VISION:
        return vision_case(name, image_size)
    if name == "vit_small_tv":
        return vit_small_case()
    if name in HF_ZOO:
        return hf_case(name)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(CASES)}")


# ----------------------------------------------------------------------------- measurements
def _tensor_out(y: Any) -> torch.Tensor:
    """The tensor to compare: the output itself, or a HF model's ``last_hidden_state``."""
    if isinstance(y, torch.Tensor):
        return y
    if hasattr(y, "last_hidden_state"):
        return y.last_hidden_state
    if isinstance(y, (tuple, list)) and y and isinstance(y[0], torch.Tensor):
        return y[0]
    raise TypeError(f"cannot find the output tensor in a {type(y).__name__}")


def n_params(model: nn.Module) -> int:
    """Parameter count (tied parameters once): what the shrinking removes from the checkpoint."""
    return sum(p.numel() for p in model.parameters())


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


def _latency(dense: nn.Module, shrunk: nn.Module, x: tuple, repeats: int) -> tuple[float, float]:
    """Median batch-1 forward time of each model, interleaved so machine load hits both alike."""
    times: dict[str, list[float]] = {"dense": [], "shrunk": []}
    with torch.inference_mode():
        dense(*x), shrunk(*x)  # warm-up
        for _ in range(repeats):
            for key, m in (("dense", dense), ("shrunk", shrunk)):
                t0 = time.perf_counter()
                m(*x)
                times[key].append(time.perf_counter() - t0)
    return statistics.median(times["dense"]), statistics.median(times["shrunk"])


def run_case(case: Case, repeats: int = 5, keep_model: bool = False, torch_pruning: bool = False) -> Result:
    """Prune one model at 50% channels, shrink it, and measure; exceptions propagate (``main`` catches them).

    ``repeats=0`` leaves the latency columns empty (NaN).
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
            masked_out = _tensor_out(prepared(*x)).clone()
        plan = channel_plan_of(prepared)
        report = channel_report(prepared)["p"]
        t0 = time.perf_counter()
        shrunk = fxprune.convert(prepared, inplace=True, physical=True)
        res.seconds = t_prune + time.perf_counter() - t0
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
        got = _tensor_out(shrunk(*x))
    if got.shape != masked_out.shape:
        raise AssertionError(f"{case.name}: shrunk output shape {tuple(got.shape)} != masked {tuple(masked_out.shape)}")
    res.max_abs_diff = (got - masked_out).abs().max().item()
    res.rel_diff = res.max_abs_diff / max(masked_out.abs().max().item(), 1e-12)
    if repeats > 0:
        res.latency_dense, res.latency_shrunk = _latency(dense, shrunk, x, repeats)
    if keep_model:
        res.shrunk = shrunk
    if torch_pruning:
        res.tp_ratio, res.tp_note = torch_pruning_ratio(case)
    return res


class _TimedOut(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise _TimedOut


def torch_pruning_ratio(case: Case, timeout: int = 120) -> tuple[float, str]:
    """Torch-Pruning's parameter ratio on the same model at the same goal (its documented MetaPruner use).

    Magnitude (L1) importance, ``pruning_ratio=0.5``, 1000-way classifier heads
    ignored, ``num_heads`` given for every ``nn.MultiheadAttention`` and the
    q/k/v layers of attention modules with a head count attribute
    (``prune_num_heads=True``), Hugging Face outputs read through
    ``output_transform``; given up after ``timeout`` seconds. The note says
    whether its pruned model still runs on the example input.
    """
    try:
        import torch_pruning as tp
    except ImportError:
        return math.nan, "torch_pruning not installed"
    torch.manual_seed(0)
    model = case.build()
    x = case.inputs()
    before = n_params(model)
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    num_heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            num_heads[m] = m.num_heads
        heads = next((getattr(m, a) for a in ("num_attention_heads", "num_heads") if isinstance(getattr(m, a, None), int)),
                     None)
        for child in ("query", "key", "value", "q_proj", "k_proj", "v_proj"):
            if heads and isinstance(getattr(m, child, None), nn.Linear):
                num_heads[getattr(m, child)] = heads
    previous = signal.signal(signal.SIGALRM, _alarm)  # Torch-Pruning can run for hours on some graphs
    signal.alarm(timeout)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(model, x if len(x) > 1 else x[0],
                                          importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=GOAL,
                                          ignored_layers=ignored, num_heads=num_heads, prune_num_heads=bool(num_heads),
                                          output_transform=_tensor_out)
            pruner.step()
    except _TimedOut:
        return math.nan, f"timed out after {timeout} s"
    except Exception as e:  # noqa: BLE001 - a baseline failure is a table cell
        return math.nan, f"{type(e).__name__}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    ratio = n_params(model) / before
    try:
        with torch.no_grad():
            model(*x)
    except Exception as e:  # noqa: BLE001
        return ratio, f"its model fails: {type(e).__name__}"
    return ratio, ""


# ----------------------------------------------------------------------------- table
def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def markdown_table(results: list[Result], notes: dict[str, str] | None = None, top: int = 6) -> str:
    """The sweep's table; ``notes`` (model -> input size / config) go after the name, ``top`` reasons per row."""
    notes = notes or {}
    head = ("| model | prunable groups | excluded groups (main reasons) | heads | params (shrunk/dense) "
            "| latency b=1 (shrunk/dense) | max abs diff | pass seconds | Torch-Pruning params |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        label = f"{r.name} ({notes[r.name]})" if notes.get(r.name) else r.name
        if r.error:
            lines.append(f"| {label} | FAIL | {r.error} | | | | | {r.seconds:.1f} | |")
            continue
        why = "; ".join(f"{s} ×{n}" for s, n in r.reasons[:top])
        if len(r.reasons) > top:
            why += f"; +{len(r.reasons) - top} more"
        excl = f"{r.excluded}" + (f" ({why})" if why else "")
        if r.dense_weights:
            excl += f"; {r.dense_weights} weights left dense"
        heads = f"{r.heads_before}→{r.heads_after}" if r.heads_before else "-"
        params = f"{_m(r.params_shrunk)} / {_m(r.params_dense)} = {r.params_ratio:.2f}"
        if math.isnan(r.latency_dense):
            lat = "-"
        else:
            lat = (f"{r.latency_shrunk * 1e3:.1f} / {r.latency_dense * 1e3:.1f} ms = "
                   f"{r.latency_shrunk / r.latency_dense:.2f}")
        lines.append(f"| {label} | {r.prunable} | {excl} | {heads} | {params} | {lat} | "
                     f"{r.max_abs_diff:.1e} (rel {r.rel_diff:.0e}) | {r.seconds:.2f} | "
                     f"{'-' if math.isnan(r.tp_ratio) else f'{r.tp_ratio:.2f}'}{' ' + r.tp_note if r.tp_note else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", choices=CASES, metavar="NAME",
                    help=f"run only this model (repeatable); one of {', '.join(CASES)}")
    ap.add_argument("--image-size", type=int, default=224, help="CNN input side (vit_b_16 always uses 224)")
    ap.add_argument("--repeats", type=int, default=5, help="latency runs per model (median); 0 skips latency")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a shared machine)")
    ap.add_argument("--torch-pruning", action="store_true", help="also prune each model with Torch-Pruning")
    ap.add_argument("--hf-zoo", action="store_true", help="run the Hugging Face tiny-config zoo (and --only models)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    names = [n for n in CASES if (not args.only and not args.hf_zoo) or n in (args.only or ())
             or (args.hf_zoo and n in HF_ZOO)]
    results, notes, failures = [], {}, []
    t_all = time.perf_counter()
    for name in names:
        case = make_case(name, args.image_size)
        notes[name] = case.note
        t0 = time.perf_counter()
        try:
            res = run_case(case, repeats=args.repeats, torch_pruning=args.torch_pruning)
        except Exception as e:  # noqa: BLE001 -- one failure is a row, not a crash
            first = str(e).splitlines()[0][:120].replace("|", "\\|") if str(e) else ""
            res = Result(name, error=f"{type(e).__name__}: {first}",
                         seconds=time.perf_counter() - t0)
            failures.append((name, traceback.format_exc()))
        results.append(res)
        print(f"  {name}: done in {time.perf_counter() - t0:.1f} s", flush=True)

    print(f"\nchannel pruning at {GOAL:.0%}, CPU threads={args.threads}, latency median of {args.repeats} "
          f"interleaved runs; sweep wall time {time.perf_counter() - t_all:.0f} s\n")
    print(markdown_table(results, notes))
    for name, tb in failures:
        print(f"\n--- {name} failed:\n{tb}")


if __name__ == "__main__":
    main()
