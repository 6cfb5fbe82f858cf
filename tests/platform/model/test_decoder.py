import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from vlp.platform.model.backbone import ImageFeatures
from vlp.platform.model.decoder import (
    IGNORE_INDEX,
    beam_search,
    greedy_search,
    prefix_decoding,
    shift_for_teacher_forcing,
)

PAD, BOS, EOS = 0, 1, 2


@pytest.fixture
def captioner(make_backbone):
    return make_backbone(caption_decoder=True).eval()


def markov(table: torch.Tensor):
    """next_token_logits of a first-order Markov chain: log P(next | last token) = log table[last]."""
    return lambda ids: table[ids[:, -1]].log()


def toy_table(after_bos, after_a, after_b, after_c, vocab=6, eps=1e-6):
    """Vocabulary PAD, BOS, EOS, A=3, B=4, C=5; rows as {token: probability}, EOS certain after EOS."""
    table = torch.full((vocab, vocab), eps)
    for row, probs in ((BOS, after_bos), (3, after_a), (4, after_b), (5, after_c), (EOS, {EOS: 1.0})):
        for token, p in probs.items():
            table[row, token] = p
    return table / table.sum(-1, keepdim=True)


# Greedy takes A (0.55), then C (0.34), then EOS: P = 0.187 over 3 tokens.
# B then EOS has P = 0.45 over 2 tokens: best without length penalty, beaten by A C EOS at penalty 2.
TOY = toy_table({3: 0.55, 4: 0.45}, {5: 0.34, 4: 0.33, EOS: 0.33}, {EOS: 1.0}, {EOS: 1.0})


def best_by_enumeration(table, max_length, length_penalty):
    """Highest sum(log p) / length ** penalty over every sequence that ends in EOS or reaches max_length."""
    best, best_seq = -math.inf, None
    for length in range(1, max_length + 1):
        for seq in itertools.product(range(table.shape[0]), repeat=length):
            if EOS in seq[:-1] or (seq[-1] != EOS and length < max_length):
                continue
            prefix = (BOS, *seq)
            logp = sum(math.log(table[a, b]) for a, b in itertools.pairwise(prefix))
            score = logp / length**length_penalty
            if score > best:
                best, best_seq = score, list(seq)
    return best_seq, best


def decoder_logits(backbone, image, ids):
    return backbone.decoder.logits(backbone.decode(image, ids, torch.ones_like(ids))[:, -1])


def test_decoder_is_causal_exactly(captioner, batch):
    image = captioner.encode_image(batch["image"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    changed = ids.clone()
    changed[:, 5] = (ids[:, 5] + 7) % captioner.vocab_size
    with torch.no_grad():
        before = captioner.decoder.logits(captioner.decode(image, ids, mask))
        after = captioner.decoder.logits(captioner.decode(image, changed, mask))
    assert torch.equal(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5], after[:, 5])


def test_decoder_shares_embeddings_and_fusion_weights_but_owns_causal_self_attention(captioner, batch):
    backbone = captioner.train()
    state_keys = backbone.state_dict().keys()
    own = {k for k in state_keys if k.startswith("decoder.")}
    assert own and all(k.startswith(("decoder.self_attns.", "decoder.bias")) for k in own)
    assert len(backbone.decoder.self_attns) == len(backbone.fusion.layers)

    inputs, mask, targets = shift_for_teacher_forcing(batch["input_ids"], batch["attention_mask"])
    hidden = backbone.decode(backbone.encode_image(batch["image"]), inputs, mask)
    backbone.decoder.loss(hidden, targets).backward()
    layer = backbone.fusion.layers[0]
    for shared in (backbone.text.word_embeddings.weight, layer.cross_attn.query.weight, layer.mlp[0].weight):
        assert shared.grad is not None and shared.grad.abs().sum() > 0
    assert layer.self_attn.query.weight.grad is None  # the fusion's bidirectional self-attention is unused
    assert backbone.decoder.self_attns[0].query.weight.grad.abs().sum() > 0


def test_merged_image_token_counts_as_its_size(captioner):
    torch.manual_seed(1)
    tokens = torch.randn(2, 3, 32)
    ids = torch.randint(5, captioner.vocab_size, (2, 6))
    mask = torch.ones_like(ids)
    merged = ImageFeatures(tokens, torch.zeros(2, 16), torch.tensor([[1.0, 2.0, 1.0]] * 2))
    duplicated = ImageFeatures(tokens[:, [0, 1, 1, 2]], torch.zeros(2, 16), torch.ones(2, 4))
    with torch.no_grad():
        torch.testing.assert_close(
            captioner.decode(merged, ids, mask), captioner.decode(duplicated, ids, mask), atol=1e-5, rtol=1e-5
        )


def test_shift_for_teacher_forcing_targets_next_real_tokens():
    ids = torch.tensor([[BOS, 7, 8, EOS], [BOS, 9, EOS, PAD]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    inputs, input_mask, targets = shift_for_teacher_forcing(ids, mask)
    assert inputs.tolist() == [[BOS, 7, 8], [BOS, 9, EOS]]
    assert input_mask.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert targets.tolist() == [[7, 8, EOS], [9, EOS, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="input_ids and attention_mask"):
        shift_for_teacher_forcing(ids[:, :1], mask[:, :1])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_teacher_forced_loss_equals_naive_cross_entropy(captioner, batch, label_smoothing):
    backbone = captioner.train()
    with torch.no_grad():  # the vision tower is not what this test checks
        image = backbone.encode_image(batch["image"])
    inputs, mask, targets = shift_for_teacher_forcing(batch["input_ids"], batch["attention_mask"])
    params = [p for p in backbone.parameters() if p.requires_grad]

    def grads(loss):
        return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)

    hidden = backbone.decode(image, inputs, mask)
    fused = backbone.decoder.loss(hidden, targets, label_smoothing=label_smoothing)
    naive = F.cross_entropy(
        backbone.decoder.logits(hidden).flatten(0, 1),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )
    torch.testing.assert_close(fused, naive, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads(fused), grads(naive), strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    if label_smoothing:
        plain = backbone.decoder.loss(hidden, targets)
        assert not torch.isclose(fused, plain)


def test_beam_width_one_equals_greedy_on_the_model(captioner, batch):
    image = captioner.encode_image(batch["image"])
    tok = captioner.tokenizer
    with torch.no_grad():
        captioner.decoder.bias[tok.sep_token_id] = 1.0  # let some rows end early

        def step(ids):
            return decoder_logits(captioner, image, ids)

        greedy = greedy_search(
            prefix_decoding(step), 8, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, max_length=12
        )
        beam, _ = beam_search(
            prefix_decoding(step),
            8,
            tok.cls_token_id,
            tok.sep_token_id,
            tok.pad_token_id,
            12,
            num_beams=1,
            length_penalty=0.0,
        )
    assert torch.equal(greedy, beam)


def test_beam_width_one_equals_greedy_when_lengths_differ():
    torch.manual_seed(0)
    tables = torch.rand(16, 8, 8) ** 3  # one Markov chain per row
    tables[..., EOS] += 0.2
    tables /= tables.sum(-1, keepdim=True)

    def step(ids):
        return tables[torch.arange(ids.shape[0]), ids[:, -1]].log()

    greedy = greedy_search(prefix_decoding(step), 16, BOS, EOS, PAD, max_length=10)
    beam, _ = beam_search(
        prefix_decoding(step), 16, BOS, EOS, PAD, max_length=10, num_beams=1, length_penalty=0.0
    )
    lengths = (greedy != PAD).sum(-1)
    assert len(set(lengths.tolist())) > 2, "the rows should stop after different numbers of tokens"
    assert torch.equal(greedy, beam)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generation_stops_at_eos_and_pads_after_it(num_beams):
    stop_after = torch.tensor([2, 4, 1])  # row r emits `stop_after[r]` words, then EOS

    def scripted(ids):
        rows = torch.arange(ids.shape[0]) // num_beams
        logits = torch.zeros(ids.shape[0], 8)
        words = ids.shape[1] - 1
        logits[torch.arange(ids.shape[0]), torch.where(words < stop_after[rows], 5 + rows, EOS)] = 5.0
        return logits

    if num_beams == 1:
        out = greedy_search(prefix_decoding(scripted), 3, BOS, EOS, PAD, max_length=10)
    else:
        out, _ = beam_search(prefix_decoding(scripted), 3, BOS, EOS, PAD, max_length=10, num_beams=num_beams)
    assert out.tolist() == [[5, 5, EOS, PAD, PAD], [6, 6, 6, 6, EOS], [7, EOS, PAD, PAD, PAD]]


def test_generation_stops_at_max_length_without_eos():
    never_ends = lambda ids: torch.zeros(ids.shape[0], 6).index_fill(1, torch.tensor([3]), 1.0)  # noqa: E731
    assert (
        greedy_search(prefix_decoding(never_ends), 2, BOS, EOS, PAD, max_length=4).tolist() == [[3] * 4] * 2
    )
    assert (
        beam_search(prefix_decoding(never_ends), 2, BOS, EOS, PAD, max_length=4, num_beams=2)[0].tolist()
        == [[3] * 4] * 2
    )


@pytest.mark.parametrize("length_penalty, expected", [(0.0, [4, EOS]), (2.0, [3, 5, EOS])])
def test_beam_search_returns_the_highest_scoring_sequence(length_penalty, expected):
    step = markov(TOY)
    greedy = greedy_search(prefix_decoding(step), 1, BOS, EOS, PAD, max_length=4)
    beam, score = beam_search(
        prefix_decoding(step), 1, BOS, EOS, PAD, max_length=4, num_beams=2, length_penalty=length_penalty
    )
    best, best_score = best_by_enumeration(TOY, 4, length_penalty)
    assert greedy.tolist() == [[3, 5, EOS]]
    assert best == expected
    assert beam.tolist() == [best]
    assert score.item() == pytest.approx(best_score, rel=1e-5)


def test_beam_search_is_batched_row_by_row():
    step = markov(TOY)
    alone, _ = beam_search(
        prefix_decoding(step), 1, BOS, EOS, PAD, max_length=4, num_beams=2, length_penalty=0.0
    )
    batched, _ = beam_search(
        prefix_decoding(step), 3, BOS, EOS, PAD, max_length=4, num_beams=2, length_penalty=0.0
    )
    assert batched.tolist() == alone.tolist() * 3


def test_generation_rejects_bad_arguments():
    step = markov(TOY)
    with pytest.raises(ValueError, match="max_length"):
        greedy_search(prefix_decoding(step), 1, BOS, EOS, PAD, max_length=0)
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(prefix_decoding(step), 1, BOS, EOS, PAD, max_length=3, num_beams=0)
    with pytest.raises(ValueError, match="vocabulary of at least 8"):
        beam_search(prefix_decoding(step), 1, BOS, EOS, PAD, max_length=3, num_beams=4)


def test_decode_needs_a_decoder(backbone, batch):
    with pytest.raises(ValueError, match="caption_decoder=True"):
        backbone.decode(backbone.encode_image(batch["image"]), batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("merged", [False, True])
def test_cached_step_logits_equal_the_full_prefix_recomputation(captioner, batch, merged):
    image = captioner.encode_image(batch["image"])
    if merged:  # merged image tokens: the size bias must reach the cached cross-attention too
        image = image._replace(sizes=torch.randint(1, 4, image.tokens.shape[:2]))
    torch.manual_seed(0)
    ids = torch.randint(5, captioner.vocab_size, (8, 12))
    with torch.no_grad():
        cache = captioner.start_decoding(image)
        for t in range(ids.shape[1]):
            cached = cache(ids[:, t])
            full = decoder_logits(captioner, image, ids[:, : t + 1])
            torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_cache_follows_reordered_beams(captioner, batch):
    image = captioner.encode_image(batch["image"][:4])
    torch.manual_seed(1)
    ids = torch.randint(5, captioner.vocab_size, (4, 6))
    order = torch.tensor([2, 2, 0, 3])  # rows continue other rows' prefixes, one twice
    with torch.no_grad():
        cache = captioner.start_decoding(image.take(torch.tensor([0, 0, 0, 0])))
        for t in range(5):
            cache(ids[:, t])
        reordered = cache(ids[:, 5], order)
        prefix = torch.cat([ids[order, :5], ids[:, 5:6]], dim=1)
        full = decoder_logits(captioner, image.take(torch.tensor([0, 0, 0, 0])), prefix)
    torch.testing.assert_close(reordered, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generation_equals_uncached_on_many_models(make_backbone, shapes, num_beams):
    dataset = shapes.dataset("val")
    images = torch.stack([dataset[i]["image"] for i in range(6)])
    tok = shapes.tokenizer
    for seed in range(8):
        backbone = make_backbone(caption_decoder=True).eval()
        torch.manual_seed(seed)
        with torch.no_grad():
            for param in backbone.parameters():
                param.add_(torch.randn_like(param) * 0.5)  # varied models, not only the seed-0 init
            image = backbone.encode_image(images)
            rows = torch.arange(6).repeat_interleave(num_beams)
            expanded = image.take(rows)
            args = (6, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, 20)
            uncached_step = prefix_decoding(
                lambda ids, im=expanded, model=backbone: decoder_logits(model, im, ids)
            )
            cached_step = backbone.start_decoding(expanded)
            if num_beams == 1:
                uncached = greedy_search(uncached_step, *args)
                cached = greedy_search(cached_step, *args)
            else:
                uncached = beam_search(uncached_step, *args, num_beams=num_beams)[0]
                cached = beam_search(cached_step, *args, num_beams=num_beams)[0]
        assert torch.equal(cached, uncached), f"seed {seed}"


def test_cache_refuses_positions_past_max_len(captioner, batch):
    cache = captioner.start_decoding(captioner.encode_image(batch["image"][:1]))
    token = torch.tensor([captioner.tokenizer.cls_token_id])
    with torch.no_grad():
        for _ in range(captioner.text.max_len):
            cache(token)
        with pytest.raises(ValueError, match="max_len"):
            cache(token)
