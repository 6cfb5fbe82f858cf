import random

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from vlp.platform.metrics import (
    bleu4,
    cider_d,
    grounding_scores,
    normalize_answer,
    retrieval_recall,
    simple_tokenize,
    vqa_accuracy,
)

# ---------------------------------------------------------------- retrieval


def test_retrieval_perfect_diagonal_scores_one():
    n = 12
    scores = retrieval_recall(torch.eye(n), torch.arange(n), torch.arange(n))
    assert scores == {f"{d}_r{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_retrieval_reversed_matrix_ranks_every_positive_last():
    n = 12
    # the true pair is the only 0 in its row and column: rank n for every query, whatever the tie order
    scores = retrieval_recall(1 - torch.eye(n), torch.arange(n), torch.arange(n), ks=(1, 5, 11, 12))
    assert scores == {f"{d}_r{k}": float(k == 12) for d in ("i2t", "t2i") for k in (1, 5, 11, 12)}


def test_retrieval_with_several_captions_per_image():
    image_ids = torch.tensor([10, 20, 30])
    text_image_ids = torch.tensor([10, 10, 20, 20, 30, 30])
    similarity = torch.tensor(
        [
            [0.1, 0.9, 0.8, 0.0, 0.0, 0.0],  # img 10: t1 (own) first -> rank 1
            [0.9, 0.0, 0.1, 0.2, 0.0, 0.0],  # img 20: t0 (10), t3 (own) -> rank 2
            [0.0, 0.0, 0.5, 0.6, 0.1, 0.2],  # img 30: t3 (20), t2 (20), t5 (own) -> rank 3
        ]
    )
    # texts, by column: t0 -> 20, 10: rank 2; t1 -> 10: rank 1; t2 -> 10, 30, 20: rank 3;
    # t3 -> 30, 20: rank 2; t4 -> 30: rank 1; t5 -> 30: rank 1
    scores = retrieval_recall(similarity, text_image_ids, image_ids, ks=(1, 2, 3))
    expected = {
        "i2t_r1": 1 / 3,
        "i2t_r2": 2 / 3,
        "i2t_r3": 1.0,
        "t2i_r1": 3 / 6,
        "t2i_r2": 5 / 6,
        "t2i_r3": 1.0,
    }
    assert scores == pytest.approx(expected)


def _brute_force_recall(similarity, text_image_ids, image_ids, k):
    sim = similarity.tolist()
    txt_ids, img_ids = text_image_ids.tolist(), image_ids.tolist()
    i2t_hits = 0
    for i, row in enumerate(sim):
        ranked = sorted(range(len(row)), key=lambda j: -row[j])[:k]
        i2t_hits += any(txt_ids[j] == img_ids[i] for j in ranked)
    t2i_hits = 0
    for j in range(len(txt_ids)):
        ranked = sorted(range(len(sim)), key=lambda i: -sim[i][j])[:k]
        t2i_hits += any(img_ids[i] == txt_ids[j] for i in ranked)
    return i2t_hits / len(img_ids), t2i_hits / len(txt_ids)


@pytest.mark.parametrize("seed", range(3))
def test_retrieval_matches_brute_force_loop(seed):
    generator = torch.Generator().manual_seed(seed)
    n_img = 15
    image_ids = torch.randperm(100, generator=generator)[:n_img]
    text_image_ids = image_ids[torch.randint(n_img, (40,), generator=generator)]
    text_image_ids[:n_img] = image_ids  # every image has at least one text
    similarity = torch.randn(n_img, 40, generator=generator)
    ks = (1, 3, 5, 10, 20)
    scores = retrieval_recall(similarity, text_image_ids, image_ids, ks=ks)
    for k in ks:
        i2t, t2i = _brute_force_recall(similarity, text_image_ids, image_ids, k)
        assert scores[f"i2t_r{k}"] == pytest.approx(i2t)
        assert scores[f"t2i_r{k}"] == pytest.approx(t2i)


def test_retrieval_rejects_bad_inputs():
    ids = torch.arange(3)
    with pytest.raises(ValueError, match="similarity must be"):
        retrieval_recall(torch.zeros(3), ids, ids)
    with pytest.raises(ValueError, match="text_image_ids"):
        retrieval_recall(torch.zeros(3, 4), ids, ids)
    with pytest.raises(ValueError, match="image_ids must be unique"):
        retrieval_recall(torch.zeros(3, 3), ids, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"not in image_ids: \[7\]"):
        retrieval_recall(torch.zeros(3, 3), torch.tensor([0, 1, 7]), ids)
    with pytest.raises(ValueError, match="ks must be positive"):
        retrieval_recall(torch.zeros(3, 3), ids, ids, ks=(0, 1))


# ---------------------------------------------------------------- grounding


def test_grounding_scores_hand_computed():
    pred = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]])
    target = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.625, 0.5, 0.5, 0.5], [0.8, 0.8, 0.2, 0.2]])
    # pair 1 identical: IoU 1. Pair 2: xyxy [.25,.25,.75,.75] vs [.375,.25,.875,.75]:
    # inter .375 * .5 = .1875, union .25 + .25 - .1875 = .3125, IoU .6. Pair 3 disjoint: IoU 0.
    scores = grounding_scores(pred, target)
    assert scores["acc50"] == pytest.approx(2 / 3)
    assert scores["miou"] == pytest.approx((1 + 0.6 + 0) / 3, abs=1e-6)


def test_grounding_scores_rejects_bad_shapes():
    with pytest.raises(ValueError, match="pred_boxes and target_boxes"):
        grounding_scores(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="empty"):
        grounding_scores(torch.zeros(0, 4), torch.zeros(0, 4))


# ---------------------------------------------------------------- captions

VOCAB = ["a", "red", "blue", "circle", "square", "on", "the", "left"]


def _sentence(rng: random.Random, low: int, high: int, vocab: list[str] = VOCAB) -> str:
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(low, high)))


def _coco_scores(candidates, references):
    res = {key: [caption] for key, caption in candidates.items()}
    bleu = Bleu(4).compute_score(references, res, verbose=0)[0][3]
    cider = Cider().compute_score(references, res)[0]
    return bleu, float(cider)


def _assert_matches_coco(candidates, references):
    bleu, cider = _coco_scores(candidates, references)
    assert bleu4(candidates, references) == pytest.approx(bleu, abs=1e-6)
    assert cider_d(candidates, references) == pytest.approx(cider, abs=1e-6)


def _mutated(rng: random.Random, sentence: str, vocab: list[str]) -> str:
    """A reference with a few words replaced, dropped or inserted: a candidate with real n-gram overlap."""
    words = sentence.split()
    for _ in range(rng.randint(0, 3)):
        position = rng.randint(0, len(words))
        action = rng.choice(("replace", "drop", "insert"))
        if action == "insert" or not words:
            words.insert(position, rng.choice(vocab))
        elif action == "drop":
            words.pop(min(position, len(words) - 1))
        else:
            words[min(position, len(words) - 1)] = rng.choice(vocab)
    return " ".join(words)


@pytest.mark.parametrize("seed", range(40))
def test_caption_metrics_match_pycocoevalcap_on_random_corpora(seed):
    rng = random.Random(seed)
    vocab = VOCAB[: rng.randint(3, len(VOCAB))]
    n_images = rng.randint(1, 8)
    references = {
        i: [_sentence(rng, 1, 10, vocab) for _ in range(rng.randint(1, 5))] for i in range(n_images)
    }
    candidates = {
        i: _mutated(rng, rng.choice(refs), vocab) if rng.random() < 0.7 else _sentence(rng, 1, 12, vocab)
        for i, refs in references.items()
    }
    _assert_matches_coco(candidates, references)


def test_caption_metrics_match_when_candidates_share_no_ngram():
    rng = random.Random(0)
    references = {i: [_sentence(rng, 3, 8) for _ in range(3)] for i in range(5)}
    candidates = {i: _sentence(rng, 3, 8, ["zebra", "purple"]) for i in range(5)}
    _assert_matches_coco(candidates, references)
    assert bleu4(candidates, references) < 1e-6
    assert cider_d(candidates, references) == 0.0


@pytest.mark.parametrize(("cand_len", "ref_len"), [(14, 4), (2, 9), (1, 1)])
def test_caption_metrics_match_for_longer_and_shorter_candidates(cand_len, ref_len):
    rng = random.Random(cand_len * 100 + ref_len)
    references = {i: [_sentence(rng, ref_len, ref_len) for _ in range(2)] for i in range(6)}
    candidates = {i: _sentence(rng, cand_len, cand_len) for i in range(6)}
    _assert_matches_coco(candidates, references)


def test_caption_metrics_match_with_empty_candidate_and_empty_reference():
    references = {0: ["a red circle", ""], 1: ["blue square on the left"], 2: ["a"]}
    candidates = {0: "", 1: "blue square", 2: "a red"}
    _assert_matches_coco(candidates, references)


def test_caption_metrics_on_a_single_image():
    references = {"img": ["a red circle on the left", "a red circle"]}
    candidates = {"img": "a red circle on the right"}
    _assert_matches_coco(candidates, references)
    assert cider_d(candidates, references) == 0.0  # idf is log(1 / 1) = 0 for every n-gram


def test_perfect_candidates_give_bleu4_one_and_match_cider():
    rng = random.Random(7)
    references = {i: [_sentence(rng, 4, 9) for _ in range(3)] for i in range(6)}
    candidates = {i: refs[1] for i, refs in references.items()}
    assert bleu4(candidates, references) == pytest.approx(1.0, abs=1e-6)
    _assert_matches_coco(candidates, references)


def test_caption_metrics_match_on_tokenised_free_text():
    references = {
        1: ["A red circle, on the left.", "The circle is RED!"],
        2: ["Two blue squares; side-by-side.", "A square's twin: blue squares"],
        3: ["Nothing but a green triangle", "a triangle (green)"],
    }
    candidates = {1: "A red circle.", 2: "Blue squares side by side", 3: "a green triangle!"}
    tokenised_refs = {key: [simple_tokenize(r) for r in refs] for key, refs in references.items()}
    tokenised_cands = {key: simple_tokenize(c) for key, c in candidates.items()}
    _assert_matches_coco(tokenised_cands, tokenised_refs)


def test_simple_tokenize_lowercases_and_strips_punctuation():
    assert simple_tokenize("  A dog's toy, side-by-side!  ") == "a dogs toy side by side"


def test_caption_metrics_reject_mismatched_ids_and_bad_values():
    for metric in (bleu4, cider_d):
        with pytest.raises(ValueError, match="same ids"):
            metric({1: "a"}, {2: ["a"]})
        with pytest.raises(ValueError, match="empty"):
            metric({}, {})
        with pytest.raises(ValueError, match=r"references\[1\] must be a non-empty list"):
            metric({1: "a"}, {1: []})
        with pytest.raises(TypeError, match=r"candidates\[1\] must be a str"):
            metric({1: ["a"]}, {1: ["a"]})


@pytest.mark.parametrize(
    ("answer", "normalised"),
    [("Two dogs.", "2 dogs"), ("the red one", "red 1"), ("3.5", "3.5"), ("Yes!", "yes"), ("none", "0")],
)
def test_answers_are_normalised_like_the_vqa_evaluation(answer, normalised):
    assert normalize_answer(answer) == normalised


@pytest.mark.parametrize(
    ("matches", "accuracy"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_vqa_accuracy_of_ten_human_answers(matches, accuracy):
    # leave-one-out by hand: a matching human left out leaves matches-1 others, any other leaves matches
    references = ["yes"] * matches + ["no"] * (10 - matches)
    by_hand = (matches * min((matches - 1) / 3, 1) + (10 - matches) * min(matches / 3, 1)) / 10
    assert vqa_accuracy("yes", references) == pytest.approx(by_hand)
    assert vqa_accuracy("Yes.", references) == pytest.approx(accuracy)


def test_vqa_accuracy_single_reference_is_exact_match_and_empty_is_an_error():
    assert vqa_accuracy("2", ["two"]) == 1.0
    assert vqa_accuracy("red", ["blue"]) == 0.0
    with pytest.raises(ValueError, match="reference"):
        vqa_accuracy("red", [])
