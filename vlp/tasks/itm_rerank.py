"""Retrieval with ITM re-ranking (the ALBEF / BLIP protocol): rank by ITC similarity over the whole split,
then re-score each query's top-k candidates with the ITM head and rank those by their match logit.

Chunked: pairs go through fusion `chunk` at a time, so a 5k x 25k split never holds more than the unimodal
tokens and one chunk of fused pairs. Sharded: rank r re-scores queries r, r + W, ... and the rows are summed
over ranks, so W ranks share the work and all end with the same matrices.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from vlp.platform.distributed.collectives import is_distributed, rank, world_size

PairScorer = Callable[[Tensor, Tensor], Tensor]  # (image rows [P], text rows [P]) -> match logits [P]


def rerank_scores(
    similarity: Tensor, k: int, score_pairs: PairScorer, chunk: int = 256
) -> tuple[Tensor, Tensor]:
    """ITM scores of each query's top-k ITC candidates; the other candidates rank below them in ITC order.

    similarity [N_img, N_txt] (ITC). Returns (i2t [N_img, N_txt]: row i scores image i's texts,
    t2i [N_img, N_txt]: column j scores text j's images); both are fed to retrieval recall as they are.
    """
    n_img, n_txt = similarity.shape
    i2t = _rescored(similarity, min(k, n_txt), score_pairs, chunk, images_are_queries=True)
    t2i = _rescored(similarity.T, min(k, n_img), score_pairs, chunk, images_are_queries=False).T
    return i2t, t2i


def _rescored(
    scores: Tensor, k: int, score_pairs: PairScorer, chunk: int, images_are_queries: bool
) -> Tensor:
    """Rows are queries; this rank re-scores rows rank, rank + W, ...; summed over ranks."""
    candidates = scores.topk(k, dim=1).indices  # [Q, k]
    mine = torch.arange(rank(), scores.shape[0], world_size(), device=scores.device)
    queries = mine.repeat_interleave(k)
    keys = candidates[mine].reshape(-1)
    logits = torch.cat(
        [
            score_pairs(*((q, c) if images_are_queries else (c, q)))
            for q, c in zip(queries.split(chunk), keys.split(chunk), strict=True)
        ]
        or [scores.new_zeros(0)]
    )
    out = torch.zeros_like(scores, dtype=torch.float32)
    out[queries, keys] = logits.float()
    hit = torch.zeros_like(out, dtype=torch.bool)
    hit[torch.arange(scores.shape[0], device=scores.device).repeat_interleave(k), candidates.reshape(-1)] = (
        True
    )
    if is_distributed():
        dist.all_reduce(out)
    # the rest keep their ITC order below every re-scored candidate, so R@K beyond k is ITC's
    # (by ITC rank, not by value: near-equal similarities must not collapse into ties)
    floor = out.masked_fill(~hit, torch.inf).amin(dim=1, keepdim=True) - 1
    itc_rank = scores.argsort(dim=1, descending=True).argsort(dim=1)
    below = floor - itc_rank.float()
    return torch.where(hit, out, below)
