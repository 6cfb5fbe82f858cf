"""vlp's generation against transformers' `generate` on a tiny random causal LM: greedy and beam search with
BLIP's repetition penalty and minimum length, and nucleus sampling with the same random draws, give the same
token ids; the processors alone equal transformers' processor classes on random scores."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.logits_process import (
    MinLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlp.platform.model.decoder import beam_search, greedy_search, prefix_decoding
from vlp.platform.model.logits_processors import (
    forbid_eos_before,
    keep_top_k,
    keep_top_p,
    penalise_repetition,
    scale_by_temperature,
)
from vlp.platform.model.sampling import nucleus_sampling

PAD, BOS, EOS, VOCAB = 0, 1, 2, 24


@pytest.fixture(scope="module")
def lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # distributions neither flat nor certain, EOS likely enough to stop rows early
        model.lm_head.weight.normal_(0.0, 0.5)
        model.lm_head.weight[EOS] += 0.3 * model.lm_head.weight[EOS].sign()
    return model


def hf_generate(lm: GPT2LMHeadModel, batch: int, max_length: int, **settings) -> torch.Tensor:
    """transformers' ids for `batch` rows starting at BOS, without it and with trailing all-PAD columns cut."""
    start = torch.full((batch, 1), BOS)
    with torch.no_grad():
        out = lm.generate(
            start,
            attention_mask=torch.ones_like(start),
            max_length=max_length + 1,  # transformers counts the start token; vlp the generated ones
            eos_token_id=EOS,
            pad_token_id=PAD,
            bos_token_id=BOS,
            **settings,
        )
    return out[:, 1:]


def step_of(lm: GPT2LMHeadModel):
    return prefix_decoding(lambda ids: lm(ids).logits[:, -1])


@pytest.mark.parametrize("penalty, min_length", [(1.0, 0), (1.3, 5), (0.5, 3)])
def test_greedy_with_repetition_penalty_and_min_length_equals_transformers(
    lm, penalty, min_length, one_thread
):
    expected = hf_generate(
        lm, 6, 12, do_sample=False, repetition_penalty=penalty, min_length=min_length, num_beams=1
    )
    ours = greedy_search(
        step_of(lm), 6, BOS, EOS, PAD, max_length=12, repetition_penalty=penalty, min_length=min_length
    )
    assert torch.equal(ours, expected)
    if (penalty, min_length) != (1.0, 0):  # the settings change what is generated here
        assert not torch.equal(ours, greedy_search(step_of(lm), 6, BOS, EOS, PAD, max_length=12))
    if min_length:
        ends = (ours == EOS).float().argmax(-1)
        assert (
            ends[(ours == EOS).any(-1)] >= min_length - 1
        ).all()  # EOS is at least the min_length-th token


@pytest.mark.parametrize("penalty, min_length", [(1.0, 0), (1.5, 5)])
def test_beam_search_with_blip_settings_equals_transformers(lm, penalty, min_length, one_thread):
    settings = {"repetition_penalty": penalty, "min_length": min_length}
    expected = hf_generate(lm, 4, 10, do_sample=False, num_beams=3, length_penalty=1.0, **settings)
    ours, _ = beam_search(step_of(lm), 4, BOS, EOS, PAD, max_length=10, num_beams=3, **settings)
    width = max(ours.shape[1], expected.shape[1])
    pad = lambda ids: torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=PAD)  # noqa: E731
    assert torch.equal(pad(ours), pad(expected))
    if penalty != 1.0:
        plain, _ = beam_search(step_of(lm), 4, BOS, EOS, PAD, max_length=10, num_beams=3)
        assert not torch.equal(pad(ours), pad(plain))


@pytest.mark.parametrize(
    "settings",
    [
        {"top_p": 0.9, "repetition_penalty": 1.1, "min_length": 5},  # BLIP's CapFilt captioner
        {"top_p": 0.8, "top_k": 5, "temperature": 1.3},
        {"top_p": 1.0, "temperature": 1.5},
    ],
)
def test_nucleus_sampling_draws_what_transformers_draws_from_the_same_seed(lm, settings, one_thread):
    hf_settings = {"top_k": 0, **settings}  # transformers' default top_k is 50
    torch.manual_seed(7)
    expected = hf_generate(lm, 8, 12, do_sample=True, **hf_settings)
    generator = torch.Generator().manual_seed(7)
    ours = nucleus_sampling(step_of(lm), 8, BOS, EOS, PAD, max_length=12, generator=generator, **settings)
    assert torch.equal(ours, expected)
    again = nucleus_sampling(
        step_of(lm), 8, BOS, EOS, PAD, max_length=12, generator=torch.Generator().manual_seed(7), **settings
    )
    assert torch.equal(again, ours)
    other = nucleus_sampling(
        step_of(lm), 8, BOS, EOS, PAD, max_length=12, generator=torch.Generator().manual_seed(8), **settings
    )
    assert not torch.equal(other, ours)


def test_processors_equal_transformers_processors_on_random_scores():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (5, 7))
    scores = torch.randn(5, VOCAB) * 3
    pairs = [
        (penalise_repetition(ids, scores, 1.2), RepetitionPenaltyLogitsProcessor(1.2)(ids, scores.clone())),
        (forbid_eos_before(ids, scores, 8, EOS), MinLengthLogitsProcessor(8, EOS)(ids, scores.clone())),
        (forbid_eos_before(ids, scores, 7, EOS), MinLengthLogitsProcessor(7, EOS)(ids, scores.clone())),
        (scale_by_temperature(scores, 0.6), TemperatureLogitsWarper(0.6)(ids, scores.clone())),
        (keep_top_k(scores, 4), TopKLogitsWarper(4)(ids, scores.clone())),
        (keep_top_p(scores, 0.9), TopPLogitsWarper(0.9)(ids, scores.clone())),
        (keep_top_p(scores, 0.05), TopPLogitsWarper(0.05)(ids, scores.clone())),
    ]
    for ours, theirs in pairs:
        assert torch.equal(ours, theirs)
    assert (keep_top_p(scores, 0.05) > float("-inf")).sum(-1).min() == 1  # the most likely token stays


def test_generation_rejects_bad_processor_settings(lm):
    with pytest.raises(ValueError, match="top_p"):
        nucleus_sampling(step_of(lm), 1, BOS, EOS, PAD, max_length=4, top_p=0.0)
    with pytest.raises(ValueError, match="min_length"):
        greedy_search(step_of(lm), 1, BOS, EOS, PAD, max_length=4, min_length=5)
    with pytest.raises(ValueError, match="repetition_penalty"):
        beam_search(step_of(lm), 1, BOS, EOS, PAD, max_length=4, num_beams=2, repetition_penalty=0.0)


def boosted_lm(seed: int, eos_boost: float) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
        model.lm_head.weight[EOS] += eos_boost * model.lm_head.weight[EOS].sign()
    return model


# cases where transformers' default stopping (early_stopping=False: the best live beam normalised by the
# current length) ends a row that the exact bound keeps searching, to another caption
@pytest.mark.parametrize("seed, eos_boost, length_penalty", [(0, 0.6, 2.0), (1, 0.3, 1.0), (3, 1.0, 2.0)])
def test_heuristic_early_stopping_equals_transformers_default_where_the_exact_bound_searches_on(
    seed, eos_boost, length_penalty, one_thread
):
    lm = boosted_lm(seed, eos_boost)
    expected = hf_generate(lm, 6, 10, do_sample=False, num_beams=3, length_penalty=length_penalty)

    def search(early_stopping: str) -> torch.Tensor:
        ids, _ = beam_search(step_of(lm), 6, BOS, EOS, PAD, max_length=10, num_beams=3,
                             length_penalty=length_penalty, early_stopping=early_stopping)  # fmt: skip
        return torch.nn.functional.pad(ids, (0, 10 - ids.shape[1]), value=PAD)

    wide = torch.nn.functional.pad(expected, (0, 10 - expected.shape[1]), value=PAD)
    assert torch.equal(search("heuristic"), wide)
    assert not torch.equal(search("exact"), wide)
