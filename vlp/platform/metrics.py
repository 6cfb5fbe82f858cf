"""Validation metrics: retrieval recall@K, grounding Acc@0.5 / mIoU, caption BLEU-4 and CIDEr-D, VQA accuracy.

Each function scores the whole evaluated split at once; under DDP the caller gathers it first (and drops
the duplicate samples a DistributedSampler pads with). Caption metrics are pure python and reproduce the
COCO caption evaluation (pycocoevalcap `Bleu(4)`, `Cider`) on the same tokenised strings.
"""

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import torch
from torch import Tensor

from vlp.platform.boxes import box_cxcywh_to_xyxy, paired_box_iou

NGRAM_ORDER = 4
# Additive constants of the COCO BLEU scorer: they keep a zero match count at ~0 instead of log(0).
_BLEU_MATCH_SMOOTHING = 1e-15
_BLEU_TOTAL_SMOOTHING = 1e-9
CIDER_SIGMA = 6.0
CIDER_SCALE = 10.0

Ngram = tuple[str, ...]


def retrieval_recall(
    similarity: Tensor, text_image_ids: Tensor, image_ids: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image->text and text->image recall@K over the whole similarity matrix.

    similarity `[N_img, N_txt]`; text_image_ids `[N_txt]` (the id of each text's image); image_ids `[N_img]`,
    unique. An image is a hit at K when any of its texts is among its K most similar texts; a text is a
    hit when its image is among its K most similar images. K larger than the candidate count is clamped
    (recall 1.0). Ties are ordered as `torch.topk` orders them (unspecified), so exact ties can move a
    positive in or out of the top K; real-valued embeddings make them vanishingly rare.
    Returns `{"i2t_r1": ..., "i2t_r5": ..., ..., "t2i_r10": ...}` as fractions in [0, 1].
    """
    if similarity.ndim != 2 or 0 in similarity.shape:
        raise ValueError(
            f"similarity must be a non-empty [N_img, N_txt] matrix, got {tuple(similarity.shape)}"
        )
    n_img, n_txt = similarity.shape
    if image_ids.shape != (n_img,) or text_image_ids.shape != (n_txt,):
        raise ValueError(
            f"image_ids must be [{n_img}] and text_image_ids [{n_txt}] for similarity {tuple(similarity.shape)}, "
            f"got {tuple(image_ids.shape)} and {tuple(text_image_ids.shape)}"
        )
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    image_ids = image_ids.to(similarity.device)
    text_image_ids = text_image_ids.to(similarity.device)
    if image_ids.unique().numel() != n_img:
        raise ValueError("image_ids must be unique (deduplicate gathered samples first)")
    unknown = ~torch.isin(text_image_ids, image_ids)
    if unknown.any():
        raise ValueError(
            f"text_image_ids has ids not in image_ids: {text_image_ids[unknown].unique().tolist()}"
        )

    top_texts = similarity.topk(min(max(ks), n_txt), dim=1).indices  # [N_img, K]
    i2t_hits = text_image_ids[top_texts] == image_ids[:, None]
    top_images = similarity.topk(min(max(ks), n_img), dim=0).indices  # [K, N_txt]
    t2i_hits = image_ids[top_images] == text_image_ids[None, :]
    scores = {f"i2t_r{k}": i2t_hits[:, :k].any(dim=1).float().mean().item() for k in ks}
    scores.update({f"t2i_r{k}": t2i_hits[:k].any(dim=0).float().mean().item() for k in ks})
    return scores


def grounding_scores(pred_boxes: Tensor, target_boxes: Tensor) -> dict[str, float]:
    """Acc@0.5 (fraction of pairs with IoU >= 0.5) and mean IoU of normalised cxcywh boxes `[N, 4]`."""
    if pred_boxes.ndim != 2 or pred_boxes.shape[-1] != 4 or pred_boxes.shape != target_boxes.shape:
        raise ValueError(
            "pred_boxes and target_boxes must both be [N, 4], "
            f"got {tuple(pred_boxes.shape)} and {tuple(target_boxes.shape)}"
        )
    if pred_boxes.shape[0] == 0:
        raise ValueError("pred_boxes is empty: nothing to score")
    iou = paired_box_iou(box_cxcywh_to_xyxy(pred_boxes.detach()), box_cxcywh_to_xyxy(target_boxes.detach()))
    return {"acc50": (iou >= 0.5).float().mean().item(), "miou": iou.mean().item()}


def simple_tokenize(text: str) -> str:
    """Lowercase, drop apostrophes, turn other punctuation into spaces: "A dog's toy." -> "a dogs toy"."""
    text = re.sub(r"[^\w\s]", " ", text.lower().replace("'", ""))
    return " ".join(text.split())


def _ngrams(words: Sequence[str]) -> Counter[Ngram]:
    return Counter(
        tuple(words[i : i + n]) for n in range(1, NGRAM_ORDER + 1) for i in range(len(words) - n + 1)
    )


def _check_captions(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> None:
    if set(candidates) != set(references):
        missing = set(references) - set(candidates)
        extra = set(candidates) - set(references)
        raise ValueError(
            f"candidates and references must have the same ids; missing from candidates: {sorted(map(str, missing))}, "
            f"missing from references: {sorted(map(str, extra))}"
        )
    if not candidates:
        raise ValueError("candidates is empty: nothing to score")
    for key, candidate in candidates.items():
        if not isinstance(candidate, str):
            raise TypeError(f"candidates[{key!r}] must be a str, got {type(candidate).__name__}")
        refs = references[key]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{key!r}] must be a non-empty list of str, got {refs!r}")


def bleu4(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002) as the COCO caption evaluation computes it.

    candidates: id -> one tokenised caption; references: id -> tokenised captions (space-separated tokens).
    n-gram matches are clipped by the largest count in any one reference; precisions are pooled over the
    corpus; the brevity penalty uses, per candidate, the reference length closest to its own (the shorter
    one on a tie). Counts get the COCO scorer's additive smoothing constants.
    """
    _check_captions(candidates, references)
    matches = [0] * NGRAM_ORDER
    totals = [0] * NGRAM_ORDER
    candidate_length = reference_length = 0
    for key, candidate in candidates.items():
        words = candidate.split()
        ref_lengths = []
        max_ref_counts: Counter[Ngram] = Counter()
        for ref in references[key]:
            ref_words = ref.split()
            ref_lengths.append(len(ref_words))
            max_ref_counts |= _ngrams(ref_words)
        for gram, count in _ngrams(words).items():
            matches[len(gram) - 1] += min(count, max_ref_counts[gram])
        for n in range(NGRAM_ORDER):
            totals[n] += max(0, len(words) - n)
        candidate_length += len(words)
        reference_length += min(ref_lengths, key=lambda length: (abs(length - len(words)), length))
    precision_product = math.prod(
        (m + _BLEU_MATCH_SMOOTHING) / (t + _BLEU_TOTAL_SMOOTHING)
        for m, t in zip(matches, totals, strict=True)
    )
    score = precision_product ** (1 / NGRAM_ORDER)
    length_ratio = (candidate_length + _BLEU_MATCH_SMOOTHING) / (reference_length + _BLEU_TOTAL_SMOOTHING)
    if length_ratio < 1:
        score *= math.exp(1 - 1 / length_ratio)
    return score


def _tfidf(counts: Counter[Ngram], doc_freq: Counter[Ngram], log_num_docs: float) -> list[dict[Ngram, float]]:
    vectors: list[dict[Ngram, float]] = [{} for _ in range(NGRAM_ORDER)]
    for gram, count in counts.items():
        vectors[len(gram) - 1][gram] = count * (log_num_docs - math.log(max(1.0, doc_freq[gram])))
    return vectors


def _norm(vector: dict[Ngram, float]) -> float:
    return math.sqrt(sum(weight * weight for weight in vector.values()))


def cider_d(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """Corpus CIDEr-D (Vedantam et al. 2015) as the COCO caption evaluation computes it.

    Per image and n in 1..4: tf-idf vectors of n-grams (document frequency = number of images whose
    references contain the n-gram, over the evaluated set), candidate weights clipped by the reference
    weights, cosine against each reference times the Gaussian length penalty exp(-d^2 / (2 * 6^2)) with d
    the length difference in words (pycocoevalcap counts bigrams: the same d unless a caption is empty,
    and an empty caption scores 0 either way);
    averaged over references and n, times 10, then averaged over images. A single image scores 0
    (every n-gram then has idf log(1/1) = 0).
    """
    _check_captions(candidates, references)
    ref_words = {key: [ref.split() for ref in refs] for key, refs in references.items()}
    ref_counts = {key: [_ngrams(words) for words in refs] for key, refs in ref_words.items()}
    doc_freq: Counter[Ngram] = Counter(gram for refs in ref_counts.values() for gram in set().union(*refs))
    log_num_docs = math.log(len(candidates))

    image_scores = []
    for key, candidate in candidates.items():
        words = candidate.split()
        cand_vectors = _tfidf(_ngrams(words), doc_freq, log_num_docs)
        total = 0.0
        for ref, counts in zip(ref_words[key], ref_counts[key], strict=True):
            ref_vectors = _tfidf(counts, doc_freq, log_num_docs)
            penalty = math.exp(-((len(words) - len(ref)) ** 2) / (2 * CIDER_SIGMA**2))
            for cand_vec, ref_vec in zip(cand_vectors, ref_vectors, strict=True):
                clipped_dot = sum(
                    min(w, ref_vec.get(g, 0.0)) * ref_vec.get(g, 0.0) for g, w in cand_vec.items()
                )
                norms = _norm(cand_vec) * _norm(ref_vec)
                total += penalty * (clipped_dot / norms if norms > 0 else 0.0)
        image_scores.append(CIDER_SCALE * total / (NGRAM_ORDER * len(ref_words[key])))
    return sum(image_scores) / len(image_scores)


NUMBER_WORDS = {
    word: str(i) for i, word in enumerate("zero one two three four five six seven eight nine ten".split())
} | {"none": "0"}
ARTICLES = frozenset({"a", "an", "the"})


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation, in short: lowercase, punctuation out (a decimal point
    stays), number words to digits, articles dropped: "Two dogs." -> "2 dogs", "the red one" -> "red 1"."""
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", answer.lower().replace("'", ""))
    text = re.sub(r"[^\w\s.]", " ", text)
    words = [NUMBER_WORDS.get(word, word) for word in text.split() if word not in ARTICLES]
    return " ".join(words)


def vqa_scores(references: Sequence[str]) -> dict[str, float]:
    """VQA accuracy of every answer some human gave (normalised); any other answer scores 0.

    With several references it is the standard soft score min(#humans that gave the answer / 3, 1),
    averaged over the leave-one-out subsets of the references as the official evaluation does (for VQAv2's
    10 answers: 1, 2, 3, 4+ matches score 0.3, 0.6, 0.9, 1.0); a single reference is an exact match.
    Each reference is normalised once, so a source scores its whole answer vocabulary cheaply.
    """
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    normalised = [normalize_answer(reference) for reference in references]
    if len(normalised) == 1:
        return {normalised[0]: 1.0}
    return {
        answer: sum(min((total - (other == answer)) / 3.0, 1.0) for other in normalised) / len(normalised)
        for answer, total in Counter(normalised).items()
    }


def vqa_accuracy(answer: str, references: Sequence[str]) -> float:
    """VQA accuracy of one answer against the human answers of its question (see `vqa_scores`)."""
    return vqa_scores(references).get(normalize_answer(answer), 0.0)


def vqa_score_matrix(references: Sequence[Sequence[str]], answer_index: Mapping[str, int]) -> Tensor:
    """[B, A] soft VQA targets: the accuracy of each candidate answer (`answer_index`: normalised answer ->
    column) against each question's references; 0 where nobody gave it, a row of 0 with no references."""
    scores = torch.zeros(len(references), len(answer_index))
    for row, answers in enumerate(references):
        for answer, score in (vqa_scores(answers) if answers else {}).items():
            if answer in answer_index:
                scores[row, answer_index[answer]] = score
    return scores
