"""Offline English text for the one-shot quality benchmark, split by document.

Why this text: the benchmark needs a model with real structure (pruning a
random model shows nothing) and this machine has no internet, so we train on
what the operating system ships: license texts, package copyright files,
README/NEWS/changelog files under /usr/share/doc (decompressing .gz) and
Python's own pydoc topics. Splitting by *document* (not by byte offset) keeps
held-out text unseen, so test loss measures generalisation the pruning can hurt.

Used by ``llm_quality.py``; run on its own to print the corpus statistics::

    /work/main/.venv/bin/python benchmarks/llm_corpus.py
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
from dataclasses import dataclass

import torch

__all__ = ["Corpus", "load_corpus", "sample_windows"]

_DOC_ROOTS = ("/usr/share/common-licenses", "/usr/share/doc")
_NAME_HINTS = ("copyright", "readme", "changelog", "news", ".txt", ".md", ".rst")
_SKIP_SUFFIXES = (".html", ".htm", ".png", ".gif", ".pdf", ".jpg", ".svg", ".css", ".js")
# Changelogs can be megabytes of near-identical entries; capping a document keeps
# the mix of licenses, prose and docs from being drowned by a few huge files.
_MAX_DOC_BYTES = 200_000
_MIN_DOC_BYTES = 512


@dataclass(frozen=True)
class Corpus:
    """Byte-level train/test split; each split is one uint8 tensor of its documents joined."""

    train: torch.Tensor
    test: torch.Tensor
    n_train_docs: int
    n_test_docs: int


def _wanted(path: str) -> bool:
    low = os.path.basename(path).lower()
    if low.endswith(_SKIP_SUFFIXES) or low.endswith(tuple(s + ".gz" for s in _SKIP_SUFFIXES)):
        return False
    return path.startswith("/usr/share/common-licenses") or any(h in low for h in _NAME_HINTS)


def _read_text(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        if path.endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\x00" in data[:4096]:  # binary file with a text-like name
        return None
    return data[:_MAX_DOC_BYTES]


def _documents() -> list[bytes]:
    """Every distinct text document, in a deterministic order."""
    docs: dict[str, bytes] = {}
    for root in _DOC_ROOTS:
        for directory, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                path = os.path.join(directory, name)
                if os.path.isfile(path) and _wanted(path):
                    text = _read_text(path)
                    if text is not None and len(text) >= _MIN_DOC_BYTES:
                        docs.setdefault(hashlib.sha1(text).hexdigest(), text)
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    for key in sorted(topics):
        text = topics[key].encode("utf-8")
        if len(text) >= _MIN_DOC_BYTES:
            docs.setdefault(hashlib.sha1(text).hexdigest(), text)
    return [docs[key] for key in sorted(docs)]


def load_corpus(test_fraction: float = 0.1, seed: int = 0) -> Corpus:
    """Documents shuffled with ``seed``; the last ``test_fraction`` of them are the test split."""
    docs = _documents()
    if len(docs) < 20:
        raise RuntimeError(f"found only {len(docs)} text documents under {_DOC_ROOTS}")
    random.Random(seed).shuffle(docs)
    n_test = max(1, round(len(docs) * test_fraction))
    sep = b"\n\n"
    test = sep.join(docs[:n_test])
    train = sep.join(docs[n_test:])
    as_tensor = lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return Corpus(as_tensor(train), as_tensor(test), len(docs) - n_test, n_test)


def sample_windows(data: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``length`` bytes as int64 token ids, shape (count, length)."""
    starts = torch.randint(0, data.numel() - length, (count,), generator=generator)
    return torch.stack([data[s : s + length] for s in starts.tolist()]).long()


if __name__ == "__main__":
    corpus = load_corpus()
    print(
        f"train: {corpus.n_train_docs} docs, {corpus.train.numel() / 1e6:.1f} MB; "
        f"test: {corpus.n_test_docs} docs, {corpus.test.numel() / 1e6:.1f} MB"
    )
