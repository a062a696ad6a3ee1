"""One-shot pruning quality, fxprune vs llm-compressor, on a small Llama trained on real text.

Why: SparseGPT, Wanda and magnitude differ only on a model with real structure,
and fxprune's SparseGPT must match llm-compressor's (same algorithm, same
calibration data: a gap beyond noise is a bug). The model is the byte-level
Llama of ``llm_train.py`` (vocabulary 256, hidden 256, 4 layers); both tools
prune the same dense folder with the same 32 calibration sequences of 256
bytes from the training documents; test loss (nats per byte) is measured in
this process on the same windows of held-out documents for every variant, so
differences are paired and their standard error is printed.

The layer-wise reconstruction error ||WX - ŴX||² / ||WX||² is measured here for
both tools the same way (X: the inputs each Linear sees in the *pruned* model on
the calibration data, W the dense weight) and printed next to fxprune's own report.

    nice -n 10 /work/main/.venv/bin/python benchmarks/llm_train.py          # once (cached)
    PYTHONPATH=$PWD nice -n 10 /work/main/.venv/bin/python benchmarks/llm_quality.py [--fresh] [--only fxprune]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_exchange import CACHE, add_legacy_config_keys, run_llmc, save_calibration  # noqa: E402
from llm_corpus import load_corpus, sample_windows  # noqa: E402
from llm_train import MODEL_DIR, SEQ_LEN, window_losses  # noqa: E402

CALIBRATION = CACHE / "quality-calibration.safetensors"
METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("unstructured", "2:4")
TOOLS = ("fxprune", "llmc", "reference")  # reference: plain-torch magnitude, see reference_magnitude
LLMC_METHODS = ("sparsegpt", "wanda")  # llm-compressor 0.6 has no working one-shot magnitude (llmc_worker.py)
WEIGHTS = ["model.layers.*.self_attn.*_proj.weight", "model.layers.*.mlp.*_proj.weight"]


def load_dense(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


@torch.no_grad()
def reconstruction_errors(dense, pruned, calibration: torch.Tensor) -> dict[str, float]:
    """Per Linear: sum ||(W - Ŵ)X||² / sum ||WX||² over the inputs X it sees in ``pruned``."""
    dense_weights = {n: m.weight for n, m in linears(dense).items()}
    sums = {n: [0.0, 0.0] for n in dense_weights}
    hooks = []
    for name, module in linears(pruned).items():
        def hook(module, inputs, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            w = dense_weights[name].float()
            sums[name][0] += (x @ (w - module.weight.float()).T).pow(2).sum().item()
            sums[name][1] += (x @ w.T).pow(2).sum().item()
        hooks.append(module.register_forward_pre_hook(hook))
    try:
        for i in range(0, calibration.shape[0], 8):
            pruned(input_ids=calibration[i : i + 8])
    finally:
        for handle in hooks:
            handle.remove()
    return {n: num / den if den else 0.0 for n, (num, den) in sums.items()}


def fxprune_prune(model_dir: Path, method: str, pattern: str, calibration: torch.Tensor):
    import fxprune

    model = load_dense(model_dir)
    config = {"pruning": {method: {"decoders": {"weights": WEIGHTS, "pattern": pattern}}, "target_sparsity": 0.5}}
    batches = [{"input_ids": calibration[i : i + 8]} for i in range(0, calibration.shape[0], 8)]
    report = fxprune.oneshot(model, config, batches)
    own = {}
    for entry in getattr(report, "weights", []):
        name = entry.name.removesuffix(".weight")
        own[name] = entry.error
    return model, {"report_errors": own, "report_seconds": getattr(report, "seconds", None)}


@torch.no_grad()
def reference_magnitude(model_dir: Path, pattern: str):
    """Plain-torch magnitude pruning: the oracle fxprune's magnitude must equal, and a baseline
    that needs neither tool (llm-compressor 0.6 has no one-shot magnitude)."""
    model = load_dense(model_dir)
    for module in linears(model).values():
        w = module.weight
        if pattern == "2:4":
            groups = w.abs().reshape(w.shape[0], -1, 4)
            drop = groups.argsort(dim=-1)[..., :2]
            keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
            w.mul_(keep.reshape(w.shape))
        else:
            k = w.numel() // 2
            order = w.abs().reshape(-1).argsort()
            w.view(-1)[order[:k]] = 0.0
    return model, {}


def llmc_prune(model_dir: Path, method: str, pattern: str):
    """Runs llm-compressor in its venv; reads its pruned weights back into the dense model.

    Only the weights are read: llm-compressor 0.6 writes a compression config into
    ``config.json`` that transformers 5 would hand to a newer compressed-tensors.
    A worker result newer than the dense model is reused (``--fresh`` redoes it).
    """
    from safetensors.torch import load_file

    out_dir = CACHE / f"quality-llmc-{method}-{pattern.replace(':', '')}"
    result = CACHE / f"quality-llmc-{method}-{pattern.replace(':', '')}.run.json"
    newest_model = max(p.stat().st_mtime for p in model_dir.glob("*.safetensors"))
    if result.exists() and (out_dir / "model.safetensors").exists() and result.stat().st_mtime > newest_model:
        data = json.loads(result.read_text())
    else:
        data = run_llmc(["--model", str(model_dir), "--calibration", str(CALIBRATION), "--method", method,
                         "--pattern", pattern, "--dtype", "float32", "--threads", "1", "--result", str(result),
                         "--save-dense", str(out_dir)], result.with_suffix(".log"))
    model = load_dense(model_dir)
    state = {}
    for path in sorted(out_dir.glob("*.safetensors")):
        state.update(load_file(str(path)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "layers" in k]:
        raise RuntimeError(f"llm-compressor folder {out_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), {"worker": data}


def achieved_sparsity(model) -> float:
    mods = linears(model).values()
    return sum(int((m.weight == 0).sum()) for m in mods) / sum(m.weight.numel() for m in mods)


def model_fingerprint(model_dir: Path) -> str:
    """Hash of the dense weights, so cached results of an older model are never reused."""
    digest = hashlib.sha1()
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def measure(model_dir: Path, tool: str, method: str, pattern: str, calibration, test, dense, fresh: bool, fingerprint: str) -> dict:
    path = CACHE / f"quality-{tool}-{method}-{pattern.replace(':', '')}.json"
    if path.exists() and not fresh:
        cached = json.loads(path.read_text())
        if cached.get("model") == fingerprint and len(cached["window_losses"]) == test.shape[0]:
            return cached
    print(f"pruning: {tool} {method} {pattern}", flush=True)
    if tool == "fxprune":
        model, extra = fxprune_prune(model_dir, method, pattern, calibration)
    elif tool == "reference":
        model, extra = reference_magnitude(model_dir, pattern)
    else:
        model, extra = llmc_prune(model_dir, method, pattern)
    data = {"model": fingerprint, "tool": tool, "method": method, "pattern": pattern, "sparsity": achieved_sparsity(model),
            "window_losses": window_losses(model, test).tolist(),
            "errors": reconstruction_errors(dense, model, calibration), **extra}
    data["loss"] = sum(data["window_losses"]) / len(data["window_losses"])
    path.write_text(json.dumps(data, indent=1))
    return data


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    diff = torch.tensor(a) - torch.tensor(b)
    return diff.mean().item(), (diff.std() / diff.numel() ** 0.5).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="redo every pruning run")
    parser.add_argument("--only", choices=TOOLS)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset to run")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated subset to run")
    parser.add_argument("--windows", type=int, default=256, help="test windows of 256 bytes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR, help="dense HF folder (default: llm_train.py's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir
    if not (model_dir / "config.json").exists():
        sys.exit(f"{model_dir} missing: train it first with benchmarks/llm_train.py")
    add_legacy_config_keys(model_dir)
    corpus = load_corpus()
    calibration = sample_windows(corpus.train, 32, SEQ_LEN, torch.Generator().manual_seed(4))
    test = sample_windows(corpus.test, args.windows, SEQ_LEN, torch.Generator().manual_seed(5))
    save_calibration(calibration, CALIBRATION)
    dense = load_dense(model_dir)
    dense_losses = window_losses(dense, test).tolist()
    dense_loss = sum(dense_losses) / len(dense_losses)
    tools = [args.only] if args.only else list(TOOLS)
    fingerprint = model_fingerprint(model_dir)
    results = {}
    for method in [m for m in METHODS if m in args.methods.split(",")]:
        for pattern in [p for p in PATTERNS if p in args.patterns.split(",")]:
            for tool in tools:
                if (tool == "llmc" and method not in LLMC_METHODS) or (tool == "reference" and method != "magnitude"):
                    continue
                try:
                    results[(tool, method, pattern)] = measure(model_dir, tool, method, pattern, calibration, test, dense, args.fresh,
                                                                fingerprint)
                except Exception as error:  # a failed run is reported, the others still run
                    print(f"  {tool} {method} {pattern} FAILED: {type(error).__name__}: {error}"[:2000], flush=True)
    print(f"\ncorpus: {corpus.n_train_docs} train / {corpus.n_test_docs} test documents; "
          f"test {args.windows}x{SEQ_LEN} bytes; dense test loss {dense_loss:.4f} nat/byte")
    print("llmc = llm-compressor 0.6.0.1; for magnitude (which it lacks) that column is plain-torch magnitude pruning")
    print("| method | pattern | fxprune loss | Δ dense | llmc loss | Δ dense | fxprune − llmc (± paired s.e.) | sparsity fx / llmc |")
    print("|---|---|---|---|---|---|---|---|")
    for method in METHODS:
        for pattern in PATTERNS:
            fx, lc = results.get(("fxprune", method, pattern)), results.get(("llmc", method, pattern))
            if method == "magnitude":  # llm-compressor has none: the plain-torch reference takes its column
                lc = results.get(("reference", method, pattern))
            missing = "— | —"
            cell = lambda r: (f"{r['loss']:.4f} | {r['loss'] - dense_loss:+.4f}" if r else missing)
            gap = "{:+.4f} ± {:.4f}".format(*_paired(fx["window_losses"], lc["window_losses"])) if fx and lc else ""
            sp = " / ".join(f"{r['sparsity']:.3f}" if r else "—" for r in (fx, lc))
            print(f"| {method} | {pattern} | {cell(fx)} | {cell(lc)} | {gap} | {sp} |")
    print()
    checks(results, dense_loss)
    print()
    layer_table(results)


def checks(results: dict, dense_loss: float) -> None:
    def loss(tool, method, pattern):
        r = results.get((tool, method, pattern))
        return r["loss"] if r else None

    def verdict(label: str, ok: bool | None, detail: str) -> None:
        print(f"{'PASS' if ok else ('FAIL' if ok is not None else 'MISSING')}: {label} ({detail})")

    mag = loss("reference", "magnitude", "unstructured") or loss("fxprune", "magnitude", "unstructured")
    verdict("50% magnitude costs >= 0.1 nat/byte", None if mag is None else mag - dense_loss >= 0.1,
            f"{mag - dense_loss:+.4f}" if mag is not None else "no run")
    for pattern in PATTERNS:
        for method, label in (("sparsegpt", "SparseGPT"), ("wanda", "Wanda")):
            fx, lc = loss("fxprune", method, pattern), loss("llmc", method, pattern)
            ok = None if fx is None or lc is None else fx <= lc + 1e-4
            verdict(f"fxprune {label} <= llm-compressor {label}, {pattern}", ok,
                    f"{fx} vs {lc}" if ok is not None else "missing run")
        ref, fxm = loss("reference", "magnitude", pattern), loss("fxprune", "magnitude", pattern)
        ok = None if ref is None or fxm is None else abs(ref - fxm) <= 1e-4
        verdict(f"fxprune magnitude == plain-torch magnitude, {pattern}", ok, f"{fxm} vs {ref}")
        for tool in ("fxprune", "llmc"):
            sg = loss(tool, "sparsegpt", pattern)
            for other in ("wanda", "magnitude") if tool == "fxprune" else ("wanda",):
                ot = loss(tool, other, pattern)
                ok = None if sg is None or ot is None else sg < ot
                verdict(f"{tool} SparseGPT < {other}, {pattern}", ok,
                        f"{sg} vs {ot}" if ok is not None else "missing run")


def layer_table(results: dict) -> None:
    """Per-Linear reconstruction error: every method and tool, plus fxprune's own report."""
    columns = [(t, m, p) for m in METHODS for p in PATTERNS for t in TOOLS if (t, m, p) in results]
    if not columns:
        return
    names = list(results[columns[0]]["errors"])
    short = {"unstructured": "50%", "2:4": "2:4"}
    print("layer-wise reconstruction error ||WX-ŴX||²/||WX||² (measured here; [fxprune report] in brackets)")
    print("| layer | " + " | ".join(f"{m} {short[p]} {t}" for t, m, p in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in names:
        cells = []
        for key in columns:
            r = results[key]
            cell = f"{r['errors'][name]:.4f}"
            own = (r.get("report_errors") or {}).get(name)
            if own is not None:
                cell += f" [{own:.4f}]"
            cells.append(cell)
        print(f"| {name.removeprefix('model.')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
