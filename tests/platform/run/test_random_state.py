"""RandomStateCheckpoint across ranks: every rank's RNG state is saved, and each rank gets its own back."""

import random
from pathlib import Path

import numpy as np
import torch
from gloo_ranks import run_on_ranks

from vlp.platform.run.callbacks import RandomStateCheckpoint


class TwoRanks:
    world_size = 2

    def __init__(self, rank: int) -> None:
        self.global_rank = rank


def draws() -> list[float]:
    return [torch.rand(1).item(), float(np.random.rand()), random.random()]


def save_then_restore(rank: int, out_dir: str) -> None:
    torch.manual_seed(10 + rank), np.random.seed(20 + rank), random.seed(30 + rank)
    callback = RandomStateCheckpoint()
    callback.setup(TwoRanks(rank), None, "fit")
    state = callback.state_dict()  # a collective: every rank calls it, as in any checkpoint save
    expected = draws()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    restored = RandomStateCheckpoint()
    restored.load_state_dict(state)
    restored.on_train_start(TwoRanks(rank), None)
    torch.save((len(state["ranks"]), expected, draws()), Path(out_dir) / f"rank{rank}.pt")


def test_each_rank_restores_its_own_random_state(tmp_path):
    run_on_ranks(save_then_restore, tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for rank in (0, 1):
        saved_ranks, expected, got = results[rank]
        assert saved_ranks == 2
        assert got == expected, rank
    assert results[0][1] != results[1][1]  # the ranks really had different states
