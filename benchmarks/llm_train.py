"""Trains the small byte-level Llama the one-shot quality benchmark prunes.

Why a trained model: on a random or barely trained model every pruning method
costs almost nothing (the issue measured +0.014 nat/byte for 50% magnitude), so
the comparison between SparseGPT, Wanda and magnitude says nothing. Training
until magnitude pruning visibly hurts gives the solvers something to recover.

The run checkpoints every ``--save-every`` steps under ``benchmarks/.cache/``
(model, optimizer, step), so a killed run resumes where it stopped, and the
finished model is written as a dense Hugging Face folder both benchmark venvs
read::

    python benchmarks/llm_train.py --steps 9000 --batch 16

Steps run under bfloat16 autocast and ``torch.compile`` by default (``--precision
fp32 --no-compile`` turns both off): on this 2-core machine that is 0.53-0.70 s per
step of 16 x 256 bytes against 0.8-0.95 s in plain fp32, which is what makes a
run long enough for the quality target fit in a working session. The master
weights, optimizer state and the exported model stay fp32.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_exchange import save_dense  # noqa: E402
from llm_corpus import load_corpus, sample_windows  # noqa: E402

__all__ = ["CACHE", "MODEL_DIR", "SEQ_LEN", "build_model", "eval_loss", "train", "window_losses"]

CACHE = Path(__file__).resolve().parent / ".cache"
MODEL_DIR = CACHE / "quality-model"
_STATE = CACHE / "quality-train-state.pt"
SEQ_LEN = 256


def build_model():
    """The benchmark's Llama: byte vocabulary, hidden 256, 4 layers, 8 heads of 32, MLP 688."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of each window: per window, so comparisons can be paired."""
    model.eval()
    out = []
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        out.append(loss.mean(dim=1))
    return torch.cat(out)


def eval_loss(model, windows: torch.Tensor) -> float:
    """Mean next-byte cross-entropy in nats over every predicted position of ``windows``."""
    return window_losses(model, windows).mean().item()


def train(steps: int, batch: int, peak_lr: float, save_every: int, log_every: int,
          precision: str = "bf16", compile_model: bool = True) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus()
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    start = 0
    if _STATE.exists():
        state = torch.load(_STATE, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start = state["step"]
        print(f"resuming at step {start}", flush=True)
    test = sample_windows(corpus.test, 64, SEQ_LEN, torch.Generator().manual_seed(2))
    warmup = min(200, steps // 10)
    model.train()
    forward = torch.compile(model) if compile_model else model
    autocast = precision == "bf16"
    t0 = time.time()
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, peak_lr, warmup)
        ids = sample_windows(corpus.train, batch, SEQ_LEN, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = forward(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        done = step + 1
        if done % log_every == 0:
            rate = (time.time() - t0) / (done - start)
            print(f"step {done}/{steps} loss {loss.item():.4f} {rate:.2f} s/step", flush=True)
        if done % save_every == 0 or done == steps:
            if done % (save_every * 4) == 0 or done == steps:
                print(f"  test loss {eval_loss(model, test):.4f}", flush=True)
                model.train()
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "generator": generator.get_state(), "step": done}
            torch.save(state, str(_STATE) + ".tmp")
            os.replace(str(_STATE) + ".tmp", _STATE)
    model.eval()
    save_dense(model, MODEL_DIR)
    print(f"saved {MODEL_DIR}", flush=True)


def export(directory: Path) -> None:
    """Writes the last checkpoint's model as a dense folder (to try a model before training ends)."""
    state = torch.load(_STATE, weights_only=False)
    model = build_model()
    model.load_state_dict(state["model"])
    model.eval()
    save_dense(model, directory)
    print(f"saved step {state['step']} to {directory}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="autocast dtype of the training steps (weights stay fp32)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="run the training steps through torch.compile")
    parser.add_argument("--export", type=Path, help="only write the last checkpoint's model to this folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.export:
        export(args.export)
        return
    train(args.steps, args.batch, args.lr, args.save_every, args.log_every, args.precision, args.compile)


if __name__ == "__main__":
    main()
