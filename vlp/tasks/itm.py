"""Image-text matching with hard negatives (ALBEF ITM).

For every image one negative text, for every text one negative image, drawn from the softmaxed ITC
similarities over the GLOBAL batch (every rank's rows, as ALBEF does), so similar-but-wrong pairs are
drawn most often. A pair is never a negative when it is a positive: same image id, or exactly the same
caption (token ids), since duplicate captions describe both images; both are checked across ranks.
With `hard_negative_warmup`, the first steps draw the negatives uniformly instead (easy ones, so the head
learns to match at all before the hard ones refine it). Binary head on the fused [CLS]; cross-entropy over
B positives and 2B negatives per rank, so with DDP's gradient averaging W ranks of batch B train exactly like
one process with batch W * B. The 3B fused passes share what does not depend on the pair: each caption's
first fusion self-attention and each image's fusion keys and values are computed once (before the gather)
and gathered, and only [CLS] runs through the last fusion layer (exact: the same loss and gradients).
`negatives: albef` draws them as ALBEF's pre-training does instead: from this rank's batch only, each row's
softmaxed similarities with its own pair at -inf (nothing else excluded), scored online against the
momentum model's features when the backbone has one (ALBEF's `sim_i2t[:, :bs]`), else online against
online; `negatives: blip` as BLIP's does (the same rows, weights softmax + 1e-4 with the own pair at zero).
vlp's default sees W times more candidates and never draws a duplicate caption or another caption
of the same image as a "negative" (which ALBEF's would teach the head to reject).
Validation: accuracy on balanced pairs (every positive plus its hardest global-batch negative text);
the repeats a DistributedSampler pads with (`is_padding`) are mined from but never scored; with
`rerank_k`, retrieval over the whole split (every caption of an image a text of its own,
`vlp.tasks.retrieval_split`) re-ranked by this head (`vlp.tasks.itm_rerank`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import BinaryAccuracy

from vlp.platform.distributed.collectives import rank
from vlp.platform.metrics import retrieval_recall
from vlp.platform.model.backbone import FeatureCache, FusionBackbone, ImageFeatures, first_token
from vlp.platform.optim import OptimConfig
from vlp.tasks.base import Objective, ObjectiveOutput, real_rows
from vlp.tasks.global_rows import fusion_captions, global_rows
from vlp.tasks.itm_rerank import rerank_scores
from vlp.tasks.retrieval_split import RetrievalTexts, SplitRows, retrieval_texts, unique_images


def positive_pairs(image_ids: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, B] bool: True where image i and text j match (same image id, or identical caption tokens)."""
    same_image = image_ids[:, None] == image_ids[None, :]
    tokens = input_ids * attention_mask
    same_text = (tokens[:, None, :] == tokens[None, :, :]).all(-1) & (
        attention_mask.sum(-1)[:, None] == attention_mask.sum(-1)[None, :]
    )
    return same_image | same_text


def sample_hard_negatives(
    similarity: Tensor, positives: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw one negative column per row of `similarity` [B, B] (logits), never a positive.

    Returns (indices [B], valid [B]); `valid` is False for rows whose every column is a positive
    (e.g. a batch of one caption repeated), which then get no negative.
    """
    logits = similarity.float().masked_fill(positives, float("-inf"))
    valid = ~positives.all(dim=1)
    weights = torch.softmax(logits[valid], dim=1)
    indices = torch.zeros(similarity.shape[0], dtype=torch.long, device=similarity.device)
    if valid.any():
        indices[valid] = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return indices, valid


class MatchPairs(NamedTuple):
    """(image, text) pairs for the matching head as indices into the global batch: positives first, then
    the mined negatives."""

    image: ImageFeatures  # the global batch's images [W * B]: fusion keys and values, else tokens (+ sizes)
    text_tokens: Tensor  # the global batch's captions [W * B, L, Dt], after the first fusion self-attention
    self_attended: bool  # whether text_tokens went through it
    attention_mask: Tensor  # [W * B, L] of text_tokens
    image_index: Tensor  # [P]
    text_index: Tensor  # [P]
    labels: Tensor  # [P], 1 = match
    anchor_is_real: Tensor  # [P] bool: the pair's local anchor row is not a sampler padding repeat
    text_sizes: Tensor | None = None  # [W * B, L] merged captions' token sizes (merging.text_entry_r)


def global_match_pairs(
    batch: dict,
    features: FeatureCache,
    backbone: FusionBackbone,
    hardest: bool = False,
    hardness: float = 1.0,
) -> MatchPairs:
    """Positives of this rank's B rows plus negatives mined from the global batch of every rank.

    Reads every rank's rows from the step's one gather (`vlp.tasks.global_rows`: the text tokens and the
    image side of fusion with gradients; the ITC embeddings, image ids, caption ids and masks without).
    Negatives are drawn for every global row with the same draw a single process would make (identical
    on each rank when their RNGs agree, as under a seeded Lightning run) and each rank keeps its own rows.
    `hardest` takes the most similar negative text instead of sampling and mines no negative images
    (validation). `hardness` in [0, 1] is the share of rows whose negative is drawn ALBEF's way; the others
    draw theirs uniformly among their non-positives (1: ALBEF). Identity gathers on one process.
    """
    b = features.fused_image.tokens.shape[0]
    real = real_rows(batch)
    rows = global_rows(features)
    image_ids, input_ids, attention_mask = rows.image_ids, rows.input_ids, rows.attention_mask
    # the ITC embeddings only pick the negatives: no gradient through them from here
    image_emb, text_emb = rows.image.embedding.detach(), rows.text_embedding.detach()
    global_image = rows.image._replace(embedding=image_emb)
    logit_scale = backbone.logit_scale()
    local = torch.arange(b, device=image_emb.device) + rank() * b
    positives = positive_pairs(image_ids, input_ids, attention_mask)
    with torch.no_grad():
        similarity = image_emb @ text_emb.T * logit_scale
        if hardest:
            masked = similarity.masked_fill(positives, float("-inf"))
            neg_text, text_ok = masked.argmax(dim=1), ~positives.all(dim=1)
            image_ok = torch.zeros_like(text_ok)
            neg_image = neg_text
        else:
            if hardness < 1:  # rows drawing uniformly see equal logits
                hard = torch.rand(2, len(similarity), device=similarity.device) < hardness
                easy = torch.zeros_like(similarity)
                draws = (
                    torch.where(hard[0, :, None], similarity, easy),
                    torch.where(hard[1, :, None], similarity.T, easy),
                )
            else:
                draws = (similarity, similarity.T)
            neg_text, text_ok = sample_hard_negatives(draws[0], positives)
            neg_image, image_ok = sample_hard_negatives(draws[1], positives.T)
    text_ok, image_ok = text_ok[local], image_ok[local]
    image_index = torch.cat([local, local[text_ok], neg_image[local][image_ok]])
    text_index = torch.cat([local, neg_text[local][text_ok], local[image_ok]])
    labels = torch.zeros(len(image_index), dtype=torch.long, device=image_index.device)
    labels[:b] = 1
    anchor_is_real = torch.cat([real, real[text_ok], real[image_ok]])
    return MatchPairs(
        global_image,
        rows.text_tokens,
        rows.self_attended,
        rows.text_mask,
        image_index,
        text_index,
        labels,
        anchor_is_real,
        rows.text_sizes,
    )


def albef_match_pairs(
    batch: dict, features: FeatureCache, backbone: FusionBackbone, weights: Literal["albef", "blip"] = "albef"
) -> MatchPairs:
    """ALBEF's pre-training pairs from this rank's B rows: B positives, for each image one negative text
    and for each text one negative image, drawn from softmax(sim) with the diagonal at -inf, sim = online
    image (text) embeddings against the momentum model's text (image) embeddings over the temperature
    (online against online without a momentum model). Indices into the local batch.
    `weights="blip"`: BLIP's draw instead, in proportion to softmax(sim) + 1e-4 over the whole row with the
    own pair's weight then set to zero (`blip_pretrain.py`: every other row keeps a floor of 1e-4)."""
    image, text = features.fused_image, features.text
    b = image.embedding.shape[0]
    if b < 2:
        raise ValueError("itm: negatives=albef draws from the local batch, which needs at least 2 rows")
    # read outside no_grad: under FSDP2 the scale is a parametrized scalar whose read needs autograd
    scale = backbone.logit_scale().detach()
    with torch.no_grad():
        columns = (text.embedding, image.embedding)
        if backbone.momentum is not None:
            columns = (features.momentum_text.embedding, features.momentum_image.embedding)
        own = torch.eye(b, dtype=torch.bool, device=image.embedding.device)
        i2t = (scale * image.embedding @ columns[0].T).float()
        t2i = (scale * text.embedding @ columns[1].T).float()
        if weights == "blip":
            i2t = (i2t.softmax(dim=1) + 1e-4).masked_fill(own, 0.0)
            t2i = (t2i.softmax(dim=1) + 1e-4).masked_fill(own, 0.0)
        else:
            i2t = i2t.masked_fill(own, -torch.inf).softmax(dim=1)
            t2i = t2i.masked_fill(own, -torch.inf).softmax(dim=1)
        neg_text = torch.multinomial(i2t, 1).squeeze(1)
        neg_image = torch.multinomial(t2i, 1).squeeze(1)
    captions = fusion_captions(backbone, text)
    local = torch.arange(b, device=neg_text.device)
    labels = torch.zeros(3 * b, dtype=torch.long, device=local.device)
    labels[:b] = 1
    real = real_rows(batch)
    return MatchPairs(
        image._replace(embedding=image.embedding.detach()),
        captions.tokens,
        captions.self_attended,
        captions.mask,
        torch.cat([local, local, neg_image]),
        torch.cat([local, neg_text, local]),
        labels,
        torch.cat([real, real, real]),
        captions.sizes,
    )


class ITMObjective(Objective):
    """Image-text matching head on the fused [CLS] with ITC-weighted hard negatives."""

    name = "itm"
    reads_global_rows = True

    def __init__(
        self,
        backbone: FusionBackbone,
        optim: OptimConfig | None = None,
        rerank_k: int = 0,
        rerank_chunk: int = 256,
        rerank_score: Literal["itm", "itm+itc", "itm+cos"] = "itm",
        hard_negative_warmup: int = 0,
        negatives: Literal["global", "albef", "blip"] = "global",
    ) -> None:
        """`hard_negative_warmup` > 0: the first that many steps draw each negative uniformly among the
        non-positives, later ones ALBEF's way (ITC-weighted). ITC ranks well long before fusion can tell
        near-duplicates apart, so hard negatives from the first step can hold the head at chance (always "no
        match"); uniform ones first let it learn to match, and the hard ones then refine it (runs:
        benchmarks/results/2026-12-02-epyc-2cpu-make-train.md).
        `rerank_k` > 0: validation also ranks the whole split by ITC and re-scores each query's top
        `rerank_k` with this head (`val/retrieval_itm/*`; ALBEF's `k_test`: 256 on COCO, 128 on Flickr30k);
        `rerank_chunk` pairs go
        through fusion at a time. `rerank_score`: the match logit alone (ALBEF), plus the ITC logit
        s * cos ("itm+itc"), or plus the cosine itself ("itm+cos": BLIP's `score + topk_sim`). `negatives`: "global" (vlp's, see the module doc) or "albef" (ALBEF's pre-training
        draw from the local batch, `albef_match_pairs`) or "blip" (BLIP's: the same rows, weights
        softmax(sim) + 1e-4 with the own pair at zero)."""
        super().__init__(backbone, optim)
        if rerank_k < 0 or rerank_chunk < 1:
            raise ValueError(f"rerank_k must be >= 0 and rerank_chunk >= 1, got {rerank_k}, {rerank_chunk}")
        if rerank_score not in ("itm", "itm+itc", "itm+cos"):
            raise ValueError(f"rerank_score must be 'itm', 'itm+itc' or 'itm+cos', got {rerank_score!r}")
        if hard_negative_warmup < 0:
            raise ValueError(f"hard_negative_warmup must be >= 0, got {hard_negative_warmup}")
        self.rerank_k, self.rerank_chunk, self.rerank_score = rerank_k, rerank_chunk, rerank_score
        self.hard_negative_warmup = hard_negative_warmup
        if negatives not in ("global", "albef", "blip"):
            raise ValueError(f"itm: negatives must be 'global', 'albef' or 'blip', got {negatives!r}")
        if negatives != "global" and hard_negative_warmup:
            raise ValueError("itm: hard_negative_warmup applies to negatives=global only")
        self.negatives = negatives
        self.head = nn.Linear(backbone.width, 2)
        self.val_accuracy = BinaryAccuracy()
        # the split's unimodal features, kept for re-ranking (synced over ranks by torchmetrics)
        self.val_images = SplitRows(("embedding", "tokens")) if rerank_k else None
        self.val_texts = SplitRows(("embedding", "tokens", "mask")) if rerank_k else None

    def match_logits(self, pairs: MatchPairs) -> Tensor:
        """[P, 2] match / no-match logits of the pairs: image keys and values and the captions' first fusion
        self-attention are gathered rows, not recomputed, and the last fusion layer runs [CLS] alone."""
        rows = pairs.text_index
        mask = pairs.attention_mask.index_select(0, rows)
        cls = first_token(len(rows), mask.device)
        fused = self.backbone.fuse(
            pairs.image.take(pairs.image_index),
            pairs.text_tokens.index_select(0, rows),  # its backward adds rows (index_add), no sort
            mask,
            positions=cls,
            self_attended=pairs.self_attended,
            text_sizes=None if pairs.text_sizes is None else pairs.text_sizes.index_select(0, rows),
        )
        return self.head(fused[:, 0])

    def hardness(self, step: int) -> float:
        """The share of ITC-weighted negatives at optimizer step `step`: 0 during the warm-up, then 1."""
        return 0.0 if step < self.hard_negative_warmup else 1.0

    def forward_loss(self, batch: dict, features: FeatureCache) -> ObjectiveOutput:
        hardness = self.hardness(self.current_step())
        if self.negatives != "global":
            pairs = albef_match_pairs(batch, features, self.backbone, weights=self.negatives)
        else:
            pairs = global_match_pairs(batch, features, self.backbone, hardness=hardness)
        logits = self.match_logits(pairs)
        loss = F.cross_entropy(logits, pairs.labels)
        accuracy = (logits.argmax(-1) == pairs.labels).float().mean()
        logs = {"loss": loss, "acc": accuracy}
        if self.hard_negative_warmup:
            logs["hardness"] = torch.tensor(hardness)
        return ObjectiveOutput(loss, logs)

    def validation_update(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        pairs = global_match_pairs(batch, features, self.backbone, hardest=True)
        logits = self.match_logits(pairs)
        scored = pairs.anchor_is_real
        self.val_accuracy.update(logits.argmax(-1)[scored], pairs.labels[scored])
        if self.rerank_k:
            self.keep_for_reranking(batch, features.fused_image, retrieval_texts(batch, features))
        return {"loss": F.cross_entropy(logits, pairs.labels)}

    def validation_scores(self) -> dict[str, float]:
        if not self.val_accuracy.update_called:
            return {}
        accuracy = self.val_accuracy.compute().item()
        self.val_accuracy.reset()
        return {"val/itm/acc": accuracy, **self.reranked_retrieval()}

    def keep_for_reranking(self, batch: dict, image: ImageFeatures, texts: RetrievalTexts) -> None:
        """Store the batch's unimodal features (captions padded to `text.max_len`) for `reranked_retrieval`."""
        text = texts.features
        pad = self.backbone.text.max_len - text.tokens.shape[1]
        self.val_images.update(
            batch["image_id"], real_rows(batch), embedding=image.embedding, tokens=image.tokens
        )
        self.val_texts.update(
            texts.image_id,
            texts.real,
            embedding=text.embedding,
            tokens=F.pad(text.tokens, (0, 0, 0, pad)),
            mask=F.pad(text.attention_mask, (0, pad)).to(image.tokens.dtype),
        )

    @torch.no_grad()
    def reranked_retrieval(self) -> dict[str, float]:
        """R@1/5/10 both ways after re-scoring each query's ITC top `rerank_k` with the ITM head."""
        if not self.rerank_k or not self.val_images.update_called:
            return {}
        images, texts = unique_images(self.val_images.pop()), self.val_texts.pop()
        similarity = images["embedding"].float() @ texts["embedding"].float().T
        mask = texts["mask"].long()

        def match_logit(image_rows: Tensor, text_rows: Tensor) -> Tensor:
            length = int(mask[text_rows].sum(1).max())
            image = self.backbone.with_fusion_keys(
                ImageFeatures(images["tokens"][image_rows], images["embedding"][image_rows])
            )
            cls = first_token(len(text_rows), mask.device)
            text_tokens, text_mask = texts["tokens"][text_rows, :length], mask[text_rows, :length]
            logit = self.head(self.backbone.fuse(image, text_tokens, text_mask, positions=cls)[:, 0])[:, 1]
            if self.rerank_score == "itm+itc":
                logit = logit + self.backbone.logit_scale() * similarity[image_rows, text_rows]
            elif self.rerank_score == "itm+cos":
                logit = logit + similarity[image_rows, text_rows]
            return logit

        i2t, t2i = rerank_scores(similarity, self.rerank_k, match_logit, self.rerank_chunk)
        ids = texts["image_id"], images["image_id"]
        scores = {
            **{k: v for k, v in retrieval_recall(i2t, *ids).items() if k.startswith("i2t")},
            **{k: v for k, v in retrieval_recall(t2i, *ids).items() if k.startswith("t2i")},
        }
        return {f"val/retrieval_itm/{key}": value for key, value in scores.items()}
