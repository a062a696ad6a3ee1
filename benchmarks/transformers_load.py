"""Do fxprune's compressed folders load through transformers' own ``from_pretrained``?

Why a benchmark and not a test: transformers 5 no longer decompresses sparse
compressed-tensors formats (see README, "Versions, and what transformers can
load"), so the check needs the transformers release that still does — 4.52
with compressed-tensors 0.10, the stack llm-compressor 0.6 installs in
``benchmarks/.venv-llmc`` (``bash benchmarks/setup_llmcompressor.sh``). The
main venv prunes tiny random Llama, Qwen2 and Mistral models one-shot (50%
unstructured and 2:4), saves them with ``fxprune.save_pretrained`` next to a
safetensors file of the pruned weights; the other venv loads each folder with
``AutoModelForCausalLM.from_pretrained`` and compares every tensor bit for bit
and the logits on fixed tokens::

    /work/main/.venv/bin/python benchmarks/transformers_load.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_exchange import LLMC_PYTHON, add_legacy_config_keys  # noqa: E402

_WORKER = r'''
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
import transformers, compressed_tensors
out = {"transformers": transformers.__version__, "compressed_tensors": compressed_tensors.__version__, "cases": []}
for case in json.load(open(sys.argv[1])):
    model = AutoModelForCausalLM.from_pretrained(case["folder"], torch_dtype=getattr(torch, case["dtype"]))
    want = load_file(case["reference"])
    state = model.state_dict()
    differ = [k for k, v in want.items() if k not in state or state[k].dtype != v.dtype or not torch.equal(state[k], v)]
    ids = torch.tensor(case["ids"])
    with torch.no_grad():
        logits = model(ids).logits.float()
    ref = torch.tensor(case["logits"])
    out["cases"].append({"name": case["name"], "tensors": len(want), "differ": differ[:5], "n_differ": len(differ),
                         "max_logit_diff": float((logits - ref).abs().max())})
print(json.dumps(out))
'''


def _build(kind: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    config, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                   "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    return cls(config(**common)).to(dtype).eval()


def main() -> None:
    import fxprune
    from safetensors.torch import save_file

    if not LLMC_PYTHON.exists():
        sys.exit(f"{LLMC_PYTHON} is missing: run bash benchmarks/setup_llmcompressor.sh first")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    calibration = [ids[i : i + 1] for i in range(2)]
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("llama", "qwen2", "mistral"):
            for pattern in ("unstructured", "2:4"):
                for dtype in (torch.bfloat16, torch.float32):
                    model = _build(kind, dtype)
                    cfg = {"pruning": {"sparsegpt": {"p": {"weights": ["model.layers.*"], "pattern": pattern}},
                                       "target_sparsity": 0.5}}
                    fxprune.oneshot(model, cfg, calibration)
                    name = f"{kind}-{pattern.replace(':', '')}-{str(dtype).split('.')[-1]}"
                    folder = Path(tmp) / name
                    saved = fxprune.save_pretrained(model, folder)
                    add_legacy_config_keys(folder)
                    reference = Path(tmp) / f"{name}.safetensors"
                    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
                               or not model.config.tie_word_embeddings}, str(reference))
                    with torch.no_grad():
                        logits = model(ids).logits.float()
                    cases.append({"name": name, "format": saved.format, "folder": str(folder), "reference": str(reference),
                                  "dtype": str(dtype).split(".")[-1], "ids": ids.tolist(), "logits": logits.tolist()})
        listing = Path(tmp) / "cases.json"
        listing.write_text(json.dumps(cases))
        done = subprocess.run([str(LLMC_PYTHON), "-c", _WORKER, str(listing)], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"the transformers 4.52 worker failed:\n{done.stderr[-4000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    formats = {c["name"]: c["format"] for c in cases}
    print(f"loaded with transformers {result['transformers']}, compressed-tensors {result['compressed_tensors']} "
          "(AutoModelForCausalLM.from_pretrained)")
    print("| model | format | tensors | bit-identical | max |logit diff| |")
    print("|---|---|---|---|---|")
    ok = True
    for c in result["cases"]:
        same = c["n_differ"] == 0
        # Weights must be bit-identical. Logits too in float32; in bfloat16 the two transformers releases
        # round attention and rotary arithmetic differently (same weights, a few bf16 ulps apart).
        ok &= same and c["max_logit_diff"] <= (0.0 if c["name"].endswith("float32") else 1e-2)
        print(f"| {c['name']} | {formats[c['name']]} | {c['tensors']} | {'yes' if same else 'NO: ' + ', '.join(c['differ'])} "
              f"| {c['max_logit_diff']:.3g} |")
    print("weights bit-identical everywhere, float32 logits identical" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
