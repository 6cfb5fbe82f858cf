"""Retrieval re-ranked by ITM equals brute-force ITM scoring of each query's ITC top-k, in one process and
sharded over two."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gloo_ranks import run_on_ranks

from vlp.platform.metrics import retrieval_recall
from vlp.platform.model.backbone import FeatureCache
from vlp.tasks.itm import ITMObjective
from vlp.tasks.itm_rerank import rerank_scores


def brute_force(similarity: torch.Tensor, k: int, pair_score) -> tuple[torch.Tensor, torch.Tensor]:
    """Rankings as score matrices: each query's top-k by similarity, ordered by their pair score, then
    every other candidate in similarity order (a descending rank value per query)."""
    n_img, n_txt = similarity.shape
    i2t, t2i = torch.zeros(n_img, n_txt), torch.zeros(n_img, n_txt)
    for i in range(n_img):
        by_sim = sorted(range(n_txt), key=lambda j: -float(similarity[i, j]))
        order = sorted(by_sim[:k], key=lambda j: -float(pair_score(i, j))) + by_sim[k:]
        for place, j in enumerate(order):
            i2t[i, j] = -place
    for j in range(n_txt):
        by_sim = sorted(range(n_img), key=lambda i: -float(similarity[i, j]))
        order = sorted(by_sim[:k], key=lambda i: -float(pair_score(i, j))) + by_sim[k:]
        for place, i in enumerate(order):
            t2i[i, j] = -place
    return i2t, t2i


def same_ranking(got: torch.Tensor, want: torch.Tensor, rows: bool) -> None:
    """`got` orders every query's candidates as the rank values `want` do."""
    if not rows:
        got, want = got.T, want.T
    for g, w in zip(got, want, strict=True):
        assert g.argsort(descending=True).tolist() == w.argsort(descending=True).tolist()


def toy_scorer(image_rows, text_rows):
    return torch.sin(image_rows.float() * 1.3 + text_rows.float() * 0.7)


def test_rerank_scores_equal_brute_force_top_k():
    torch.manual_seed(0)
    similarity = torch.randn(9, 11)
    got = rerank_scores(similarity, k=4, score_pairs=toy_scorer, chunk=5)
    want = brute_force(similarity, 4, lambda i, j: toy_scorer(torch.tensor([i]), torch.tensor([j]))[0])
    same_ranking(got[0], want[0], rows=True)
    same_ranking(got[1], want[1], rows=False)


@pytest.mark.parametrize("rerank_score", ["itm", "itm+itc", "itm+cos"])
def test_itm_validation_reranks_the_split_like_a_plain_loop(make_backbone, shapes, one_thread, rerank_score):
    backbone = make_backbone()
    objective = ITMObjective(backbone, rerank_k=3, rerank_chunk=4, rerank_score=rerank_score).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # an untrained tower maps every caption almost alike: spread them, no exact ties
        for param in objective.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    dataset = shapes.dataset("val")
    batches = [shapes.collate([dataset[i] for i in range(s, s + 8)]) for s in (0, 8)]
    with torch.no_grad():
        for batch in batches:
            objective.validation_update(batch, FeatureCache(backbone, batch))
        scores = objective.validation_scores()
        images = torch.cat([b["image"] for b in batches])
        ids = torch.cat([b["image_id"] for b in batches])
        texts = [(b["input_ids"][r], b["attention_mask"][r]) for b in batches for r in range(8)]
        # ITC similarity as the batches computed it (what is under test is the re-ranking of its top-k)
        image_emb = torch.cat([backbone.encode_image(b["image"]).embedding for b in batches])
        text_emb = torch.cat(
            [backbone.encode_text(b["input_ids"], b["attention_mask"]).embedding for b in batches]
        )

        def pair_score(i, j):
            n = int(texts[j][1].sum())
            image = backbone.encode_image(images[i : i + 1])
            tokens = backbone.text(texts[j][0][None, :n], texts[j][1][None, :n])
            logit = objective.head(backbone.fuse(image, tokens, texts[j][1][None, :n])[0, 0])[1]
            if rerank_score == "itm+itc":  # the ITC logit of the pair
                logit = logit + backbone.logit_scale() * float(image_emb[i] @ text_emb[j])
            if rerank_score == "itm+cos":  # BLIP adds the cosine (train_retrieval.py: score + topk_sim)
                logit = logit + float(image_emb[i] @ text_emb[j])
            return logit

        i2t, t2i = brute_force(image_emb @ text_emb.T, 3, pair_score)
    from_i2t, from_t2i = retrieval_recall(i2t, ids, ids), retrieval_recall(t2i, ids, ids)
    want = {
        **{k: v for k, v in from_i2t.items() if k.startswith("i2t")},
        **{k: v for k, v in from_t2i.items() if k.startswith("t2i")},
    }
    for direction in ("i2t", "t2i"):
        for k in (1, 5, 10):
            key = f"{direction}_r{k}"
            assert abs(scores[f"val/retrieval_itm/{key}"] - want[key]) < 1e-6, key
    assert "val/itm/acc" in scores


def _sharded(local_rank: int, out_dir: str) -> None:
    torch.manual_seed(0)
    similarity = torch.randn(7, 6)
    calls = []

    def scorer(image_rows, text_rows):
        calls.append(len(image_rows))
        return toy_scorer(image_rows, text_rows)

    i2t, t2i = rerank_scores(similarity, k=3, score_pairs=scorer, chunk=4)
    torch.save({"i2t": i2t, "t2i": t2i, "pairs": sum(calls)}, Path(out_dir) / f"rank{local_rank}.pt")


def test_two_ranks_share_the_reranking_and_agree(tmp_path):
    run_on_ranks(_sharded, tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    similarity = torch.randn(7, 6)
    want = rerank_scores(similarity, k=3, score_pairs=toy_scorer)
    for result in results:
        torch.testing.assert_close(result["i2t"], want[0])
        torch.testing.assert_close(result["t2i"], want[1])
    assert sum(r["pairs"] for r in results) == 7 * 3 + 6 * 3  # each pair scored once over the two ranks
