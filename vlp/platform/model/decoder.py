"""Caption decoder (BLIP style) and batched generation: greedy and beam search.

The decoder shares the text tower's token + position embeddings and every fusion layer's cross-attention
and feed-forward weights, as BLIP shares them between its encoder and decoder; it owns only a causal
self-attention per fusion layer and the bias of an LM head tied to the word embeddings.

Generation runs one token per step through a key/value cache (`DecoderCache`): each layer's self-attention
keys and values of the earlier tokens, and the image's cross-attention keys and values computed once.
The search functions drive a `DecodeStep`: (new tokens [N], rows they continue [N] or None) -> next-token
logits [N, V]; beam search passes the rows so a cache can follow its beams. `prefix_decoding` adapts a
function of the whole prefix instead (no cache: the reference the cache is tested against).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.platform.kernels import linear_cross_entropy
from vlp.platform.model.encoders import TextEncoder
from vlp.platform.model.fusion import FusionEncoder, KeyValues, MultiHeadAttention
from vlp.platform.model.logits_processors import (
    check_processor_args,
    forbid_eos_before,
    penalise_repetition,
)

IGNORE_INDEX = -100

NextTokenLogits = Callable[[Tensor], Tensor]  # prefix ids [N, T] -> next-token logits [N, V]
DecodeStep = Callable[
    [Tensor, Tensor | None], Tensor
]  # (tokens [N], origin rows [N] | None) -> logits [N, V]


class CaptionDecoder(nn.Module):
    """Causal text decoder over image tokens: ids [B, L] + image tokens [B, N, Dv] -> hidden [B, L, D].

    `text` and `fusion` belong to the backbone; they are held outside this module's children so their
    parameters and state-dict keys exist once.
    """

    def __init__(self, text: TextEncoder, fusion: FusionEncoder) -> None:
        super().__init__()
        self._shared = (text, fusion)
        config = fusion.config
        self.self_attns = nn.ModuleList(
            MultiHeadAttention(text.width, config.heads, dropout=config.dropout) for _ in range(config.depth)
        )
        self.bias = nn.Parameter(torch.zeros(text.word_embeddings.num_embeddings))
        # per layer, a LayerNorm replacing the self-attention's (None: the layer's; BLIP's decoder has its own)
        self.self_norms: nn.ModuleList | None = None

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self._shared[0].word_embeddings

    def embed(self, input_ids: Tensor, start: int = 0) -> Tensor:
        """Token + position embeddings [B, L, D] of ids [B, L] at positions start, start + 1, ..."""
        return self._shared[0].embed(input_ids, start=start)

    def head_input(self, hidden: Tensor) -> Tensor:
        """What the tied LM head reads of the decoder's hidden states [..., D] (here: them as they are)."""
        return hidden

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_tokens: Tensor | None,
        image_bias: Tensor | None = None,
        image_kv: tuple[KeyValues, ...] | None = None,
    ) -> Tensor:
        """`image_bias` [B, N]: additive key bias on the image tokens (log token sizes after merging);
        `image_kv`: the fusion layers' keys and values of `image_tokens`, when computed already (then
        `image_tokens` may be None)."""
        text, fusion = self._shared
        if input_ids.shape[1] > text.max_len:
            raise ValueError(f"decoder input length {input_ids.shape[1]} exceeds text.max_len={text.max_len}")
        hidden = self.embed(input_ids)
        return fusion(
            hidden,
            attention_mask,
            image_tokens,
            image_bias=image_bias,
            causal=True,
            self_attns=self.self_attns,
            self_norms=self.self_norms,
            image_kv=image_kv,
        )

    def start(
        self,
        image_tokens: Tensor,
        image_bias: Tensor | None = None,
        image_kv: tuple[KeyValues, ...] | None = None,
    ) -> DecoderCache:
        """A cached generation over images [N, Ni, Dv] (one row per hypothesis): a `DecodeStep`."""
        fusion = self._shared[1]
        return DecoderCache(self, image_kv or fusion.image_key_values(image_tokens), image_bias)

    def logits(self, hidden: Tensor) -> Tensor:
        """Tied LM head: hidden [..., D] -> logits [..., V]."""
        return F.linear(self.head_input(hidden), self.word_embeddings.weight, self.bias)

    def loss(
        self, hidden: Tensor, targets: Tensor, label_smoothing: float = 0.0, chunk_size: int | None = None
    ) -> Tensor:
        """Mean next-token cross-entropy of hidden [B, L, D] against targets [B, L] (IGNORE_INDEX = skip),
        through the fused kernel so the [B * L, V] logits are never materialised."""
        keep = targets != IGNORE_INDEX
        return linear_cross_entropy(
            self.head_input(hidden[keep]),
            self.word_embeddings.weight,
            targets[keep],
            bias=self.bias,
            chunk_size=chunk_size,
            label_smoothing=label_smoothing,
        )


class DecoderCache:
    """The state of one batched generation: per layer the self-attention keys and values of the tokens so
    far and the image's cross-attention keys and values; calling it feeds the next tokens (a `DecodeStep`)."""

    def __init__(
        self, decoder: CaptionDecoder, image_kv: tuple[KeyValues, ...], image_bias: Tensor | None
    ) -> None:
        self.decoder = decoder
        self.image_kv = image_kv
        self.cross_mask = None if image_bias is None else image_bias[:, None, None, :]
        self.past: list[KeyValues | None] = [None] * len(image_kv)
        self.length = 0

    def __call__(self, tokens: Tensor, origin: Tensor | None = None) -> Tensor:
        """tokens [N] at the next position, `origin` [N]: the row each continues (beams reorder) -> [N, V]."""
        text, fusion = self.decoder._shared
        if self.length >= text.max_len:
            raise ValueError(f"generation past text.max_len={text.max_len} positions")
        if origin is not None:
            self.past = [None if kv is None else (kv[0][origin], kv[1][origin]) for kv in self.past]
        decoder = self.decoder
        hidden = decoder.embed(tokens[:, None], start=self.length)
        cross_mask = None if self.cross_mask is None else self.cross_mask.to(hidden.dtype)
        for i, layer in enumerate(fusion.layers):
            self_norm = None if decoder.self_norms is None else decoder.self_norms[i]
            hidden, self.past[i] = layer.decode_step(
                hidden, self.past[i], decoder.self_attns[i], self.image_kv[i], cross_mask, self_norm
            )
        self.length += 1
        return self.decoder.logits(fusion.norm(hidden)[:, 0])


def prefix_decoding(next_token_logits: NextTokenLogits) -> DecodeStep:
    """A `DecodeStep` that re-runs `next_token_logits` over the whole prefix each step (no cache)."""
    prefix: list[Tensor | None] = [None]

    def step(tokens: Tensor, origin: Tensor | None = None) -> Tensor:
        ids = prefix[0]
        if ids is not None and origin is not None:
            ids = ids[origin]
        ids = tokens[:, None] if ids is None else torch.cat([ids, tokens[:, None]], dim=1)
        prefix[0] = ids
        return next_token_logits(ids)

    return step


def shift_for_teacher_forcing(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[CLS] w1 .. wn [SEP] [PAD].. -> (inputs [B, L-1], their mask [B, L-1], targets [B, L-1]).

    Inputs are [CLS] w1 .. wn, targets w1 .. wn [SEP]; targets at padding are IGNORE_INDEX.
    """
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, L] with L >= 2, got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    targets = input_ids[:, 1:].masked_fill(~attention_mask[:, 1:].bool(), IGNORE_INDEX)
    return input_ids[:, :-1], attention_mask[:, :-1], targets


def _check_generation_args(batch_size: int, max_length: int, num_beams: int = 1) -> None:
    for name, value in (("batch_size", batch_size), ("max_length", max_length), ("num_beams", num_beams)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


@torch.no_grad()
def greedy_search(
    decode: DecodeStep,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int,
    device: torch.device | str = "cpu",
    repetition_penalty: float = 1.0,
    min_length: int = 0,
) -> Tensor:
    """Most likely token at each step; rows stop at `eos_id` and are padded with `pad_id` after it.
    `repetition_penalty` and `min_length` (EOS allowed from the `min_length`-th generated token on) act
    on the logits as transformers' processors do (`vlp.platform.model.logits_processors`).

    Returns generated ids [B, T] without the BOS, T <= max_length (shorter when every row stopped).
    """
    _check_generation_args(batch_size, max_length)
    check_processor_args(repetition_penalty, min_length, max_length)
    ids = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for _ in range(max_length):
        logits = decode(ids[:, -1], None).float()
        logits = forbid_eos_before(
            ids, penalise_repetition(ids, logits, repetition_penalty), min_length, eos_id
        )
        token = logits.argmax(-1)
        token = token.masked_fill(finished, pad_id)
        ids = torch.cat([ids, token[:, None]], dim=1)
        finished |= token == eos_id
        if finished.all():
            break
    return ids[:, 1:]


@torch.no_grad()
def beam_search(
    decode: DecodeStep,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int,
    num_beams: int,
    length_penalty: float = 1.0,
    device: torch.device | str = "cpu",
    repetition_penalty: float = 1.0,
    min_length: int = 0,
    early_stopping: Literal["exact", "heuristic"] = "exact",
) -> tuple[Tensor, Tensor]:
    """Beam search with `num_beams` beams per row, batched: `decode` sees [B * num_beams] tokens, batch-major
    (rows b * num_beams .. b * num_beams + num_beams - 1 belong to example b), with the rows they continue.

    A hypothesis scores sum(log p) / length ** length_penalty, length counting the generated tokens with
    the final `eos_id`; beams that reach `max_length` without it are scored as they are. A row stops once
    its `num_beams` best finished hypotheses cannot be beaten by any live beam (an exact bound); with
    `early_stopping="heuristic"` a row stops, as transformers' `generate` stops it by default (and so BLIP's
    captioner), once its `num_beams` finished hypotheses all score at least the best live beam normalised by
    the current length, and takes no hypothesis after that.
    With num_beams=1 and length_penalty=0 this is greedy search. `repetition_penalty` and `min_length` act
    on the log-probabilities as transformers' processors do in its beam search (BLIP: 3 beams, min 5).
    Returns (ids [B, T] without the BOS, `pad_id` after `eos_id`, T <= max_length; scores [B]).
    """
    _check_generation_args(batch_size, max_length, num_beams)
    check_processor_args(repetition_penalty, min_length, max_length)
    if early_stopping not in ("exact", "heuristic"):
        raise ValueError(f"early_stopping must be 'exact' or 'heuristic', got {early_stopping!r}")
    b, k = batch_size, num_beams
    stopped = torch.zeros(b, dtype=torch.bool, device=device)  # rows the heuristic has stopped
    ids = torch.full((b * k, 1), bos_id, dtype=torch.long, device=device)
    # all beams start identical: only the first may expand at step one, or the top k would be k copies
    alive = torch.full((b, k), float("-inf"), device=device)
    alive[:, 0] = 0.0
    done_scores = torch.full((b, k), float("-inf"), device=device)
    done_ids = torch.full((b, k, max_length), pad_id, dtype=torch.long, device=device)
    rows = torch.arange(b, device=device)[:, None]
    origin_rows = None  # the row of the previous step each beam continues
    for step in range(1, max_length + 1):
        log_probs = decode(ids[:, -1], origin_rows).float().log_softmax(-1)  # [B * k, V]
        log_probs = penalise_repetition(ids, log_probs, repetition_penalty)
        log_probs = forbid_eos_before(ids, log_probs, min_length, eos_id)
        vocab = log_probs.shape[-1]
        if vocab < 2 * k:
            raise ValueError(f"num_beams={k} needs a vocabulary of at least {2 * k} tokens, got {vocab}")
        scores = (alive.reshape(-1, 1) + log_probs).view(b, k * vocab)
        top_scores, top_index = scores.topk(2 * k, dim=1)  # each beam has one EOS: k non-EOS remain
        origin, token = top_index // vocab, top_index % vocab
        prefixes = ids.view(b, k, -1)[rows, origin]  # [B, 2k, step]
        candidates = torch.cat([prefixes[..., 1:], token[..., None]], dim=-1)

        ends = token == eos_id
        ranked = torch.arange(2 * k, device=device) < k
        new_done = torch.where(
            ends & ranked & ~stopped[:, None], top_scores / step**length_penalty, float("-inf")
        )
        padded = F.pad(candidates, (0, max_length - step), value=pad_id)
        done_scores, done_ids = _keep_best(done_scores, done_ids, new_done, padded, k)

        keep = top_scores.masked_fill(ends, float("-inf")).topk(k, dim=1).indices
        alive = top_scores.gather(1, keep)
        ids = prefixes[rows, keep].reshape(b * k, -1)
        origin_rows = (rows * k + origin.gather(1, keep)).reshape(-1)
        ids = torch.cat([ids, token.gather(1, keep).reshape(b * k, 1)], dim=1)

        if early_stopping == "heuristic":
            stopped |= done_scores[:, -1] >= alive[:, 0] / step**length_penalty
            if step < max_length and stopped.all():
                break
            continue
        # sum(log p) <= 0 only falls; the best normalised score then needs the largest length ** penalty
        best_denominator = max((step + 1) ** length_penalty, max_length**length_penalty)
        if step < max_length and (done_scores[:, -1] >= alive[:, 0] / best_denominator).all():
            break
    else:
        unfinished = (alive / max_length**length_penalty).masked_fill(stopped[:, None], float("-inf"))
        done_scores, done_ids = _keep_best(done_scores, done_ids, unfinished, ids.view(b, k, -1)[..., 1:], k)

    best = done_ids[:, 0]
    positions = torch.arange(1, max_length + 1, device=device)
    length = int(((best != pad_id) * positions).max().clamp(min=1))  # last generated token, over the batch
    return best[:, :length], done_scores[:, 0]


def _keep_best(
    scores: Tensor, ids: Tensor, new_scores: Tensor, new_ids: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Merge hypotheses [B, K1] + [B, K2] (ids [B, K, T]) and keep the k best, best first."""
    merged_scores = torch.cat([scores, new_scores], dim=1)
    best, index = merged_scores.topk(k, dim=1)
    merged_ids = torch.cat([ids, new_ids], dim=1)
    return best, merged_ids[torch.arange(ids.shape[0], device=ids.device)[:, None], index]
