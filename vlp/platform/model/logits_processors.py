"""What generation does to the next-token scores before it chooses, as transformers (and so BLIP) defines it.

Each function takes the ids so far [N, T] (the start token included, as transformers' `input_ids` include the
prompt) and scores [N, V], and returns new scores [N, V]:
- `penalise_repetition` (`RepetitionPenaltyLogitsProcessor`): every token already in a row's ids has its
  score divided by `penalty` when positive, multiplied when negative (so it always falls for penalty > 1).
- `forbid_eos_before` (`MinLengthLogitsProcessor`): EOS scores -inf while the ids hold fewer than
  `min_length` tokens; with one start token, EOS can be at most the `min_length`-th generated token.
- `scale_by_temperature`, `keep_top_k`, `keep_top_p` (the sampling warpers): scores / temperature; the k
  highest kept, the rest -inf; the smallest set of highest-probability tokens whose probability reaches
  `top_p` kept (tokens whose cumulative probability from the least likely up is <= 1 - top_p removed), at
  least one.
Greedy and sampling apply them to the raw logits, beam search to the log-probabilities (as transformers does).
"""

from __future__ import annotations

import torch
from torch import Tensor


def penalise_repetition(ids: Tensor, scores: Tensor, penalty: float) -> Tensor:
    """ids [N, T], scores [N, V] -> scores with the tokens of each row's ids penalised (1.0: unchanged)."""
    if penalty == 1.0:
        return scores
    seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, ids, True)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def forbid_eos_before(ids: Tensor, scores: Tensor, min_length: int, eos_id: int) -> Tensor:
    """EOS at -inf while ids [N, T] hold fewer than `min_length` tokens (0: unchanged)."""
    if ids.shape[1] >= min_length:
        return scores
    scores = scores.clone()
    scores[:, eos_id] = float("-inf")
    return scores


def scale_by_temperature(scores: Tensor, temperature: float) -> Tensor:
    return scores if temperature == 1.0 else scores / temperature


def keep_top_k(scores: Tensor, top_k: int) -> Tensor:
    """The `top_k` highest scores per row, the others -inf (0: all kept)."""
    if top_k <= 0 or top_k >= scores.shape[-1]:
        return scores
    threshold = scores.topk(top_k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < threshold, float("-inf"))


def keep_top_p(scores: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering: the most likely tokens up to cumulative probability `top_p` (1.0: all kept)."""
    if top_p >= 1.0:
        return scores
    ascending, order = scores.sort(dim=-1, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= 1 - top_p
    remove[..., -1:] = False  # the most likely token always stays
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def check_processor_args(
    repetition_penalty: float, min_length: int, max_length: int, temperature: float = 1.0, top_p: float = 1.0
) -> None:
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if not isinstance(min_length, int) or not 0 <= min_length <= max_length:
        raise ValueError(f"min_length must be an int in [0, max_length={max_length}], got {min_length!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
