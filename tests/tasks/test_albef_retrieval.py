"""ALBEF's retrieval evaluation on a converted checkpoint: ITC over the whole split, each query's top k
re-scored by the ITM match logit (ALBEF's `evaluation` + `itm_eval` in Retrieval.py, computed here with
LAVIS's modules) ranks exactly as vlp's ITM re-ranking (`rerank_k`, `rerank_score: itm`), with the same
scores, on a small split where every image has two captions."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from lavis_reference import albef_pretrain, bert_tokenizer

import vlp.tasks.itm as itm_module
from vlp.platform.model.backbone import FeatureCache, FusionBackbone
from vlp.platform.model.convert_albef import convert_albef
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig
from vlp.tasks.itm import ITMObjective
from vlp.tasks.multitask import MultiTaskModule

WORDS = "red blue green yellow square circle triangle small large left right above".split()


def albef_evaluation(reference, images, ids, mask, k: int) -> tuple[np.ndarray, np.ndarray]:
    """ALBEF's Retrieval.py `evaluation`: ITM logits of each query's ITC top k, -100 elsewhere."""
    with torch.no_grad():
        text = reference.text_encoder.bert(ids, attention_mask=mask, mode="text").last_hidden_state
        text_embeds = F.normalize(reference.text_proj(text[:, 0]), dim=-1)
        image_feats = reference.visual_encoder.forward_features(images)
        image_embeds = F.normalize(reference.vision_proj(image_feats[:, 0]), dim=-1)
        sims = image_embeds @ text_embeds.T

        def itm(text_rows, image_rows):
            out = reference.text_encoder.bert(
                encoder_embeds=text[text_rows],
                attention_mask=mask[text_rows],
                encoder_hidden_states=image_feats[image_rows],
                encoder_attention_mask=torch.ones(image_feats[image_rows].shape[:2], dtype=torch.long),
                mode="fusion",
            ).last_hidden_state
            return reference.itm_head(out[:, 0])[:, 1]

        i2t = torch.full(sims.shape, -100.0)
        for i, row in enumerate(sims):
            top = row.topk(k).indices
            i2t[i, top] = itm(top, torch.full((k,), i))
        t2i = torch.full(sims.T.shape, -100.0)
        for j, column in enumerate(sims.T):
            top = column.topk(k).indices
            t2i[j, top] = itm(torch.full((k,), j), top)
    return i2t.numpy(), t2i.numpy()


def itm_eval_ranks(scores_i2t, scores_t2i, txt2img, img2txt):
    """ALBEF's `itm_eval`: the rank of the best right text of each image, of the right image of each text."""
    image_ranks = [
        min(np.where(np.argsort(s)[::-1] == t)[0][0] for t in img2txt[i]) for i, s in enumerate(scores_i2t)
    ]
    text_ranks = [np.where(np.argsort(s)[::-1] == txt2img[j])[0][0] for j, s in enumerate(scores_t2i)]
    return np.array(image_ranks), np.array(text_ranks)


def test_albef_itm_reranked_retrieval_ranks_as_albef(monkeypatch, one_thread):
    reference = albef_pretrain()
    tokenizer = bert_tokenizer()
    backbone = FusionBackbone(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(width=32, depth=2, heads=2, max_len=40),
        fusion=FusionConfig(depth=2, heads=2, norm="post", layer_norm_eps=1e-12),
        embed_dim=16,
        tokenizer=tokenizer,
        temperature="clamped",
    )
    k = 5
    module = MultiTaskModule(backbone, {"itm": partial(ITMObjective, rerank_k=k, rerank_chunk=7)})
    converted = convert_albef(reference.state_dict(), max_len=40, momentum=False)
    converted = {key: v for key, v in converted.items() if not key.startswith("objectives.mlm")}
    module.load_state_dict(converted, strict=False)
    module.eval()

    generator = torch.Generator().manual_seed(0)
    n_images = 6
    captions = [
        " ".join(WORDS[int(w)] for w in torch.randint(len(WORDS), (int(n),), generator=generator))
        for n in torch.randint(2, 9, (2 * n_images,), generator=generator)
    ]
    images = torch.randn(n_images, 3, 32, 32, generator=generator)
    text = tokenizer(captions, padding="max_length", max_length=30, return_tensors="pt")
    txt2img = np.arange(2 * n_images) // 2
    img2txt = [[2 * i, 2 * i + 1] for i in range(n_images)]
    expected_i2t, expected_t2i = albef_evaluation(reference, images, text.input_ids, text.attention_mask, k)

    first = tokenizer(captions[::2], padding="longest", return_tensors="pt")
    short = tokenizer(captions, padding="longest", return_tensors="pt")
    batch = {
        "image": images,
        "input_ids": first.input_ids,
        "attention_mask": first.attention_mask,
        "image_id": torch.arange(n_images),
        "reference_input_ids": short.input_ids,
        "reference_attention_mask": short.attention_mask,
        "reference_row": torch.as_tensor(txt2img),
    }
    seen = []

    def keep(scores, *ids):
        seen.append(scores)
        return {"i2t_r1": 0.0, "t2i_r1": 0.0}

    monkeypatch.setattr(itm_module, "retrieval_recall", keep)
    itm = module.objectives["itm"]
    with torch.no_grad():
        itm.validation_update(batch, FeatureCache(backbone, batch))
        itm.validation_scores()
    i2t, t2i = (scores.numpy() for scores in seen)  # t2i: column j scores text j's images
    t2i = t2i.T
    for ours, theirs in ((i2t, expected_i2t), (t2i, expected_t2i)):
        rescored = theirs > -100
        assert rescored.sum() == k * len(theirs)
        np.testing.assert_allclose(ours[rescored], theirs[rescored], atol=1e-5, rtol=1e-5)
        order_ours = np.argsort(-ours, axis=1, kind="stable")[:, :k]
        order_theirs = np.argsort(-theirs, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(order_ours, order_theirs)
    ranks = itm_eval_ranks(i2t, t2i, txt2img, img2txt)
    expected = itm_eval_ranks(expected_i2t, expected_t2i, txt2img, img2txt)
    for ours, theirs in zip(ranks, expected, strict=True):  # the same R@1 and R@5 (ranks within k agree)
        np.testing.assert_array_equal(np.minimum(ours, k), np.minimum(theirs, k))
