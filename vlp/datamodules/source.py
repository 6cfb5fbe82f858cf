"""The contract a data source fulfils for MultiTaskDataModule, and the resumable per-source sampler."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

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


class ResumableSampler(Sampler[int]):
    """A seeded shuffle per epoch, sharded over ranks, that can start part-way into an epoch.

    The order of epoch e is a permutation drawn from (seed, e); rank r takes every world-th index
    (the tail that does not divide evenly is dropped so every rank sees the same count).
    """

    def __init__(
        self, size: int, seed: int, epoch: int = 0, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if size < world_size:
            raise ValueError(f"dataset of {size} items cannot be sharded over {world_size} ranks")
        self.size, self.seed, self.epoch, self.start = size, seed, epoch, start
        self.rank, self.world_size = rank, world_size

    def indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        per_rank = self.size // self.world_size
        return order[self.rank : per_rank * self.world_size : self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.size // self.world_size - self.start
