"""Validation over a split whose images have several captions (COCO / Karpathy): every caption is a text of
its own, image -> text is right when ANY of the image's captions ranks in the top K, text -> image when the
caption's one image does (the ALBEF / BLIP `itm_eval` protocol), and BLEU/CIDEr score against all of them.
ITC and ITM re-ranking against a brute force written here (one image, one caption, one pair at a time),
captions against pycocoevalcap, in one process and over two gloo ranks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from gloo_ranks import run_on_ranks
from PIL import Image
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from torch.utils.data import DistributedSampler

from vlp.datamodules.captions import CocoCaptionsSource
from vlp.datamodules.multitask import PaddingMarked
from vlp.platform.metrics import simple_tokenize
from vlp.platform.model.backbone import FeatureCache, FusionBackbone
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig
from vlp.tasks.caption import CaptionObjective
from vlp.tasks.itc import ITCObjective
from vlp.tasks.itm import ITMObjective

CAPTIONS_PER_IMAGE = (3, 1, 2, 5, 2, 1, 4)  # 7 images, 18 captions; an odd count leaves a padded repeat
RERANK_K = 3
WORDS = "red blue green small large circle square near far left right top".split()


def write_split(folder: Path) -> None:
    """Smooth random JPEGs and COCO caption files (train and val) with several captions per image."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for index, count in enumerate(CAPTIONS_PER_IMAGE):
        name = f"{index:03d}.jpg"
        pixels = rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)
        Image.fromarray(pixels).resize((40, 40), Image.Resampling.BICUBIC).save(folder / name, quality=90)
        images.append({"id": 100 + index, "file_name": name})
        for _ in range(count):
            caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 8))))
            annotations.append({"id": len(annotations), "image_id": 100 + index, "caption": caption})
    for split in ("train", "val"):
        (folder / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))


def coco_source(folder: str) -> CocoCaptionsSource:
    root = Path(folder)
    return CocoCaptionsSource(
        str(root / "train.json"),
        str(root),
        val_annotations=str(root / "val.json"),
        image_size=32,
        batch_size=2,
    )


class Objectives(NamedTuple):
    itc: ITCObjective
    itm: ITMObjective
    caption: CaptionObjective


def spread_backbone(source: CocoCaptionsSource) -> tuple[FusionBackbone, Objectives]:
    """A tiny backbone with its parameters spread (an untrained tower maps every caption almost alike)."""
    torch.manual_seed(0)
    backbone = FusionBackbone(
        tokenizer=source.tokenizer,
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2),
        text=TextConfig(width=32, depth=1, heads=2, max_len=48),
        fusion=FusionConfig(depth=1, heads=2),
        embed_dim=16,
        caption_decoder=True,
    )
    itm = ITMObjective(backbone, rerank_k=RERANK_K, rerank_chunk=4).eval()
    with torch.no_grad():
        for param in itm.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return backbone, Objectives(ITCObjective(backbone).eval(), itm, CaptionObjective(backbone).eval())


@torch.no_grad()
def validate(objectives: Objectives, batches: list[dict]) -> dict:
    for batch in batches:
        # "generated" captions: each image's last caption (the first is what the batch's `captions` hold)
        objectives.caption.captions = lambda image, batch=batch: [refs[-1] for refs in batch["references"]]
        features = FeatureCache(objectives.itc.backbone, batch)
        for objective in objectives:
            objective.validation_update(batch, features)
    return {key: value for objective in objectives for key, value in objective.validation_scores().items()}


def recalls(rankings: list[list[int]], right: list[set[int]], prefix: str) -> dict[str, float]:
    """R@K of queries whose candidates are ranked best first, each with its set of right answers."""
    return {
        f"{prefix}_r{k}": sum(bool(set(order[:k]) & ok) for order, ok in zip(rankings, right, strict=True))
        / len(rankings)
        for k in (1, 5, 10)
    }


@torch.no_grad()
def brute_force(source: CocoCaptionsSource, backbone: FusionBackbone, itm: ITMObjective) -> dict[str, float]:
    """Every image and every caption encoded alone; ITC ranks by their dot product; ITM re-scores each
    query's ITC top k, one full fused pass per pair, and ranks those above the rest (in ITC order)."""
    records = source.records["val"]
    dataset = source.dataset("val")
    images = [backbone.encode_image(dataset[i]["image"][None]) for i in range(len(records))]
    texts, owner = [], []
    for index, record in enumerate(records):
        for caption in record.captions:
            ids, mask = source.tokenize([caption])
            texts.append((ids, mask, backbone.encode_text(ids, mask)))
            owner.append(index)
    sim = [[float(image.embedding[0] @ text[2].embedding[0]) for text in texts] for image in images]

    def itm_logit(i: int, j: int) -> float:
        ids, mask, text = texts[j]
        fused = backbone.fuse(images[i], text.tokens, mask)  # every token, not the [CLS]-only shortcut
        return float(itm.head(fused[:, 0])[0, 1])

    def reranked(by_sim: list[int], score) -> list[int]:
        return sorted(by_sim[:RERANK_K], key=lambda c: -score(c)) + by_sim[RERANK_K:]

    n_img, n_txt = len(images), len(texts)
    i2t = [sorted(range(n_txt), key=lambda j: -sim[i][j]) for i in range(n_img)]
    t2i = [sorted(range(n_img), key=lambda i: -sim[i][j]) for j in range(n_txt)]
    i2t_itm = [reranked(i2t[i], lambda j, i=i: itm_logit(i, j)) for i in range(n_img)]
    t2i_itm = [reranked(t2i[j], lambda i, j=j: itm_logit(i, j)) for j in range(n_txt)]
    image_right = [{j for j in range(n_txt) if owner[j] == i} for i in range(n_img)]
    text_right = [{owner[j]} for j in range(n_txt)]
    itc_scores = {**recalls(i2t, image_right, "i2t"), **recalls(t2i, text_right, "t2i")}
    itm_scores = {**recalls(i2t_itm, image_right, "i2t"), **recalls(t2i_itm, text_right, "t2i")}
    references = {r.image_id: [simple_tokenize(c) for c in r.captions] for r in records}
    candidates = {image_id: [refs[-1]] for image_id, refs in references.items()}
    return {
        **{f"val/retrieval/{key}": value for key, value in itc_scores.items()},
        **{f"val/retrieval_itm/{key}": value for key, value in itm_scores.items()},
        "val/caption/bleu4": Bleu(4).compute_score(references, candidates, verbose=0)[0][3],
        "val/caption/cider": float(Cider().compute_score(references, candidates)[0]),
    }


def assert_scores_equal(got: dict, want: dict) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key  # recall is a float32 mean


@pytest.fixture
def split(tmp_path: Path) -> Path:
    write_split(tmp_path)
    return tmp_path


def test_every_caption_is_a_text_of_its_own_in_itc_and_itm_retrieval(split: Path, one_thread):
    source = coco_source(str(split))
    backbone, objectives = spread_backbone(source)
    dataset = source.dataset("val")
    batches = [source.collate([dataset[i] for i in rows]) for rows in ([0, 1, 2], [3, 4], [5, 6])]
    assert batches[0]["reference_row"].tolist() == [0, 0, 0, 1, 2, 2]
    got = validate(objectives, batches)
    want = brute_force(source, backbone, objectives.itm)
    assert_scores_equal(got, want)
    assert got["val/retrieval/t2i_r1"] < 1.0 and got["val/retrieval/i2t_r1"] < 1.0  # not trivially perfect
    assert got["val/caption/bleu4"] == pytest.approx(1.0)  # each candidate is one of its image's references


def _two_ranks(rank: int, out_dir: str, folder: str) -> None:
    torch.set_num_threads(1)
    source = coco_source(folder)
    _, objectives = spread_backbone(source)
    marked = PaddingMarked(source.dataset("val"), world_size=2)  # 7 images -> 8 rows, the last a repeat
    order = list(DistributedSampler(marked, num_replicas=2, rank=rank, shuffle=False))
    collate = marked.collate_with(source.collate)
    batches = [collate([marked[i] for i in order[s : s + 2]]) for s in range(0, len(order), 2)]
    torch.save(validate(objectives, batches), Path(out_dir) / f"scores{rank}.pt")


def test_two_ranks_with_a_padded_repeat_score_as_the_brute_force(split: Path, tmp_path_factory, one_thread):
    out_dir = tmp_path_factory.mktemp("ranks")
    run_on_ranks(_two_ranks, out_dir, str(split))
    source = coco_source(str(split))
    backbone, objectives = spread_backbone(source)
    want = brute_force(source, backbone, objectives.itm)
    for rank in (0, 1):
        assert_scores_equal(torch.load(Path(out_dir) / f"scores{rank}.pt"), want)
