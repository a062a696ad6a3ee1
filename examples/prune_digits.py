"""Main job: prune a small CNN on scikit-learn's digits to high sparsity, then convert it.

Why this example: it runs the whole fxprune pipeline on real data in about
12 s of CPU time (30 s wall on a busy 2-core machine), with no download (the
8x8 digits ship with scikit-learn), prints one line per epoch, and it *checks* every promise along the way instead of just
printing numbers:

1. train the dense ``DigitsCNN`` and report its test accuracy;
2. ``fxprune.prepare`` it with a YAML config, fine-tune with the seed's
   training-loop hooks (``on_epoch_begin``, ``on_batch_begin``,
   ``on_minibatch_end``, ``on_batch_end``, ``on_epoch_end``) while the
   schedule raises the sparsity goal, report the pruned accuracy and
   ``fxprune.sparsity_report``;
3. ``fxprune.convert`` it and check that the result is a plain ``DigitsCNN``
   with the same logits (within 1e-5) and accuracy, that its pruned weights
   are exactly zero, and that its saved ``state_dict`` loads with
   ``strict=True`` into a fresh ``DigitsCNN``.

It exits with status 1 if any check fails.

Run from the repository root::

    python examples/prune_digits.py                      # configs/digits_cnn.yaml
    python examples/prune_digits.py --config configs/high_sparsity.yaml --epochs-prune 12
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxprune

REPO = Path(__file__).resolve().parent.parent


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and two linear layers for 1x8x8 digit images.

    Sized so that most of the weights (conv2, fc1) can be pruned hard while
    the small first and last layers keep more of theirs (see
    ``configs/digits_cnn.yaml``).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def load_digits_split(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """The 1797 bundled 8x8 digits, scaled to [0, 1]; a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.25, random_state=seed, stratify=y.numpy()
    )
    return TensorDataset(x[idx_train], y[idx_train]), TensorDataset(x[idx_test], y[idx_test])


@torch.no_grad()
def predict(model: nn.Module, data: TensorDataset) -> torch.Tensor:
    """Logits for the whole test set, in eval mode."""
    was_training = model.training
    model.eval()
    x, _ = data.tensors
    logits = model(x)
    model.train(was_training)
    return logits


def accuracy(logits: torch.Tensor, data: TensorDataset) -> float:
    return float((logits.argmax(1) == data.tensors[1]).float().mean())


def train_dense(model: nn.Module, loader: DataLoader, test: TensorDataset, epochs: int) -> None:
    """Plain training, no pruning: the dense baseline the pruned model is compared with."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for epoch in range(epochs):
        started = time.perf_counter()
        for x, label in loader:
            loss = F.cross_entropy(model(x), label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"  dense epoch {epoch}: loss {loss.item():.4f}, test accuracy "
              f"{accuracy(predict(model, test), test):.4f}, {time.perf_counter() - started:.1f} s", flush=True)


def train_pruned(prepared: nn.Module, loader: DataLoader, test: TensorDataset, epochs: int) -> None:
    """Fine-tune with the seed's training-loop hooks, exactly where the seed design puts them."""
    pruner = prepared.pruner
    optimizer = torch.optim.Adam(prepared.parameters(), lr=1e-3)  # the prepared model owns the parameters
    # Optional: with the optimizer attached (no steps_per_epoch: the hooks keep driving epochs), the pruner
    # zeroes Adam's moments at pruned entries and skips re-zeroing weights after steps that provably kept them 0.
    pruner.attach(optimizer)
    criterion = nn.CrossEntropyLoss()
    prepared.train()
    for epoch in range(epochs):
        started = time.perf_counter()
        pruner.on_epoch_begin(epoch=epoch)  # raises the goal per the schedule and prunes up to it
        for batch_id, (x, label) in enumerate(loader):
            pruner.on_batch_begin(batch_id)
            y = prepared(x)
            loss = criterion(y, label)
            loss = pruner.on_minibatch_end(prepared, loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            pruner.on_batch_end()
        pruner.on_epoch_end(epoch=epoch)
        goals = ", ".join(f"{k}={v:.3f}" for k, v in pruner.current_goals().items())
        print(f"  prune epoch {epoch}: goals ({goals}), test accuracy {accuracy(predict(prepared, test), test):.4f}, "
              f"{time.perf_counter() - started:.1f} s", flush=True)


class Checks:
    """Collects pass/fail lines so that every check is printed and the exit code reflects all of them."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, ok: bool, what: str) -> None:
        print(f"CHECK {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failed.append(what)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "digits_cnn.yaml"), help="pruning YAML")
    parser.add_argument("--epochs-dense", type=int, default=8, help="epochs of dense training")
    parser.add_argument("--epochs-prune", type=int, default=7, help="epochs of fine-tuning with pruning")
    parser.add_argument("--seed", type=int, default=0, help="seed for init, data split and shuffling")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for this tiny model, above all on a busy machine)")
    parser.add_argument("--out", default=str(REPO / "outputs" / "digits_cnn_pruned.pt"),
                        help="where to save the converted model's state_dict")
    args = parser.parse_args(argv)

    start, start_cpu = time.perf_counter(), time.process_time()
    torch.set_num_threads(args.threads)
    config = fxprune.load_config(args.config)  # fail on a bad config before spending time on training
    torch.manual_seed(args.seed)
    train_set, test_set = load_digits_split(args.seed)
    loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    print(f"digits: {len(train_set)} train / {len(test_set)} test images, 8x8; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    # 1. Dense baseline.
    dense = DigitsCNN()
    print(f"training the dense model ({args.epochs_dense} epochs)", flush=True)
    train_dense(dense, loader, test_set, args.epochs_dense)
    dense_logits = predict(dense, test_set)
    dense_acc = accuracy(dense_logits, test_set)
    print(f"dense  test accuracy: {dense_acc:.4f}  ({args.epochs_dense} epochs)")

    # 2. Prepare and fine-tune with pruning. `dense` itself is not modified by prepare.
    prepared = fxprune.prepare(dense, config)
    print(f"config {args.config}; goal per epoch:")
    print(prepared.pruner.schedule_table(args.epochs_prune))
    train_pruned(prepared, loader, test_set, args.epochs_prune)
    pruned_logits = predict(prepared, test_set)
    pruned_acc = accuracy(pruned_logits, test_set)
    report = fxprune.sparsity_report(prepared)
    print(f"pruned test accuracy: {pruned_acc:.4f}  ({args.epochs_prune} epochs; "
          f"sparsity {report.pruned_sparsity:.4f} of the pruned weights, {report.sparsity:.4f} overall)")
    print(report)

    check = Checks()
    check(torch.equal(predict(dense, test_set), dense_logits), "prepare and pruning left the dense model untouched")
    goals = prepared.pruner.current_goals()
    for t in prepared.pruner.targets:
        row = report[t.name]
        expected = round(goals[t.pruner] * row.numel)
        check(abs(row.zeros - expected) <= 1,
              f"{t.name}: {row.zeros} zeros = goal {goals[t.pruner]:.3f} of {row.numel} (within one element)")

    # 3. Convert: a plain DigitsCNN with the masks folded in.
    converted = fxprune.convert(prepared)
    check(type(converted) is DigitsCNN, f"converted model is a DigitsCNN (got {type(converted).__name__})")
    check(not any(isinstance(m, (fxprune.MaskedParameter, fxprune.Pruner)) for m in converted.modules()),
          "no fxprune module left in the converted model")
    converted_logits = predict(converted, test_set)
    diff = float((converted_logits - pruned_logits).abs().max())
    check(diff <= 1e-5, f"converted logits equal the prepared model's (max abs diff {diff:.2e} <= 1e-5)")
    converted_acc = accuracy(converted_logits, test_set)
    check(converted_acc == pruned_acc, f"converted test accuracy {converted_acc:.4f} == pruned {pruned_acc:.4f}")
    converted_report = fxprune.sparsity_report(converted)
    check(all(converted_report[t.name].zeros == report[t.name].zeros for t in prepared.pruner.targets),
          "pruned weights are exactly zero in the converted model")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(converted.state_dict(), out)
    fresh = DigitsCNN()
    try:
        fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
        loaded = True
    except RuntimeError as e:  # missing/unexpected keys or shape mismatch
        print(e)
        loaded = False
    check(loaded, f"saved state_dict loads with strict=True into a fresh DigitsCNN ({out})")
    if loaded:
        check(torch.equal(predict(fresh, test_set), converted_logits), "the reloaded model gives the same logits")

    print(f"summary: dense {dense_acc:.4f} -> pruned {pruned_acc:.4f} at {report.pruned_sparsity:.1%} sparsity "
          f"of the pruned weights -> converted {converted_acc:.4f}; {time.perf_counter() - start:.1f} s wall, "
          f"{time.process_time() - start_cpu:.1f} s CPU")
    if check.failed:
        print(f"{len(check.failed)} check(s) FAILED", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
