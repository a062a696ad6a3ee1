"""Width pruning through normalized residual streams: convnext_tiny and a TinyLlama-shaped 2-layer model.

Prints, for each model at a 50% channel goal: parameters of the shrunk model
over the dense one, the max difference shrunk vs masked, and (convnext,
``--torch-pruning``) Torch-Pruning 1.6.1's parameter ratio at the same goal in
the same run. One thread; random weights (nothing downloaded).

    PYTHONPATH=$PWD nice -n 10 python benchmarks/norm_streams.py [--torch-pruning]
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

import fxprune

CONFIG = {"magnitude": {"p": {"pattern": "channel", "target_sparsity": 0.5, "schedule": "oneshot"}},
          "start_epoch": 0, "end_epoch": 0}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


def fx_ratio(model: torch.nn.Module, example: tuple, out=lambda y: y) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, CONFIG, example_inputs=example)
        prepared.pruner.on_epoch_begin(0)
        shrunk = fxprune.convert(prepared, physical=True)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        diff = float((out(shrunk.eval()(*example)) - out(prepared.eval()(*example))).abs().max())
    return n_params(shrunk) / n_params(model), diff, seconds


def tp_ratio(model: torch.nn.Module, example: torch.Tensor) -> float:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    before = n_params(model)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=[last])
    pruner.step()
    return n_params(model) / before


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--torch-pruning", action="store_true", help="also run Torch-Pruning on convnext_tiny")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import torchvision

    model = torchvision.models.convnext_tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    ratio, diff, s = fx_ratio(model, (x,))
    line = f"convnext_tiny: fxprune params {ratio:.3f}x, shrunk vs masked max diff {diff:.2e}, {s:.1f} s"
    if args.torch_pruning:
        line += f"; torch_pruning params {tp_ratio(model, x):.3f}x"
    print(line, flush=True)

    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                                   num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 32000, (1, 16))
    ratio, diff, s = fx_ratio(llama, (ids,), out=lambda y: y.logits)
    print(f"TinyLlama shape, 2 layers: fxprune params {ratio:.3f}x, shrunk vs masked max diff {diff:.2e}, {s:.1f} s")


if __name__ == "__main__":
    main()
