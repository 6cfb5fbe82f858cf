"""SigLIP's sigmoid loss against open_clip's `SigLipLoss` (loss and gradients, fp64, to 1e-6) on one process
and on 2 and 3 gloo ranks with the ring and the bidirectional exchange; W ranks of B against one process of
W * B; the duplicate rule (same image id or identical caption: positives); and the per-rank memory bound
(no tensor of B_local x B_global, checked on every op the loss and its backward run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gloo_ranks import run_on_ranks
from open_clip.loss import SigLipLoss
from torch.utils._python_dispatch import TorchDispatchMode

from vlp.platform.kernels import sigmoid_contrastive_loss_reference
from vlp.platform.losses import positive_pairs, sigmoid_loss

LOCAL_B, DIM = 6, 5
OPEN_CLIP_IMPL = {"ring": "shift", "bidirectional": "bidir"}


def _problem(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, DIM, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(batch, DIM, generator=gen, dtype=torch.float64) + image, dim=-1)
    return {"image": image, "text": text, "scale": torch.tensor(10.0, dtype=torch.float64),
            "bias": torch.tensor(-3.0, dtype=torch.float64)}  # fmt: skip


def _loss_and_grads(fn, problem: dict[str, torch.Tensor], rows: slice) -> dict[str, object]:
    leaves = {
        "image": problem["image"][rows].clone().requires_grad_(),
        "text": problem["text"][rows].clone().requires_grad_(),
        "scale": problem["scale"].clone().requires_grad_(),
        "bias": problem["bias"].clone().requires_grad_(),
    }
    loss = fn(leaves["image"], leaves["text"], leaves["scale"], leaves["bias"])
    loss.backward()
    return {"loss": loss.item(), **{name: leaf.grad.tolist() for name, leaf in leaves.items()}}


def _assert_same(got: dict, want: dict, tol: float = 1e-6) -> None:
    for key in want:
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), atol=tol, rtol=tol)


def test_one_process_equals_open_clip():
    problem = _problem(11)
    want = _loss_and_grads(SigLipLoss(), problem, slice(None))
    _assert_same(_loss_and_grads(sigmoid_loss, problem, slice(None)), want)
    _assert_same(_loss_and_grads(lambda *a: sigmoid_loss(*a, chunk_size=4), problem, slice(None)), want)


def _ranks_worker(rank: int, out_dir: str, world: int) -> None:
    problem = _problem(world * LOCAL_B)
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    results = {}
    for exchange, impl in OPEN_CLIP_IMPL.items():
        reference = SigLipLoss(rank=rank, world_size=world, dist_impl=impl)
        results[f"open_clip_{exchange}"] = _loss_and_grads(reference, problem, rows)
        results[exchange] = _loss_and_grads(
            lambda *a, exchange=exchange: sigmoid_loss(*a, exchange=exchange, chunk_size=4), problem, rows
        )
    # duplicates across ranks: every image id twice (rows i and i + LOCAL_B), one caption shared by two rows
    ids = torch.arange(world * LOCAL_B) % (world * LOCAL_B // 2)
    captions = torch.arange(world * LOCAL_B)[:, None].repeat(1, 3)
    captions[-1] = captions[0]
    for exchange in OPEN_CLIP_IMPL:
        results[f"duplicates_{exchange}"] = _loss_and_grads(
            lambda *a, exchange=exchange: sigmoid_loss(
                *a, image_ids=ids[rows], captions=captions[rows], exchange=exchange
            ),
            problem,
            rows,
        )
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_open_clip_and_one_process_of_the_whole_batch(world, tmp_path):
    run_on_ranks(_ranks_worker, tmp_path, world, world=world)
    ranks = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(world)]
    problem = _problem(world * LOCAL_B)
    whole = _loss_and_grads(sigmoid_contrastive_loss_reference, problem, slice(None))
    ids = torch.arange(world * LOCAL_B) % (world * LOCAL_B // 2)
    mask = ids[:, None] == ids[None, :]
    mask[0, -1] = mask[-1, 0] = True  # the shared caption
    whole_duplicates = _loss_and_grads(
        lambda *a: sigmoid_contrastive_loss_reference(*a, positive_mask=mask), problem, slice(None)
    )
    for exchange in OPEN_CLIP_IMPL:
        for r in range(world):
            _assert_same(ranks[r][exchange], ranks[r][f"open_clip_{exchange}"])
        for name, want in ((exchange, whole), (f"duplicates_{exchange}", whole_duplicates)):
            # the mean over ranks is the whole batch's loss; DDP averages the parameter gradients, and each
            # rank's embedding gradient is the sum over every rank's loss (the exchange's backward)
            got = {
                "loss": sum(rank[name]["loss"] for rank in ranks) / world,
                "image": [row for rank in ranks for row in rank[name]["image"]],
                "text": [row for rank in ranks for row in rank[name]["text"]],
                "scale": sum(rank[name]["scale"] for rank in ranks) / world,
                "bias": sum(rank[name]["bias"] for rank in ranks) / world,
            }
            got["image"] = (torch.tensor(got["image"]) / world).tolist()
            got["text"] = (torch.tensor(got["text"]) / world).tolist()
            _assert_same(got, want)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _memory_worker(rank: int, out_dir: str, local_b: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    image = F.normalize(torch.randn(local_b, dim, generator=gen), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(local_b, dim, generator=gen), dim=-1).requires_grad_()
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    ids = torch.arange(local_b) + rank * local_b
    largest = {}
    for exchange in OPEN_CLIP_IMPL:
        with _LargestTensor() as probe:
            sigmoid_loss(image, text, scale, bias, image_ids=ids, exchange=exchange).backward()
        largest[exchange] = probe.largest
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(largest))


def test_ring_allocates_nothing_larger_than_a_local_block(tmp_path):
    world, local_b, dim = 3, 24, 8
    run_on_ranks(_memory_worker, tmp_path, local_b, dim, world=world)
    for r in range(world):
        largest = json.loads(Path(tmp_path, f"rank{r}.json").read_text())
        for exchange, numel in largest.items():
            assert numel <= local_b * local_b, (exchange, numel)  # a gather would build [B, W * B] = 1728


def test_duplicates_are_positives_on_one_process():
    problem = _problem(8)
    ids = torch.tensor([0, 1, 1, 2, 3, 4, 5, 6])
    captions = torch.tensor([[5, 1], [6, 2], [7, 3], [8, 4], [5, 1], [9, 9], [9, 8], [9, 7]])
    mask = (ids[:, None] == ids[None, :]) | (captions[:, None] == captions[None, :]).all(-1)
    assert mask.sum() == 8 + 2 + 2  # rows 1 and 2 share an image, rows 0 and 4 a caption
    want = _loss_and_grads(
        lambda *a: sigmoid_contrastive_loss_reference(*a, positive_mask=mask), problem, slice(None)
    )
    got = _loss_and_grads(
        lambda *a: sigmoid_loss(*a, image_ids=ids, captions=captions, chunk_size=3), problem, slice(None)
    )
    _assert_same(got, want)
    open_clip = _loss_and_grads(SigLipLoss(), problem, slice(None))
    assert abs(open_clip["loss"] - got["loss"]) > 1e-3  # open_clip counts the duplicates as negatives


def test_positive_pairs_compares_in_tiles():
    keys = torch.tensor([[0, 1, 1], [1, 2, 2], [2, 1, 1], [1, 3, 3], [4, 5, 5]])
    pairs = positive_pairs(keys, keys, tile=2)
    expected = {(i, i) for i in range(5)} | {(0, 2), (2, 0), (1, 3), (3, 1)}
    assert {tuple(p) for p in pairs.tolist()} == expected and len(pairs) == len(expected)


def test_bad_exchange_and_shapes_raise():
    image, text = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="exchange"):
        sigmoid_loss(image, text, torch.tensor(1.0), torch.tensor(0.0), exchange="gather")
    with pytest.raises(ValueError, match="image and text"):
        sigmoid_loss(image, text[:3], torch.tensor(1.0), torch.tensor(0.0))
