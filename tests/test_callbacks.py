"""Trainer callbacks: tiny real runs of PyTorch Lightning and the Hugging Face Trainer (CPU)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxprune
from fxprune.masks import count_to_prune
from training_helpers import TinyNet, assert_identical, epoch_config, pruned_entries_are_zero, snapshot, step_config

N, BATCH = 12, 4  # 3 batches per epoch


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(N, 12, generator=g), torch.randn(N, 4, generator=g))


def assert_at_goal(prepared, goal: float) -> None:
    assert prepared.pruner.current_goals() == pytest.approx({"prune1": goal})
    for t in prepared.pruner.targets:
        assert int((~t.masked.mask).sum()) == count_to_prune(goal, t.masked.mask.numel()), t.name
    assert pruned_entries_are_zero(prepared)


# ----------------------------------------------------------------------------- Lightning


def _lightning_run(config, epochs: int, accumulate: int = 1):
    pl = pytest.importorskip("lightning.pytorch")
    from fxprune.integrations.lightning import FxpruneCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = fxprune.prepare(TinyNet(), config)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    module = Module()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=accumulate,
        callbacks=[FxpruneCallback()],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about num_workers on a 12-sample set
        trainer.fit(module, DataLoader(dataset(), batch_size=BATCH, shuffle=False))
    return module.net, trainer


def test_lightning_callback_matches_a_plain_optimizer_mode_loop():
    prepared, trainer = _lightning_run(epoch_config(), epochs=5)
    assert trainer.global_step == 15 and int(prepared.pruner.step) == 15
    assert int(prepared.pruner.epoch) == 4
    assert_at_goal(prepared, 0.8)
    assert prepared.pruner.optimizers == []  # detached at the end of fit

    # oracle: the same model, data order and optimizer in a plain loop, schedule driven by optimizer mode
    plain = fxprune.prepare(TinyNet(), epoch_config())
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    plain.pruner.attach(opt, steps_per_epoch=3)
    for _ in range(5):
        for x, y in DataLoader(dataset(), batch_size=BATCH, shuffle=False):
            loss = F.mse_loss(plain(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    a, b = snapshot(prepared), snapshot(plain)
    a.pop("pruner.epoch"), b.pop("pruner.epoch")  # 4 (epoch begun) vs 15 // 3 = 5 (steps taken)
    assert_identical(a, b)


def test_lightning_callback_counts_optimizer_steps_not_batches():
    # accumulate 2 batches per step; Lightning also steps on the odd last batch of an epoch:
    # 2 steps per epoch x 6 epochs = 12 optimizer steps for 18 batches; step windows 0..8
    prepared, trainer = _lightning_run(step_config(start_step=0, end_step=8, frequency_steps=2), 6, accumulate=2)
    assert int(prepared.pruner.step) == trainer.global_step == 12
    assert_at_goal(prepared, 0.7)


# ---------------------------------------------------------------------- Hugging Face


class HFNet(nn.Module):
    """A model in the Trainer's shape: keyword inputs, a dict with the loss."""

    def __init__(self):
        super().__init__()
        self.body = TinyNet()

    def forward(self, x, labels):
        logits = self.body(x)
        return {"loss": F.mse_loss(logits, labels), "logits": logits}


class DictDataset(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = dataset().tensors

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_run(tmp_path, config, epochs: int, **kw):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from fxprune.integrations.huggingface import FxpruneTrainerCallback

    prepared = fxprune.prepare(HFNet(), config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        num_train_epochs=epochs,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **kw,
    )
    trainer = transformers.Trainer(
        model=prepared, args=args, train_dataset=DictDataset(), callbacks=[FxpruneTrainerCallback()]
    )
    trainer.train()
    return prepared, trainer


def test_hf_trainer_callback_drives_an_epoch_schedule(tmp_path):
    prepared, trainer = _hf_run(tmp_path, epoch_config(), epochs=5)
    assert trainer.state.global_step == 15 and int(prepared.pruner.step) == 15
    assert int(prepared.pruner.epoch) == 4
    assert_at_goal(prepared, 0.8)
    assert prepared.pruner.optimizers == []


def test_hf_trainer_callback_drives_a_step_schedule_with_accumulation(tmp_path):
    prepared, trainer = _hf_run(
        tmp_path, step_config(start_step=0, end_step=4, frequency_steps=2), epochs=4, gradient_accumulation_steps=3
    )
    assert trainer.state.global_step == 4 and int(prepared.pruner.step) == 4  # 12 batches / 3 per step
    assert_at_goal(prepared, 0.7)
