from itertools import islice

import pytest
import torch

from vlp.datamodules.multitask import MultiTaskDataModule, MultiTaskLoader, SourceStream
from vlp.datamodules.shapes import ShapesSource
from vlp.datamodules.source import EndlessSampler, shard_order
from vlp.platform.sampler import Adaptive, MultiTaskSampler, Temperature

TASKS = {"itc": "a", "itm": "a", "grounding": "b"}


def make_loader(strategy=None, steps=10) -> MultiTaskLoader:
    sources = {
        "a": ShapesSource(image_size=32, num_train=40, num_val=8, num_test=8, batch_size=4, seed=1),
        "b": ShapesSource(image_size=32, num_train=24, num_val=8, num_test=8, batch_size=4, seed=2),
    }
    streams = {name: SourceStream(name, source, seed=7) for name, source in sources.items()}
    sampler = MultiTaskSampler(strategy, seed=3)
    sampler.setup({task: len(streams[src].dataset) for task, src in TASKS.items()})
    return MultiTaskLoader(streams, TASKS, sampler, steps)


def fake_loss(objective: str, index: int) -> float:
    return (
        {"itc": 3.0, "itm": 0.7, "grounding": 1.5}[objective] * (1 - 0.01 * index)
        if objective != "itm"
        else 0.7
    )


def run(loader: MultiTaskLoader, epochs: int, stop_after: int | None = None) -> list[tuple]:
    """Iterate like Lightning: one batch prefetched, consumed, then the loss observed."""
    seen = []
    for _ in range(epochs):
        iterator = iter(loader)
        pending = next(iterator, None)
        while pending is not None:
            batch, pending = pending, next(iterator, None)  # prefetch the next batch first
            loader.consumed(batch.pop("loader_index"))
            seen.append((batch["objective"], tuple(batch["image_id"].tolist())))
            index = loader.consumed_state["produced"] - 1
            loader.observe(index, {batch["objective"]: fake_loss(batch["objective"], index)})
            if stop_after is not None and len(seen) == stop_after:
                return seen
    return seen


@pytest.mark.parametrize("strategy", [None, Temperature(2.0), Adaptive(warmup_observations=2, tau=0.05)])
def test_resume_mid_epoch_continues_the_identical_sequence(strategy):
    full = run(make_loader(strategy), epochs=3)
    first = make_loader(strategy)
    head = run(first, epochs=3, stop_after=13)
    state = first.state_dict()
    second = make_loader(strategy)
    second.load_state_dict(torch.load(_roundtrip(state), weights_only=True))
    tail = run(second, epochs=2)  # 3 left in epoch 2, then the whole epoch 3 (plus one spare epoch)
    assert head + tail[: len(full) - len(head)] == full
    assert len(set(full)) > 10  # sources reshuffle and objectives vary


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_objectives_go_to_their_source_and_epochs_have_fixed_length():
    loader = make_loader(steps=7)
    batches = list(loader)
    assert len(batches) == len(loader) == 7
    for batch in batches:
        assert batch["image"].shape == (4, 3, 32, 32)
    assert {b["objective"] for b in batches} == {"itc", "itm", "grounding"}


def test_each_source_cycles_through_its_whole_split_before_repeating():
    stream = SourceStream(
        "a", ShapesSource(image_size=32, num_train=12, num_val=8, num_test=8, batch_size=4), seed=0
    )
    ids = [stream.next()["image_id"].tolist() for _ in range(6)]
    first_epoch, second_epoch = sum(ids[:3], []), sum(ids[3:], [])
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(12))
    assert first_epoch != second_epoch  # reshuffled


def test_ranks_get_disjoint_equal_shards():
    shards = [shard_order(10, seed=0, epoch=1, rank=r, world_size=3) for r in range(3)]
    assert all(len(s) == 3 for s in shards)
    assert len(set(sum(shards, []))) == 9


@pytest.mark.parametrize(("start", "kept"), [(0, 18), (6, 12), (7, 6), (12, 6), (13, 0), (17, 0), (18, 0)])
def test_endless_sampler_starts_part_way_and_runs_on_in_whole_batches(start, kept):
    """20 items in batches of 6: an epoch is 18; from `start` on, the first epoch keeps the whole batches
    that fit (a start off the batch grid is a run resumed with another batch size), so none mixes epochs."""
    pairs = list(islice(EndlessSampler(20, seed=5, batch_size=6, epoch=2, start=start), kept + 18))
    epoch2, epoch3 = shard_order(20, seed=5, epoch=2), shard_order(20, seed=5, epoch=3)
    assert pairs == [(2, i) for i in epoch2[start : start + kept]] + [(3, i) for i in epoch3[:18]]


def test_loader_workers_live_across_epochs_and_follow_them():
    def batches(workers: int) -> tuple[list[dict], list[object]]:
        source = ShapesSource(
            image_size=32, num_train=12, num_val=8, num_test=8, batch_size=4, num_workers=workers
        )
        stream = SourceStream("a", source, seed=0)
        out, iterators = [], []
        for _ in range(9):  # 3 epochs of 3 batches
            out.append(stream.next())
            iterators.append(stream._iterator)
        return out, iterators

    in_process, _ = batches(0)
    with_worker, iterators = batches(1)
    assert all(iterator is iterators[0] for iterator in iterators)  # one loader, its worker started once
    for a, b in zip(in_process, with_worker, strict=True):  # the worker draws each epoch's captions and crops
        assert a["captions"] == b["captions"]
        torch.testing.assert_close(a["image"], b["image"], atol=0, rtol=0)
    assert in_process[0]["captions"] != in_process[3]["captions"]


def test_datamodule_checks_tasks_against_sources():
    dm = MultiTaskDataModule(
        sources={"a": ShapesSource(image_size=32, num_train=16, num_val=8, num_test=8, batch_size=4)},
        tasks={"itc": "z"},
    )
    with pytest.raises(ValueError, match="unknown source 'z'"):
        dm.resolve_tasks(["itc"])
    with pytest.raises(ValueError, match=r"no source for objectives \['itm'\]"):
        dm.resolve_tasks(["itc", "itm"])
    with pytest.raises(ValueError, match="eval_source"):
        MultiTaskDataModule(sources={"a": dm.sources["a"]}, eval_source="b")
