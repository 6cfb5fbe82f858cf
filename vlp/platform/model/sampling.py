"""Nucleus sampling through a `DecodeStep` (the decoder's key/value cache), as BLIP's CapFilt captioner
samples its synthetic captions (top-p 0.9, repetition penalty 1.1, through transformers' `generate`).

One step, as transformers' sampling: the raw logits [N, V] go through the repetition penalty and the
minimum length, then temperature, top-k and top-p; one token per row is drawn from their softmax with
`torch.multinomial(probs, 1, generator=generator)`, every row every step (finished rows too, their token
replaced by PAD), so a seeded `generator` gives the same captions on every re-run of the same batch, and
the draws are the ones `generate` makes from the global generator seeded alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlp.platform.model.decoder import DecodeStep, _check_generation_args
from vlp.platform.model.logits_processors import (
    check_processor_args,
    forbid_eos_before,
    keep_top_k,
    keep_top_p,
    penalise_repetition,
    scale_by_temperature,
)


def sampling_distribution(
    ids: Tensor,
    logits: Tensor,
    eos_id: int,
    top_p: float = 0.9,
    top_k: int = 0,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    min_length: int = 0,
) -> Tensor:
    """Next-token probabilities [N, V] after ids [N, T] from the raw logits [N, V]."""
    scores = penalise_repetition(ids, logits.float(), repetition_penalty)
    scores = forbid_eos_before(ids, scores, min_length, eos_id)
    scores = keep_top_p(keep_top_k(scale_by_temperature(scores, temperature), top_k), top_p)
    return scores.softmax(dim=-1)


@torch.no_grad()
def nucleus_sampling(
    decode: DecodeStep,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int,
    generator: torch.Generator | None = None,
    top_p: float = 0.9,
    top_k: int = 0,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    min_length: int = 0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """One sampled caption per row: ids [B, T] without the BOS, `pad_id` after `eos_id`, T <= max_length
    (EOS counted; `min_length` likewise). `generator` (on the decoder's device): the draws' source."""
    _check_generation_args(batch_size, max_length)
    check_processor_args(repetition_penalty, min_length, max_length, temperature, top_p)
    ids = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for _ in range(max_length):
        probs = sampling_distribution(
            ids, decode(ids[:, -1], None), eos_id, top_p, top_k, temperature, repetition_penalty, min_length
        )
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        token = token.masked_fill(finished, pad_id)
        ids = torch.cat([ids, token[:, None]], dim=1)
        finished |= token == eos_id
        if finished.all():
            break
    return ids[:, 1:]
