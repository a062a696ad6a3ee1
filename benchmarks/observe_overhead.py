"""Cost of observing weight reads: a forward under WeightInputObserver vs a plain forward vs forward pre-hooks.

Random-init Llama and Mixtral models (transformers), batch 4 x 128 tokens, one
thread. Three timings per model, interleaved and repeated (median):

- plain:     ``model(ids)`` under ``torch.no_grad()``;
- hooks:     the same with forward pre-hooks on every ``nn.Linear`` summing per-feature squares (the
             old way; cannot see the stacked experts);
- observer:  the same under ``WeightInputObserver`` watching every decoder weight (experts included),
             ``on_read`` summing ``read.feature_sq_sums()``.

Prints the ratios to plain. Run: ``nice -n 10 python benchmarks/observe_overhead.py``.
"""
from __future__ import annotations

import statistics
import time
import warnings

import torch
from torch import nn

from fxprune.observe import WeightInputObserver


def _models():
    import transformers as T

    llama = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                             num_attention_heads=8, num_key_value_heads=4, vocab_size=1000,
                                             max_position_embeddings=256))
    mixtral = T.MixtralForCausalLM(T.MixtralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=1000,
                                                   num_local_experts=8, num_experts_per_tok=2,
                                                   max_position_embeddings=256))
    return {"llama-4x512": llama.eval(), "mixtral-4x256-8experts": mixtral.eval()}


def _time(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = _models()
    ids = torch.randint(0, 1000, (4, 128))
    for label, model in models.items():
        weights = {n: p for n, p in model.named_parameters() if ".layers." in n and p.dim() >= 2}
        sums: dict[str, torch.Tensor] = {}

        def plain():
            with torch.no_grad():
                model(input_ids=ids)

        def on_read(read):
            sums[read.name] = sums.get(read.name, 0) + read.feature_sq_sums()

        def observed():
            with torch.no_grad(), WeightInputObserver(model, weights, on_read):
                model(input_ids=ids)

        def hooked():
            def hook(m, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                sums[id(m)] = sums.get(id(m), 0) + x.pow(2).sum(0).double()
            linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
            handles = [m.register_forward_pre_hook(hook) for m in linears]
            try:
                plain()
            finally:
                for h in handles:
                    h.remove()

        t_plain, t_hooks, t_obs = _time(plain), _time(hooked), _time(observed)
        n_reads = []
        with torch.no_grad(), WeightInputObserver(model, weights, n_reads.append) as obs:
            model(input_ids=ids)
        unseen = [n for n, c in obs.rows_seen.items() if c == 0]
        print(f"{label}: plain {t_plain * 1e3:.1f} ms | hooks x{t_hooks / t_plain:.2f} | observer "
              f"x{t_obs / t_plain:.2f} ({len(n_reads)} reads of {len(weights)} weights per forward, "
              f"unseen: {len(unseen)})")


if __name__ == "__main__":
    main()
