"""MultiTaskDataModule: the MultiTaskSampler picks (objective, source) for each step.

Every rank draws the same objective (same seed, same state); each source is an endless stream of
batches sharded over ranks. The training loader is stateful, so a checkpoint continues exactly: the
sampler, each source's (epoch, position) and the step within the Lightning epoch are saved as of the
last batch the model consumed, not the last one prefetched. Loss feedback for the adaptive strategy is
applied with a fixed lag of two steps, the most Lightning's one-batch prefetch allows, so a resumed run
applies every observation at the same draw as an uninterrupted one.

Gradient accumulation (`trainer.accumulate_grad_batches: k`): a step is one optimizer step, made of k
batches (micro-batches) that all serve the objective the sampler drew for it, each of `batch_size`
samples read one after the other, so k micro-batches hold the samples one batch of k x `batch_size`
would. The sampler draws once per step, the streams advance once per micro-batch, and a Lightning epoch
holds whole steps (its batch count is a multiple of k), so checkpoints, taken between steps, resume at a
step's first micro-batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from vlp.datamodules.shapes import ShapesSource
from vlp.datamodules.source import DataSource, EndlessSampler, EpochIndexed
from vlp.platform.distributed.collectives import all_gather_objects
from vlp.platform.sampler import MultiTaskSampler, SamplingStrategy
from vlp.platform.step_plan import StepPlan

FEEDBACK_LAG = 2
# the loader's keys in a training batch, from the loader to `MultiTaskDataModule.on_before_batch_transfer`
# only: the objective drawn, the sampler's probabilities, the batch's index (for `consumed`)
LOADER_KEYS = ("objective", "objective_probabilities", "loader_index")
# a run's bad fraction is judged once this many samples were read (annotation entries, usable or not, and
# samples the loaders read, over all ranks), so one early bad entry or file cannot stop a run
MIN_SAMPLES_FOR_BAD_FRACTION = 100


class SourceStream:
    """Endless batches of one source's train split: reshuffles each epoch, resumes mid-epoch.

    One DataLoader serves every epoch (`EndlessSampler`), so its workers start once and keep prefetching
    across epoch boundaries; it is rebuilt only when a checkpoint's position is loaded. The position is
    kept in samples (this rank's, into the epoch's order), so a run resumed with another batch size
    continues at the first sample it has not trained on: the order depends on (seed, epoch) only.
    """

    def __init__(self, name: str, source: DataSource, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.name, self.source, self.seed = name, source, seed
        self.rank, self.world_size = rank, world_size
        self.dataset = source.dataset("train")
        if len(self.dataset) // world_size < source.batch_size:
            raise ValueError(
                f"source {name!r}: {len(self.dataset)} train items are fewer than one batch "
                f"({source.batch_size}) per rank"
            )
        self.batches_per_epoch = len(self.dataset) // world_size // source.batch_size
        self.epoch_samples = self.batches_per_epoch * source.batch_size  # whole batches per rank
        self.epoch, self.sample = 0, 0
        self._iterator: Iterator[dict] | None = None

    def _open(self) -> Iterator[dict]:
        batch_size = self.source.batch_size
        sampler = EndlessSampler(
            len(self.dataset),
            self.seed,
            batch_size,
            self.epoch,
            self.sample,
            self.rank,
            self.world_size,
        )
        loader = DataLoader(
            EpochIndexed(self.dataset),
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.source.collate,
            num_workers=self.source.num_workers,
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds, not the global RNG
        )
        return iter(loader)

    def next(self) -> dict:
        if self._iterator is None:
            self._iterator = self._open()
        batch = next(self._iterator)
        self.sample += self.source.batch_size
        if self.sample + self.source.batch_size > self.epoch_samples:
            self.epoch, self.sample = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "sample": self.sample, "batch_size": self.source.batch_size}

    def load_state_dict(self, state: dict) -> None:
        epoch = int(state["epoch"])
        if "sample" in state:
            sample = int(state["sample"])
        else:  # earlier versions kept the position in batches (of this run's batch size)
            sample = int(state["position"]) * self.source.batch_size
        if sample + self.source.batch_size > self.epoch_samples:  # not one more whole batch this epoch
            epoch, sample = epoch + 1, 0
        self.epoch, self.sample = epoch, sample
        self._iterator = None


class MultiTaskLoader:
    """The training iterable: `steps_per_epoch` batches. Each carries, under the loader's own keys
    (`LOADER_KEYS`), what the sampler drew and its index; the data module takes them out into its
    `step_plan` before the batch reaches the model."""

    def __init__(
        self,
        streams: dict[str, SourceStream],
        tasks: dict[str, str],
        sampler: MultiTaskSampler,
        steps_per_epoch: int,
        accumulate: int = 1,
    ) -> None:
        """`steps_per_epoch` counts batches; `accumulate` batches in a row serve one drawn objective."""
        if steps_per_epoch % accumulate:
            raise ValueError(
                f"data.steps_per_epoch ({steps_per_epoch}) must be a multiple of "
                f"trainer.accumulate_grad_batches ({accumulate}): an epoch holds whole optimizer steps"
            )
        self.streams, self.tasks, self.sampler = streams, tasks, sampler
        self.steps_per_epoch, self.accumulate = steps_per_epoch, accumulate
        self.produced = 0  # batches yielded so far (global index of the next one)
        self.objective: str | None = None  # what the current optimizer step serves
        self.step_in_epoch = 0
        self.applied_through = -1  # observations with index <= this are in the sampler
        self.observations: dict[int, dict[str, float]] = {}  # kept until the consumed snapshot holds them
        self.snapshots: dict[int, dict] = {}
        self.consumed_state: dict | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _snapshot(self) -> dict:
        return {
            "sampler": self.sampler.state_dict(),
            "streams": {name: stream.state_dict() for name, stream in self.streams.items()},
            "produced": self.produced,
            "objective": self.objective,
            "step_in_epoch": self.step_in_epoch,
            "applied_through": self.applied_through,
        }

    def _apply_observations(self) -> None:
        due = sorted(i for i in self.observations if self.applied_through < i <= self.produced - FEEDBACK_LAG)
        for index in due:
            self.sampler.observe(self.observations[index])
            self.applied_through = index

    def __iter__(self) -> Iterator[dict]:
        if self.step_in_epoch >= self.steps_per_epoch:
            self.step_in_epoch = 0
        while self.step_in_epoch < self.steps_per_epoch:
            self._apply_observations()
            if self.produced % self.accumulate == 0:
                self.objective = self.sampler.sample()
            name = self.objective
            batch = self.streams[self.tasks[name]].next()
            batch["objective"] = name
            batch["objective_probabilities"] = self.sampler.probabilities()
            batch["loader_index"] = self.produced
            self.produced += 1
            self.step_in_epoch += 1
            self.snapshots[self.produced - 1] = self._snapshot()
            yield batch

    def consumed(self, index: int) -> None:
        """The model is about to train on batch `index`: a checkpoint from now on resumes after it."""
        self.consumed_state = self.snapshots.pop(index)
        for stale in [i for i in self.snapshots if i < index]:
            del self.snapshots[stale]
        for applied in [i for i in self.observations if i <= self.consumed_state["applied_through"]]:
            del self.observations[applied]

    def observe(self, index: int, losses: dict[str, float]) -> None:
        self.observations[index] = losses

    def state_dict(self) -> dict:
        state = dict(self.consumed_state or self._snapshot())
        state["observations"] = {
            str(i): losses
            for i, losses in self.observations.items()
            if state["applied_through"] < i < state["produced"]
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        for name, stream_state in state["streams"].items():
            if name not in self.streams:
                raise ValueError(f"checkpoint has data source {name!r}; this run has {list(self.streams)}")
            self.streams[name].load_state_dict(stream_state)
        self.produced, self.step_in_epoch = int(state["produced"]), int(state["step_in_epoch"])
        self.objective = state.get("objective")
        self.applied_through = int(state["applied_through"])
        self.observations = {int(i): losses for i, losses in state["observations"].items()}
        self.snapshots, self.consumed_state = {}, None


class PaddingMarked(Dataset):
    """An eval split padded to a multiple of `world_size` the way DistributedSampler pads (repeating the
    first items), with each repeat marked: batches get `is_padding` [B] bool, so whole-split metrics count
    every sample once while every rank still runs as many batches (collectives stay in step)."""

    def __init__(self, dataset: Dataset, world_size: int) -> None:
        self.dataset, self.size = dataset, len(dataset)
        self.padded_size = -(-self.size // world_size) * world_size

    def __len__(self) -> int:
        return self.padded_size

    def __getitem__(self, index: int) -> tuple[dict, bool]:
        return self.dataset[index % self.size], index >= self.size

    @staticmethod
    def collate_with(collate: Callable[[list], dict]) -> Callable[[list[tuple[dict, bool]]], dict]:
        return partial(_collate_marked, collate)


def _collate_marked(collate: Callable[[list], dict], items: list[tuple[dict, bool]]) -> dict:
    batch = collate([item for item, _ in items])
    batch["is_padding"] = torch.tensor([padding for _, padding in items], dtype=torch.bool)
    return batch


class MultiTaskDataModule(LightningDataModule):
    """Sources by name, the objective -> source mapping, and the sampler that chooses between them.

    `tasks` defaults to every objective of the model on the first source. Validation and test use
    `eval_source` (default: the first source).

    Unusable samples (see `vlp.datamodules.images`) are counted per reason: those the sources dropped while
    reading their annotations (the same on every rank, counted once) and those each rank's loaders stepped
    over (`batch["skipped"]`, which the data module takes out of the batch). `sync_skipped` sums the loaders' counts over ranks into `skipped` and
    `samples_read`, the whole run's; past `max_bad_fraction` of the samples read the run stops with the
    counts. `SkippedSamplesMonitor` calls it on every rank at its logging steps, after validation and at
    the end.
    """

    def __init__(
        self,
        sources: dict[str, DataSource] | None = None,
        tasks: dict[str, str] | None = None,
        sampler: MultiTaskSampler | None = None,
        steps_per_epoch: int | None = None,
        eval_source: str | None = None,
        seed: int = 0,
        max_bad_fraction: float = 0.01,
    ) -> None:
        super().__init__()
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.sources = sources or {"shapes": ShapesSource()}
        self.tasks = tasks
        self.sampler = sampler or MultiTaskSampler(seed=seed)
        self.steps_per_epoch = steps_per_epoch
        self.eval_source = eval_source or next(iter(self.sources))
        self.seed = seed
        self.train_loader: MultiTaskLoader | None = None
        self.step_plan: StepPlan | None = None  # what the training batch the model is about to run serves
        if self.eval_source not in self.sources:
            raise ValueError(
                f"eval_source {self.eval_source!r} is not one of the sources {list(self.sources)}"
            )
        self.tokenizer = self._shared_tokenizer()
        self.annotation_skipped: Counter[str] = Counter()
        self.annotation_total = 0
        for source in self.sources.values():
            self.annotation_skipped.update(getattr(source, "skipped", {}))
            self.annotation_total += getattr(source, "total", 0)
        self.loader_skipped: Counter[str] = Counter()  # this rank's
        self.samples_loaded = 0  # this rank's, usable or not
        self.skipped, self.samples_read = Counter(self.annotation_skipped), self.annotation_total
        self.check_bad_fraction()

    def sync_skipped(self) -> None:
        """The whole run's counts into `skipped` / `samples_read`: annotation skips once, loader skips and
        samples summed over ranks (a collective: every rank calls it at the same point)."""
        skipped, samples = Counter(self.annotation_skipped), self.annotation_total
        for rank_skipped, rank_samples in all_gather_objects(
            (dict(self.loader_skipped), self.samples_loaded)
        ):
            skipped.update(rank_skipped)
            samples += rank_samples
        self.skipped, self.samples_read = skipped, samples

    def skipped_summary(self) -> str:
        """One line: skipped samples by reason out of the samples read."""
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items())) or "none"
        return f"skipped {sum(self.skipped.values())} of {self.samples_read} samples read ({counts})"

    def check_bad_fraction(self, minimum: int = MIN_SAMPLES_FOR_BAD_FRACTION) -> None:
        """Stop with the counts once more than `max_bad_fraction` of at least `minimum` samples were bad."""
        bad = sum(self.skipped.values())
        if self.samples_read >= max(minimum, 1) and bad > self.max_bad_fraction * self.samples_read:
            raise RuntimeError(
                f"data: more than max_bad_fraction={self.max_bad_fraction:g} of the samples are unusable: "
                f"{self.skipped_summary()}; fix the data (vlp data inspect) or raise data.max_bad_fraction"
            )

    def _shared_tokenizer(self) -> PreTrainedTokenizerBase:
        names = list(self.sources)
        first = self.sources[names[0]].tokenizer
        for name in names[1:]:
            if self.sources[name].tokenizer.get_vocab() != first.get_vocab():
                raise ValueError(
                    f"sources {names[0]!r} and {name!r} use different vocabularies; they must share one"
                )
        return first

    def resolve_tasks(self, objective_names: list[str]) -> dict[str, str]:
        """objective -> source, checked against the model's objectives and the sources."""
        tasks = self.tasks or {name: next(iter(self.sources)) for name in objective_names}
        missing = [name for name in objective_names if name not in tasks]
        if missing:
            raise ValueError(f"data.tasks has no source for objectives {missing}; it maps {tasks}")
        for objective, source in tasks.items():
            if source not in self.sources:
                raise ValueError(
                    f"data.tasks maps {objective!r} to unknown source {source!r}; sources: {list(self.sources)}"
                )
        return {name: tasks[name] for name in objective_names}

    def train_dataloader(self) -> MultiTaskLoader:
        objective_names = getattr(self.trainer.lightning_module, "objective_names", None) or list(
            self.tasks or {}
        )
        tasks = self.resolve_tasks(objective_names)
        rank, world = self.trainer.global_rank, self.trainer.world_size
        streams = {
            name: SourceStream(name, self.sources[name], self.seed, rank, world)
            for name in sorted(set(tasks.values()))
        }
        self.sampler.setup({name: len(streams[source].dataset) for name, source in tasks.items()})
        accumulate = self.trainer.accumulate_grad_batches
        steps = self.steps_per_epoch
        if steps is None:  # every source's batches per rank, cut to whole optimizer steps
            steps = min(len(s.dataset) // (s.source.batch_size * world) for s in streams.values())
            steps = steps // accumulate * accumulate
        if steps == 0:
            raise ValueError(
                f"an epoch of the train data holds fewer than trainer.accumulate_grad_batches ({accumulate}) "
                "batches per rank; lower it or the batch size"
            )
        self.train_loader = MultiTaskLoader(streams, tasks, self.sampler, steps, accumulate)
        return self.train_loader

    def _eval_loader(self, split: str) -> DataLoader:
        source = self.sources[self.eval_source]
        dataset: Dataset = source.dataset(split)
        collate = source.collate
        world = self.trainer.world_size if self.trainer is not None else 1
        if world > 1 and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            dataset = PaddingMarked(dataset, world)
            collate = dataset.collate_with(source.collate)
        return DataLoader(
            dataset,
            batch_size=source.batch_size,
            collate_fn=collate,
            num_workers=source.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        skipped = batch.pop("skipped", None)
        if skipped is not None:
            self.loader_skipped.update(skipped)
            self.samples_loaded += int(batch["image"].shape[0]) + sum(skipped.values())
        if "loader_index" in batch:
            objective, probabilities, index = (batch.pop(key) for key in LOADER_KEYS)
            self.step_plan = StepPlan(objective, probabilities)
            if self.train_loader is not None:
                self.train_loader.consumed(index)
        return batch

    @property
    def wants_losses(self) -> bool:
        """Whether the sampler's strategy uses loss feedback (only then is it worth a cross-rank reduce)."""
        return type(self.sampler.strategy).observe is not SamplingStrategy.observe

    def observe(self, losses: dict[str, float]) -> None:
        """Losses (already averaged over ranks) of the batch just trained, for the adaptive strategy."""
        if self.train_loader is not None:
            self.train_loader.observe(self.train_loader.consumed_state["produced"] - 1, losses)
