"""The contract a data source fulfils for MultiTaskDataModule, and the resumable per-source sampling."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


class DataSource(ABC):
    """Datasets per split plus their collate function; batches are dicts with the documented keys.

    Batch keys every source provides: `image` [B, 3, H, W] float, `image_id` [B] long, `input_ids` and
    `attention_mask` [B, L] long (the caption with [CLS] ... [SEP]). Sources with referring phrases add
    `phrase_input_ids`, `phrase_attention_mask` [B, Lp] and `boxes` [B, 4] (normalised cx, cy, w, h);
    caption sources add `references` (list of lists of str) to evaluation batches. Sources whose images
    have several captions also tokenize them all for evaluation: `reference_input_ids`,
    `reference_attention_mask` [R, Lr] and `reference_row` [R] long (the batch row of each caption's image);
    retrieval then ranks every caption (a text matches its image), otherwise the `input_ids` captions.
    Besides the two methods a source has the attributes `tokenizer` (PreTrainedTokenizerBase),
    `batch_size` and `num_workers`.

    Sources that read files follow the bad-input policy of `vlp.datamodules.images`: batches carry
    `skipped` (reason -> count of samples stepped over), and the source may have `skipped` (a Counter of
    entries dropped while reading its annotations) and `total` (entries read, usable or not).
    """

    @abstractmethod
    def dataset(self, split: str) -> Dataset: ...

    @abstractmethod
    def collate(self, items: list[dict]) -> dict: ...


def shard_order(size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Rank `rank`'s indices of epoch `epoch`: a permutation drawn from (seed, epoch), every world-th index
    (the tail that does not divide evenly is dropped so every rank sees the same count)."""
    if size < world_size:
        raise ValueError(f"dataset of {size} items cannot be sharded over {world_size} ranks")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(size, generator=generator)
    per_rank = size // world_size
    return order[rank : per_rank * world_size : world_size].tolist()


class EndlessSampler(Sampler[tuple[int, int]]):
    """(epoch, index) pairs without end, from sample `start` into `epoch` on: each epoch is `shard_order` cut
    to whole batches of `batch_size`, so one long-lived DataLoader over it (its workers kept across
    epochs) yields exactly the batches that a fresh drop-last loader per epoch would. A `start` that is no
    multiple of `batch_size` (a run resumed with another batch size) cuts that first epoch to whole
    batches from `start` on, so no batch mixes two epochs."""

    def __init__(
        self,
        size: int,
        seed: int,
        batch_size: int,
        epoch: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.size, self.seed, self.batch_size, self.epoch, self.start = size, seed, batch_size, epoch, start
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = size // world_size // batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.epoch, self.start
        while True:
            order = shard_order(self.size, self.seed, epoch, self.rank, self.world_size)
            end = self.batches_per_epoch * self.batch_size
            for index in order[start : start + (end - start) // self.batch_size * self.batch_size]:
                yield epoch, index
            epoch, start = epoch + 1, 0


class EpochIndexed(Dataset):
    """`dataset` indexed by (epoch, index): sets the epoch (training draws another caption and crop per epoch)
    in whichever process reads, so a persistent loader worker follows the epochs too."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]
