"""DistributedDataParallel on 2 CPU processes (gloo, loopback): identical masks on every rank."""
from __future__ import annotations

import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str, scenario: str) -> None:
    # Imports inside: the worker runs in a fresh (spawned) interpreter.
    import fxprune
    from fxprune.distributed import check_masks_consistent, mask_checksums
    from torch.nn.parallel import DistributedDataParallel as DDP
    from training_helpers import TinyNet, batches, epoch_config, loss_fn, pruned_entries_are_zero

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    result: dict = {}
    try:
        prepared = fxprune.prepare(TinyNet(seed=0), epoch_config())
        if scenario == "train":
            model = DDP(prepared)  # broadcast_buffers=True: bool masks travel with the other buffers
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            prepared.pruner.attach(opt, steps_per_epoch=3)
            data = batches(3, seed=10 + rank)  # rank-local data
            zero = True
            for _ in range(5):
                for x, y in data:
                    loss = loss_fn(model, x, y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    zero &= pruned_entries_are_zero(prepared)
            check_masks_consistent(prepared.pruner)
            result["zero"] = zero
            del model, opt  # release DDP's reducer (and its gloo work) before the group goes away
        elif scenario == "diverged":
            # Weights that differ per rank (as rank-local scores would) give different local masks;
            # the broadcast after the update makes every rank take rank 0's.
            with torch.no_grad():
                for t in prepared.pruner.targets:
                    t.masked.param.copy_(torch.randn(t.masked.param.shape, generator=torch.Generator().manual_seed(rank)))
            local = fxprune.prepare(TinyNet(seed=0), epoch_config())
            local.pruner.sync_masks = False
            local.load_state_dict(prepared.state_dict())
            local.pruner.on_epoch_begin(0)
            prepared.pruner.on_epoch_begin(0)
            result["local_masks"] = {t.name: t.masked.mask.clone() for t in local.pruner.targets}
            try:
                check_masks_consistent(local.pruner)
                result["unsynced_error"] = None
            except fxprune.PruningError as e:
                result["unsynced_error"] = str(e)
            check_masks_consistent(prepared.pruner)
            result["zero"] = pruned_entries_are_zero(prepared)
        result["masks"] = {t.name: t.masked.mask.clone() for t in prepared.pruner.targets}
        result["params"] = {t.name: t.masked.param.detach().clone() for t in prepared.pruner.targets}
        result["checksums"] = mask_checksums(prepared.pruner)
        result["step"] = int(prepared.pruner.step)
        result["goals"] = prepared.pruner.current_goals()
    finally:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _run(tmp_path, scenario: str) -> list[dict]:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), scenario), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module", autouse=True)
def _gloo_available():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")


def test_ddp_training_keeps_identical_masks_and_weights_on_every_rank(tmp_path):
    r0, r1 = _run(tmp_path, "train")
    assert r0["step"] == r1["step"] == 15
    assert r0["goals"] == r1["goals"] == pytest.approx({"prune1": 0.8})
    assert r0["zero"] and r1["zero"]
    assert r0["checksums"] == r1["checksums"]
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        assert torch.equal(r0["params"][name], r1["params"][name]), name
        assert 0.79 < float((~r0["masks"][name]).float().mean()) < 0.81


def test_masks_from_rank_local_weights_are_broadcast_from_rank_0(tmp_path):
    r0, r1 = _run(tmp_path, "diverged")
    # without the broadcast the ranks disagree, and the consistency check says so on every rank
    assert any(not torch.equal(r0["local_masks"][n], r1["local_masks"][n]) for n in r0["local_masks"])
    assert r0["unsynced_error"] and r1["unsynced_error"]
    assert "masks differ between ranks" in r0["unsynced_error"]
    # with it every rank holds rank 0's masks, and stored pruned entries are zero everywhere
    for name in r0["masks"]:
        assert torch.equal(r1["masks"][name], r0["masks"][name]), name
        assert torch.equal(r0["masks"][name], r0["local_masks"][name]), name
    assert r0["zero"] and r1["zero"]
    assert r0["checksums"] == r1["checksums"]
