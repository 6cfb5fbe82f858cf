"""A caption prompt (BLIP's "a picture of "): prefixed to every caption, never scored, fed before generating.

BLIP's captioner trains on "[DEC] a picture of <caption> [SEP]" with the prompt's targets ignored
(`blip_caption.py`: `decoder_targets[:, :prompt_length] = -100`) and generates from "[DEC] a picture of ",
returning what follows. Here the prompt's token ids go between a tokenized caption's first token and its words
(the same ids as tokenizing prompt + caption whenever the prompt ends at a word boundary, as "a picture of "
does), and a generation's `DecodeStep` is fed them before the search sees its first logits, so the cache,
greedy and beam search are unchanged and return the caption without the prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from vlp.platform.model.decoder import IGNORE_INDEX, DecodeStep


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt's token ids without special tokens ([] for "")."""
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []


def with_prompt(
    input_ids: Tensor, attention_mask: Tensor, prompt: list[int], max_len: int
) -> tuple[Tensor, Tensor]:
    """[CLS] w1 .. [SEP] [B, L] -> [CLS] p1 .. pP w1 .. [SEP] [B, min(L + P, max_len)] (cut at `max_len`)."""
    if not prompt:
        return input_ids, attention_mask
    b = input_ids.shape[0]
    ids = torch.tensor(prompt, dtype=input_ids.dtype, device=input_ids.device).expand(b, -1)
    ones = torch.ones_like(ids, dtype=attention_mask.dtype)
    input_ids = torch.cat([input_ids[:, :1], ids, input_ids[:, 1:]], dim=1)[:, :max_len]
    attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)[:, :max_len]
    return input_ids, attention_mask


def ignore_prompt(targets: Tensor, prompt: list[int]) -> Tensor:
    """Next-token targets [B, L - 1] with the prompt's own tokens (the first P targets) not scored."""
    if not prompt:
        return targets
    ignored = torch.full_like(targets[:, : len(prompt)], IGNORE_INDEX)
    return torch.cat([ignored, targets[:, len(prompt) :]], dim=1)


def prompted(decode: DecodeStep, prompt: list[int]) -> DecodeStep:
    """A `DecodeStep` that, on its first call (the BOS), also feeds the prompt's tokens and returns the
    logits after the last of them; later calls pass through."""
    if not prompt:
        return decode
    started = [False]

    def step(tokens: Tensor, origin: Tensor | None = None) -> Tensor:
        if started[0]:
            return decode(tokens, origin)
        started[0] = True
        logits = decode(tokens, origin)
        for token in prompt:
            logits = decode(torch.full_like(tokens, token), None)
        return logits

    return step
