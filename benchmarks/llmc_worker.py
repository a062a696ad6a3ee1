"""Runs one llm-compressor one-shot pruning job; executed by ``benchmarks/.venv-llmc/bin/python``.

Why a separate process and venv: llm-compressor 0.6.0.1 pins transformers 4.52
and numpy<2, which cannot share a venv with fxprune's transformers 5. The
benchmarks hand it a dense Hugging Face folder and a safetensors file of
calibration token ids (the very tensors fxprune calibrates on), and read back
a JSON of timings and memory plus, when asked, the pruned model as a folder.

    .venv-llmc/bin/python llmc_worker.py --model DIR --calibration FILE \
        --method sparsegpt --pattern 2:4 --result OUT.json [--save-dense DIR] \
        [--save-compressed DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss_meter import RssMeter, make_resident  # noqa: E402

# No magnitude: llm-compressor 0.6.0.1's MagnitudePruningModifier is a training-time
# schedule, and under ``oneshot`` it fails in on_initialize (it calls
# ``get_layers_params(state.model)``, a function that takes (targets, module)).
# ConstantPruningModifier only keeps an existing mask. So there is no
# llm-compressor magnitude baseline; the benchmarks say so in their tables.
METHODS = ("sparsegpt", "wanda")


def _modifier(method: str, sparsity: float, pattern: str, decoder_layer: str):
    structure = "0:0" if pattern == "unstructured" else pattern
    targets = ["Linear"]
    ignore = ["re:.*lm_head"]
    if method == "sparsegpt":
        from llmcompressor.modifiers.obcq import SparseGPTModifier

        return SparseGPTModifier(sparsity=sparsity, mask_structure=structure, targets=targets,
                                 ignore=ignore, sequential_targets=[decoder_layer])
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(sparsity=sparsity, mask_structure=structure, targets=targets,
                                    ignore=ignore, sequential_targets=[decoder_layer])
    raise SystemExit(f"llm-compressor has no one-shot method {method!r} here (see METHODS)")


def _placeholder_tokenizer(vocab_size: int):
    """A tokenizer object llm-compressor insists on even for pre-tokenized data.

    The benchmark models are byte-level or random and have no tokenizer; the
    calibration set arrives as token ids, so this one is never asked to encode
    text, only to exist (and to name a pad token for the collator).
    """
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<0>", unk_token="<0>")


def _sparsity_of_linears(model) -> float:
    import torch

    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / max(1, total)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", required=True, help="safetensors file with 'input_ids' (N, L)")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--result", required=True)
    parser.add_argument("--save-dense", help="write the pruned model here as a dense HF folder")
    parser.add_argument("--save-compressed", help="write the pruned model here with a sparse-bitmask format")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import llmcompressor
    from llmcompressor import oneshot

    if args.threads:
        torch.set_num_threads(args.threads)
    ids = load_file(args.calibration)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype)
    model.eval()
    make_resident(model)
    decoder_layer = type(model.model.layers[0]).__name__
    modifier = _modifier(args.method, args.sparsity, args.pattern, decoder_layer)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    with RssMeter(snapshot=args.result + ".partial") as meter:
        oneshot(model=model, dataset=dataset, recipe=modifier,
                processor=_placeholder_tokenizer(model.config.vocab_size), num_calibration_samples=ids.shape[0],
                max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pad_to_max_length=False,
                oneshot_device="cpu", log_dir=None, output_dir=None)
    result = {"tool": "llm-compressor", "version": llmcompressor.__version__, "method": args.method,
              "pattern": args.pattern, "sparsity": args.sparsity, "model_bytes": model_bytes,
              "calibration_shape": list(ids.shape), "threads": torch.get_num_threads(),
              "achieved_sparsity": _sparsity_of_linears(model), **meter.as_dict()}
    if args.save_dense:
        model.save_pretrained(args.save_dense, save_compressed=False)
    if args.save_compressed:
        t0 = time.perf_counter()
        # llm-compressor 0.6 writes unstructured sparsity as "dense" unless given a
        # sparsity config, so the format is named explicitly (as its docs advise).
        from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

        config = Sparse24BitMaskConfig() if args.pattern == "2:4" else BitmaskConfig()
        model.save_pretrained(args.save_compressed, save_compressed=True, sparsity_config=config)
        result["save_compressed_s"] = time.perf_counter() - t0
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    with open(args.result + ".tmp", "w") as handle:
        json.dump(result, handle, indent=1)
    os.replace(args.result + ".tmp", args.result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
