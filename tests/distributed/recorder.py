"""A callback the multi-process CLI tests add with `--trainer.callbacks+=`: each rank appends what it saw
(objective, loss, shards) to its own JSON-lines file, flushed per step so a killed run leaves it behind."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.distributed.tensor import DTensor


class StepRecorder(Callback):
    """`pause_after_step`: rank 0 sleeps there (after that step's checkpoint), a window to kill the run."""

    def __init__(self, out_dir: str, pause_after_step: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.pause_after_step = pause_after_step

    def _write(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({**record, "pid": os.getpid()}) + "\n")
            f.flush()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        params = list(pl_module.parameters())
        sharded = [p for p in params if isinstance(p, DTensor)]
        self._write(
            trainer,
            {
                "event": "start",
                "world_size": trainer.world_size,
                "params": len(params),
                "dtensor_params": len(sharded),
                "local_numel": sum(p.to_local().numel() for p in sharded),
                "global_numel": sum(p.numel() for p in sharded),
            },
        )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: dict, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._write(
            trainer,
            {
                "event": "step",
                "step": trainer.global_step,
                "objective": trainer.datamodule.step_plan.objective,
                "loss": float(loss),
                "lr": [float(group["lr"]) for group in trainer.optimizers[0].param_groups],
            },
        )

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: dict, batch_idx: int
    ) -> None:
        rng = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12]
        self._write(trainer, {"event": "rng", "step": trainer.global_step, "torch_rng": rng})
        if trainer.global_step == self.pause_after_step and trainer.global_rank == 0:
            self._write(trainer, {"event": "paused", "step": trainer.global_step})
            time.sleep(120)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The sum of every full parameter (gathered from its shards), to check exported weights against."""
        sums = {}
        for name, param in pl_module.named_parameters():
            full = param.full_tensor() if isinstance(param, DTensor) else param
            sums[name] = float(full.detach().double().sum())
        self._write(trainer, {"event": "end", "param_sums": sums})


def _held(param: torch.Tensor, rank: int) -> torch.Tensor:
    """The part of `param` this rank stores: FSDP2's local shard, ZeRO-3's partition, or all of it.

    A ZeRO-3 partition ends in padding where the parameter does not split evenly (rank 1's partition of a
    one-element parameter is all padding): uninitialised memory, sometimes NaN, left out here."""
    if isinstance(param, DTensor):
        return param.to_local()
    partition = getattr(param, "ds_tensor", None)
    if partition is None:
        return param
    size = partition.numel()
    return partition[: max(0, min(size, param.ds_numel - rank * size))]


def _whole_and_partition_agree(params: Any, rank: int) -> dict[str, int]:
    """ZeRO-3 parameters kept whole (under the persistence threshold): how many there are and how many
    hold, at this rank's partition, the values of the partition itself."""
    whole = [p for p in params if hasattr(p, "ds_tensor") and p.data.numel() == p.ds_numel]
    agree = 0
    for param in whole:
        size = param.ds_tensor.numel()
        piece = param.data.reshape(-1)[rank * size : (rank + 1) * size]
        agree += bool(torch.equal(piece, param.ds_tensor[: piece.numel()]))
    return {"whole": len(whole), "agree": agree}


class MomentumRecorder(Callback):
    """After every optimizer step (and the EMA update after it), each rank appends per parameter the sum of
    what it stores of the online backbone and of its momentum copy, and the ITC queue's sums and pointer."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: dict, batch_idx: int
    ) -> None:
        backbone, rank = pl_module.backbone, trainer.global_rank
        copy = dict(backbone.momentum.backbone.named_parameters())
        online = {n: p for n, p in backbone.named_parameters() if not n.startswith("momentum.")}
        queue = pl_module.objectives["itc"].queue
        record = {
            "step": trainer.global_step,
            "online": {n: float(_held(p, rank).detach().double().sum()) for n, p in online.items()},
            "momentum": {n: float(_held(p, rank).double().sum()) for n, p in copy.items()},
            "held_numel": {n: _held(p, rank).numel() for n, p in copy.items()},
            "full_numel": {n: int(getattr(p, "ds_numel", p.numel())) for n, p in copy.items()},
            "online_held_numel": {n: _held(p, rank).numel() for n, p in online.items()},
            "dtensor": sorted({isinstance(p, DTensor) for p in copy.values()}),
            "whole_and_partition_agree": _whole_and_partition_agree(copy.values(), trainer.global_rank),
            "queue": [
                float(queue.image.double().sum()),
                float(queue.text.double().sum()),
                int(queue.pointer),
            ],
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"momentum{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
