"""Prepare -> prune -> convert on real architectures, and the README's model table.

For every model of issue 3 (torchvision, timm, Hugging Face transformers; random
init, small configs, small inputs) this script checks, in order:

1. ``prepare`` succeeds and the prepared model, before any pruning, computes
   exactly what the original computes (the capture route changed nothing);
2. after ``pruner.on_epoch_begin`` at a 50% goal, every pruned weight holds
   its goal (mask count within one element of ``goal * numel``);
3. tied weights (GPT-2 ``wte``/``lm_head``, T5 shared embeddings) have one
   mask in the prepared model and are still one ``Parameter`` after convert;
4. ``convert`` gives the original class, whose eval output equals the
   prepared model's (``atol = 1e-5 * output scale``);
5. the converted ``state_dict`` loads with ``strict=True`` into a fresh
   instance built by the same constructor;
6. three SGD steps (momentum, weight decay, optimizer attached) leave the
   gradients of pruned entries and the pruned weights at exactly 0.

Run ``python benchmarks/model_sweep.py`` (all models, writes ``docs/models.md``)
or ``python benchmarks/model_sweep.py resnet18 gpt2 --no-write``. Each model
runs in its own ``try``: one failure is a table row, not a crash.
``tests/test_real_models.py`` runs a CI-sized subset through :func:`run_case`.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import fxprune
from fxprune.trace import output_tensors

__all__ = ["Case", "CaseResult", "CASES", "run_case", "route_summary", "markdown_table", "main"]

GOAL = 0.5
CONFIG = {
    "pruning": {
        "magnitude": {"prune1": {}},
        "start_epoch": 0,
        "end_epoch": 2,
        "frequency": 1,
        "init_sparsity": 0.25,
        "target_sparsity": GOAL,
    }
}


@dataclass(frozen=True)
class Case:
    """One model of the sweep: a constructor (random init) and an example input.

    ``inputs`` returns ``(args, kwargs)``. ``tied`` lists parameter-name
    groups that must be one tensor before and after pruning.
    """

    name: str
    family: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[tuple, dict]]
    tied: tuple[tuple[str, ...], ...] = ()
    pass_example_inputs: bool = True  # give prepare() the example input (per-submodule capture needs it)


@dataclass
class CaseResult:
    """One table row."""

    name: str
    family: str
    status: str = "FAIL"
    pruned: str = "-"
    route: str = "-"
    checks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    reason: str = ""


# ----------------------------------------------------------------------------- model builders
def _image(size: int, batch: int = 2) -> Callable[[], tuple[tuple, dict]]:
    return lambda: ((torch.randn(batch, 3, size, size),), {})


def _tv(fn: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, fn)(weights=None, **kw)

    return build


def _detection() -> nn.Module:
    from torchvision.models import detection

    return detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=5)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kw)

    return build


def _hf(model_cls: str, config_cls: str, **cfg: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_cls)(**cfg)
        return getattr(transformers, model_cls)(config)

    return build


def _tokens(vocab: int = 99, length: int = 12, batch: int = 2, **extra: Callable[[], Any]) -> Callable[[], tuple[tuple, dict]]:
    def make() -> tuple[tuple, dict]:
        ids = torch.randint(0, vocab, (batch, length))
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        kwargs.update({k: f() for k, f in extra.items()})
        return (), kwargs

    return make


_SMALL = dict(vocab_size=99)
CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("resnet18", "torchvision", _tv("resnet18"), _image(32)),
        Case("resnet50", "torchvision", _tv("resnet50"), _image(32)),
        Case("mobilenet_v3_small", "torchvision", _tv("mobilenet_v3_small"), _image(32)),
        Case("efficientnet_b0", "torchvision", _tv("efficientnet_b0"), _image(32)),
        Case("convnext_tiny", "torchvision", _tv("convnext_tiny"), _image(32)),
        Case("regnet_y_400mf", "torchvision", _tv("regnet_y_400mf"), _image(32)),
        Case("densenet121", "torchvision", _tv("densenet121"), _image(32)),
        Case("shufflenet_v2_x1_0", "torchvision", _tv("shufflenet_v2_x1_0"), _image(32)),
        Case("vit_b_16", "torchvision", _tv("vit_b_16", image_size=32), _image(32)),
        Case("swin_t", "torchvision", _tv("swin_t"), _image(64)),
        Case(
            "fasterrcnn_mobilenet_v3_large_320_fpn",
            "torchvision",
            _detection,
            lambda: (([torch.rand(3, 96, 128), torch.rand(3, 128, 96)],), {}),
        ),
        Case("timm_resnet18", "timm", _timm("resnet18"), _image(32)),
        Case("timm_efficientnet_b0", "timm", _timm("efficientnet_b0"), _image(32)),
        Case("timm_vit_tiny", "timm", _timm("vit_tiny_patch16_224", img_size=32), _image(32)),
        Case("timm_convnext_atto", "timm", _timm("convnext_atto"), _image(32)),
        Case(
            "BertModel",
            "transformers",
            _hf("BertModel", "BertConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=37, max_position_embeddings=64, **_SMALL),
            _tokens(),
        ),
        Case(
            "DistilBertModel",
            "transformers",
            _hf("DistilBertModel", "DistilBertConfig", dim=32, n_layers=2, n_heads=2, hidden_dim=37,
                max_position_embeddings=64, **_SMALL),
            _tokens(),
        ),
        Case(
            "GPT2LMHeadModel",
            "transformers",
            _hf("GPT2LMHeadModel", "GPT2Config", n_embd=32, n_layer=2, n_head=2, n_positions=64, **_SMALL),
            _tokens(),
            tied=(("transformer.wte.weight", "lm_head.weight"),),
        ),
        Case(
            "T5ForConditionalGeneration",
            "transformers",
            _hf("T5ForConditionalGeneration", "T5Config", d_model=32, d_kv=8, d_ff=37, num_layers=2,
                num_heads=4, decoder_start_token_id=0, tie_word_embeddings=True, **_SMALL),
            _tokens(decoder_input_ids=lambda: torch.randint(0, 99, (2, 7)), use_cache=lambda: False),
            tied=(("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"),),
        ),
        Case(
            "LlamaForCausalLM",
            "transformers",
            _hf("LlamaForCausalLM", "LlamaConfig", hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **_SMALL),
            _tokens(),
        ),
        Case(
            "ViTModel",
            "transformers",
            _hf("ViTModel", "ViTConfig", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=37),
            lambda: ((), {"pixel_values": torch.randn(2, 3, 32, 32)}),
        ),
    ]
}


# ----------------------------------------------------------------------------- checks
@torch.no_grad()
def _eval_out(model: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    was = model.training
    model.eval()
    try:
        return [t.detach().float() for t in output_tensors(model(*args, **kwargs))]
    finally:
        model.train(was)


def _assert_close(a: list[torch.Tensor], b: list[torch.Tensor], what: str, rel: float = 1e-5) -> None:
    assert len(a) == len(b), f"{what}: {len(a)} vs {len(b)} output tensors"
    assert a, f"{what}: the model returned no tensor"
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape, f"{what}: output {i} shape {tuple(x.shape)} vs {tuple(y.shape)}"
        scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
        err = float((x - y).abs().max()) if x.numel() else 0.0
        assert err <= rel * scale, f"{what}: output {i} differs by {err:.3g} (scale {scale:.3g})"


def route_summary(prepared: nn.Module) -> str:
    """``graph``, ``module`` or ``mixed`` (how the pruned weights are masked), then how the model was captured.

    ``root graph`` = the whole forward traced; ``root python: G graphs, P python`` = the root's
    forward is untraceable and stayed Python, G submodules were captured as graphs of their own and
    P kept their Python forward (their children captured in turn); ``L leaves`` = fallback leaves.
    """
    report = prepared.pruner.prepare_report
    routes = set(report.routes.values()) - {"unused"}
    kind = "graph" if routes <= {"graph"} else "module" if routes <= {"module"} else "mixed"
    kinds = [r.split(" ", 1)[0] for r in report.modules.values()]
    leaves = len(report.fallback_leaves) + kinds.count("leaf")
    if report.traced:
        how = "root graph"
    elif report.modules and kinds.count("graph"):
        how = f"root python: {kinds.count('graph')} graphs, {kinds.count('python') - 1} python"
    else:
        how = "root python, no subgraph"
    return f"{kind} ({how}{f', {leaves} leaves' if leaves else ''})"


def run_case(case: Case, result: CaseResult | None = None) -> CaseResult:
    """Run the six checks of the module docstring on ``case``; raise AssertionError on the first failure."""
    res = result or CaseResult(case.name, case.family)
    torch.manual_seed(0)
    model = case.build()
    model.eval()
    args, kwargs = case.inputs()
    reference = _eval_out(model, args, kwargs)

    extra = {"example_inputs": (args, kwargs)} if case.pass_example_inputs else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxprune.TraceFallbackWarning)
        prepared = fxprune.prepare(model, CONFIG, **_prepare_kwargs(extra))
    res.route = route_summary(prepared)
    targets = prepared.pruner.targets
    res.pruned = f"{len(targets)} ({sum(t.masked.param.numel() for t in targets) / 1e6:.2f}M)"
    _assert_close(_eval_out(prepared, args, kwargs), reference, "prepared vs original (no pruning yet)")
    res.checks.append("capture")

    prepared.pruner.on_epoch_begin(CONFIG["pruning"]["end_epoch"])
    for t in targets:
        n = t.masked.mask.numel()
        pruned = n - int(t.masked.mask.sum())
        assert abs(pruned - GOAL * n) <= 1, f"{t.name}: {pruned}/{n} pruned, goal {GOAL}"
        assert int((t.masked.folded() == 0).sum()) >= pruned, f"{t.name}: pruned entries are not zero"
    res.checks.append("goal")

    for group in case.tied:
        masked = {id(prepared.get_submodule(a)) for a in group}
        assert len(masked) == 1, f"tied weights {group} have {len(masked)} masks in the prepared model"
    prepared_out = _eval_out(prepared, args, kwargs)

    converted = fxprune.convert(prepared)
    assert type(converted) is type(model), f"convert gave {type(converted).__name__}"
    for group in case.tied:
        params = {id(converted.get_parameter(a)) for a in group}
        assert len(params) == 1, f"tied weights {group} are {len(params)} tensors after convert"
    if case.tied:
        res.checks.append("tied")
    _assert_close(_eval_out(converted, args, kwargs), prepared_out, "converted vs prepared")
    res.checks.append("convert")

    torch.manual_seed(1)
    fresh = case.build()
    fresh.load_state_dict(converted.state_dict(), strict=True)
    _assert_close(_eval_out(fresh, args, kwargs), prepared_out, "fresh instance loaded from converted")
    res.checks.append("strict-load")

    _train_steps(prepared, args, kwargs)
    res.checks.append("train")
    res.status = "ok"
    return res


def _train_steps(prepared: nn.Module, args: tuple, kwargs: dict, steps: int = 3) -> None:
    """A few optimizer-mode SGD steps (momentum, weight decay): gradients of pruned entries are 0 after every
    backward and pruned weights are 0 after every step. In eval mode, so detection models need no targets
    and batch norm no batch statistics; the gradients take the same masked path."""
    opt = torch.optim.SGD(prepared.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    prepared.pruner.attach(opt)
    prepared.eval()
    for _ in range(steps):
        opt.zero_grad()
        outs = [t for t in output_tensors(prepared(*args, **kwargs)) if t.is_floating_point() and t.requires_grad]
        assert outs, "no output depends on the weights"
        sum(t.float().pow(2).mean() for t in outs).backward()
        for t in prepared.pruner.targets:
            g = t.masked.param.grad
            assert g is None or not bool(g[~t.masked.mask].any()), f"{t.name}: pruned entries got a gradient"
        opt.step()
        for t in prepared.pruner.targets:
            assert not bool(t.masked.param.detach()[~t.masked.mask].any()), f"{t.name}: a pruned weight moved"
    prepared.pruner.detach()


def _prepare_kwargs(extra: dict) -> dict:
    """Pass example inputs only when this fxprune's prepare() accepts them."""
    import inspect

    params = inspect.signature(fxprune.prepare).parameters
    return {k: v for k, v in extra.items() if k in params}


# ----------------------------------------------------------------------------- table
def markdown_table(results: list[CaseResult]) -> str:
    """The README table: one row per model."""
    head = "| model | family | weights pruned (elements) | route | checks passed | status | seconds | failure |"
    rule = "|---|---|---|---|---|---|---:|---|"
    rows = [
        f"| {r.name} | {r.family} | {r.pruned} | {r.route} | {', '.join(r.checks) or '-'} | {r.status} | "
        f"{r.seconds:.1f} | {r.reason.replace('|', '/') or ''} |"
        for r in results
    ]
    return "\n".join([head, rule, *rows])


_PREAMBLE = """# Supported models

Generated by `python benchmarks/model_sweep.py` (do not edit by hand). Each model is built with
random weights from a small config, prepared with a magnitude pruner, pruned to a 50% goal with
`pruner.on_epoch_begin`, and converted. Checks: **capture** (prepared == original before pruning),
**goal** (every pruned weight at 50% within one element), **tied** (tied weights share one mask and
stay one parameter after convert), **convert** (converted eval output == prepared, atol 1e-5 x
output scale), **strict-load** (converted `state_dict` loads strictly into a fresh instance), **train**
(three SGD steps with momentum and weight decay, optimizer attached, in eval mode: gradients of pruned
entries are 0 after every backward, pruned weights 0 after every step).

Route: `graph` = every pruned weight is a masked node of an fx graph; `module` = masked around the
forward of the module that reads it; `mixed` = both. In parentheses, how the model was captured:
`root graph` = its whole forward traced by `torch.fx`; `root python: G graphs, P python` = the
root's forward is untraceable, so it stays Python and its submodules were captured on their own
(per-submodule fallback, specialized to the example input): G became graphs, P more kept their
Python forward (their children captured in turn); `L leaves` = submodules kept as fx leaves because
tracing through them failed (masked at module level, or their children captured).

"""


README_BEGIN = "<!-- models table: generated by benchmarks/model_sweep.py -->"
README_END = "<!-- end of models table -->"


def update_readme(table: str) -> Path:
    """Replace the table between the README markers with ``table``."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    head, sep, rest = text.partition(README_BEGIN)
    _, sep2, tail = rest.partition(README_END)
    if not (sep and sep2):
        raise SystemExit(f"{readme}: markers {README_BEGIN!r} / {README_END!r} not found")
    readme.write_text(f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}")
    return readme


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help=f"subset of: {', '.join(CASES)}")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "models.md"))
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--threads", type=int, default=1)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    unknown = [m for m in opts.models if m not in CASES]
    if unknown:
        ap.error(f"unknown model(s): {', '.join(unknown)}")
    results = []
    for name in opts.models or list(CASES):
        case = CASES[name]
        res = CaseResult(case.name, case.family)
        t0 = time.perf_counter()
        try:
            run_case(case, res)
        except Exception as e:  # one row per model, whatever went wrong
            res.reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            if not isinstance(e, AssertionError):
                traceback.print_exc(limit=-3)
        res.seconds = time.perf_counter() - t0
        print(f"{res.name:40s} {res.status:4s} {res.seconds:6.1f}s  {res.route:16s} {res.reason}", flush=True)
        results.append(res)
    table = markdown_table(results)
    print(table)
    if not opts.no_write:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(_PREAMBLE + table + "\n")
        print(f"wrote {opts.out}")
        if not opts.models:  # the full sweep also refreshes the table in README.md
            print(f"updated {update_readme(table)}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
