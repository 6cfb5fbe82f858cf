"""all_gather_with_grad, all_gather_many and the distributed contrastive loss, checked with 2 spawned CPU
processes (gloo)."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo_ranks import run_on_ranks

from vlp.platform.distributed.collectives import (
    all_gather_many,
    all_gather_with_grad,
    decide_over_ranks,
    is_distributed,
    rank,
    world_size,
)
from vlp.platform.kernels import contrastive_loss, contrastive_loss_reference

WORLD, LOCAL_B, FEATURES, DIM = 2, 6, 10, 8


def _problem() -> dict[str, torch.Tensor]:
    """Global batch [WORLD * LOCAL_B] of raw features and the parameters every rank holds."""
    gen = torch.Generator().manual_seed(0)
    return {
        "images": torch.randn(WORLD * LOCAL_B, FEATURES, generator=gen),
        "texts": torch.randn(WORLD * LOCAL_B, FEATURES, generator=gen),
        "image_proj": torch.randn(FEATURES, DIM, generator=gen),
        "text_proj": torch.randn(FEATURES, DIM, generator=gen),
        "log_scale": torch.tensor(2.0),
    }


def _loss(problem: dict[str, torch.Tensor], rows: slice, params: list[torch.Tensor], distributed: bool):
    image_proj, text_proj, log_scale = params
    image_emb = F.normalize(problem["images"][rows] @ image_proj, dim=-1)
    text_emb = F.normalize(problem["texts"][rows] @ text_proj, dim=-1)
    if distributed:
        return contrastive_loss(image_emb, text_emb, log_scale.exp(), chunk_size=4, backend="torch")
    return contrastive_loss_reference(image_emb, text_emb, log_scale.exp())


def _worker(local_rank: int, out_dir: str) -> None:
    x = torch.full((2, 3), float(local_rank), requires_grad=True)
    gathered = all_gather_with_grad(x)
    (gathered * (local_rank + 1)).sum().backward()

    # several tensors, two dtypes, one collective each: rank r holds features 10 r + (0..), ids 100 r + (0, 1)
    feats = (torch.arange(8.0).reshape(2, 2, 2) + 10 * local_rank).requires_grad_()
    vecs = (torch.arange(6.0).reshape(2, 3) - 10 * local_rank).requires_grad_()
    ids = torch.tensor([0, 1]) + 100 * local_rank
    many = all_gather_many([feats, ids, vecs], with_grad=True)
    # rank r weighs the gathered features by r + 1 and the vectors by 10 (r + 1): grads sum over ranks
    ((many[0] * (local_rank + 1)).sum() + (many[2] * 10 * (local_rank + 1)).sum()).backward()
    detached = all_gather_many([feats, vecs])

    problem = _problem()
    params = [problem[k].clone().requires_grad_() for k in ("image_proj", "text_proj", "log_scale")]
    rows = slice(local_rank * LOCAL_B, (local_rank + 1) * LOCAL_B)
    loss = _loss(problem, rows, params, distributed=True)
    loss.backward()
    for p in params:  # what DDP does to replicated parameters
        dist.all_reduce(p.grad)
        p.grad /= WORLD
    calls: list[str] = []
    barrier, all_reduce = dist.barrier, dist.all_reduce
    dist.barrier = lambda *a, **k: (calls.append("barrier"), barrier(*a, **k))[1]
    dist.all_reduce = lambda *a, **k: (calls.append("all_reduce"), all_reduce(*a, **k))[1]
    try:  # rank 0 says yes, rank 1 no; then both yes, both no
        first = local_rank == 0
        decisions = [decide_over_ranks(first), decide_over_ranks(first, all=False)]
        decisions += [decide_over_ranks(True), decide_over_ranks(False, all=False)]
    finally:
        dist.barrier, dist.all_reduce = barrier, all_reduce
    torch.save(
        {
            "decisions": (decisions, calls),
            "helpers": (is_distributed(), world_size(), rank()),
            "gathered": gathered.detach(),
            "gather_grad": x.grad,
            "many": [t.detach() for t in many],
            "many_grads": (feats.grad, vecs.grad),
            "detached_require_grad": [t.requires_grad for t in detached],
            "loss": loss.detach(),
            "grads": [p.grad for p in params],
        },
        Path(out_dir) / f"rank{local_rank}.pt",
    )


def test_helpers_outside_a_process_group_are_single_process_identities():
    t = torch.randn(3, 2)
    assert (is_distributed(), world_size(), rank()) == (False, 1, 0)
    assert all_gather_with_grad(t) is t
    assert decide_over_ranks(True) and not decide_over_ranks(False, all=False)
    ids = torch.arange(3)
    assert all(a is b for a, b in zip(all_gather_many([t, ids]), [t, ids], strict=True))


def test_gathering_many_needs_one_row_count(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("vlp.platform.distributed.collectives.is_distributed", lambda: True)
    with pytest.raises(ValueError, match=r"one row count, got \[2, 3\]"):
        all_gather_many([torch.zeros(2, 4), torch.zeros(3)])


def test_two_ranks_match_single_process_loss_and_gradients(tmp_path: Path):
    run_on_ranks(_worker, tmp_path, world=WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for r, res in enumerate(results):
        assert res["helpers"] == (True, WORLD, r)
        # all / any of the ranks' decisions, one all-reduce each and no barrier
        assert res["decisions"] == ([False, True, True, False], ["all_reduce"] * 4)
        expected = torch.cat([torch.zeros(2, 3), torch.ones(2, 3)])
        torch.testing.assert_close(res["gathered"], expected)
        # the backward sums over ranks: rank 0 weighs the gathered rows by 1, rank 1 by 2
        torch.testing.assert_close(res["gather_grad"], torch.full((2, 3), 3.0))
        feats, ids, vecs = res["many"]
        base = torch.arange(8.0).reshape(2, 2, 2)
        torch.testing.assert_close(feats, torch.cat([base, base + 10]))
        torch.testing.assert_close(ids, torch.tensor([0, 1, 100, 101]))
        assert ids.dtype == torch.long
        torch.testing.assert_close(
            vecs, torch.cat([torch.arange(6.0).reshape(2, 3) - 10 * k for k in (0, 1)])
        )
        torch.testing.assert_close(res["many_grads"][0], torch.full((2, 2, 2), 3.0))
        torch.testing.assert_close(res["many_grads"][1], torch.full((2, 3), 30.0))
        assert res["detached_require_grad"] == [False, False]

    problem = _problem()
    params = [problem[k].clone().requires_grad_() for k in ("image_proj", "text_proj", "log_scale")]
    loss = _loss(problem, slice(None), params, distributed=False)
    loss.backward()
    mean_rank_loss = torch.stack([res["loss"] for res in results]).mean()
    torch.testing.assert_close(mean_rank_loss, loss.detach(), atol=1e-5, rtol=0)
    for res in results:
        for grad, p in zip(res["grads"], params, strict=True):
            torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-6)
