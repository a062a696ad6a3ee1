"""Hands models and calibration data between the main venv and llm-compressor's venv.

Why folders and files: llm-compressor 0.6 lives in ``benchmarks/.venv-llmc``
(transformers 4.52, numpy<2), fxprune in the main venv (transformers 5). Both
sides must prune the *same* weights with the *same* calibration tokens, so the
main venv writes the dense model once as a Hugging Face folder readable by both
transformers versions and the token ids once as a safetensors file, and runs
``llmc_worker.py`` in the other venv as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["add_legacy_config_keys", "HERE", "CACHE", "LLMC_PYTHON", "folder_bytes", "run_llmc", "save_calibration", "save_dense"]

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
LLMC_PYTHON = HERE / ".venv-llmc" / "bin" / "python"


def save_dense(model: torch.nn.Module, directory: Path) -> None:
    """``save_pretrained`` plus the config keys transformers 4.52 reads.

    transformers 5 writes ``rope_parameters`` and ``dtype`` where 4.52 reads
    ``rope_theta``/``rope_scaling`` and ``torch_dtype``; 4.52 would silently fall
    back to its defaults, so the old spellings are added next to the new ones.
    """
    model.save_pretrained(directory)
    add_legacy_config_keys(Path(directory))


def add_legacy_config_keys(directory: Path) -> None:
    """Adds 4.52's spellings of the rope and dtype keys to a transformers 5 ``config.json`` (idempotent)."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", rope)
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])
    path.write_text(json.dumps(config, indent=2) + "\n")


def save_calibration(input_ids: torch.Tensor, path: Path) -> None:
    """The calibration token ids, (sequences, length) int64, as the worker reads them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # atomic: runs in parallel may read it
    save_file({"input_ids": input_ids.contiguous().long()}, str(tmp))
    os.replace(tmp, path)


def folder_bytes(directory: Path) -> int:
    """Bytes of the weight files (``*.safetensors``) in a saved model folder."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def run_llmc(args: list[str], log: Path, nice: int = 10) -> dict:
    """Runs ``llmc_worker.py`` with ``args`` under ``nice``; returns the JSON it wrote to ``--result``."""
    if not LLMC_PYTHON.exists():
        raise RuntimeError(f"{LLMC_PYTHON} missing: run benchmarks/setup_llmcompressor.sh first")
    result = Path(args[args.index("--result") + 1])
    command = ["nice", "-n", str(nice), str(LLMC_PYTHON), str(HERE / "llmc_worker.py"), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # No network here: without these, hub look-ups inside oneshot wait for timeouts
    # (about 100 s of wall time per run on a tiny model), inside the measured region.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = Path(log).read_text()[-3000:]
        raise RuntimeError(f"llm-compressor worker failed ({done.returncode}); log {log}:\n{tail}")
    return json.loads(result.read_text())


if __name__ == "__main__":
    sys.exit("library module: used by llm_quality.py and llm_scale.py")
