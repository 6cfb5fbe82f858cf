"""Image-text contrastive learning (CLIP / ALBEF ITC, SigLIP).

Two losses (`loss`), both from `vlp.platform.losses`, where their distributed behaviour is written down:
  "infonce" (CLIP): symmetric InfoNCE over the batch with the backbone's learnable temperature,
    L = 1/2 [CE(s * I T^T, diag) + CE(s * T I^T, diag)],  I, T L2-normalised [B, E],
    each rank's rows scored against every rank's columns (gathered with gradients), tiled when chunked.
  "sigmoid" (SigLIP): every image-text pair a binary problem,
    L = 1/B sum_i sum_j -log sigmoid(z_ij (t <x_i, y_j> + b)),
    z = +1 for a pair of the same image id or an identical caption (duplicates are positives, as in ITM), -1
    otherwise; t the backbone's logit scale (SigLIP initialises it at 10: `init_temperature: 0.1`), b the
    backbone's learnable bias (SigLIP: `init_logit_bias: -10`). Other ranks' texts arrive by neighbour
    exchange (`exchange`).
Validation: retrieval R@1/5/10 both ways over the whole val split, every caption of an image a text of its
own (`vlp.tasks.retrieval_split`): image -> text is right when any of the image's captions is in the top K,
text -> image when the caption's one image is. Ranked by cosine similarity, whose order is that of either
loss's logits and of the sigmoid probabilities (monotone maps, t > 0); what the sigmoid loss adds is the
meaning of a score: `match_probability` (and `predict`'s) is a pair's own probability of matching.

With the backbone's momentum model (ALBEF, InfoNCE only), two switches: `queue_size` keeps the momentum
embeddings of past batches (gathered over ranks) as extra negative columns, and `alpha` mixes the one-hot
targets with the momentum model's softmaxed similarities over the same columns,
    targets = alpha * softmax(s * I_m [T_m; Q_t]^T) + (1 - alpha) * onehot,
ramped up over `alpha_warmup_steps`. Queue rows of an image in the batch are masked out (they are neither
its negatives nor counted as positives). alpha = 0 and no queue is exactly the loss above. `score_against`
picks the columns: the global online batch (vlp) or this rank's momentum embeddings (ALBEF's pretraining).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from vlp.platform.distributed.collectives import is_distributed, pad_to
from vlp.platform.kernels import sigmoid_contrastive_loss
from vlp.platform.losses import distilled_infonce_loss, infonce_loss, positive_pairs, sigmoid_loss
from vlp.platform.losses.infonce import ScoreAgainst
from vlp.platform.losses.sigmoid import Exchange
from vlp.platform.metrics import retrieval_recall
from vlp.platform.model.backbone import FeatureCache, FusionBackbone
from vlp.platform.model.momentum import FeatureQueue, ramped_alpha
from vlp.platform.optim import OptimConfig
from vlp.tasks.base import Objective, ObjectiveOutput, check_distillation, real_rows
from vlp.tasks.global_rows import global_rows
from vlp.tasks.retrieval_split import SplitRows, retrieval_texts, unique_images


class ITCObjective(Objective):
    """Image-text contrastive objective; `chunk_size` tiles the similarity matrix to save memory."""

    name = "itc"
    reads_global_rows = True

    def __init__(
        self,
        backbone: FusionBackbone,
        optim: OptimConfig | None = None,
        chunk_size: int | None = None,
        alpha: float = 0.0,
        alpha_warmup_steps: int = 0,
        queue_size: int = 0,
        loss: Literal["infonce", "sigmoid"] = "infonce",
        exchange: Exchange = "bidirectional",
        score_against: ScoreAgainst = "online",
    ):
        """`alpha`: weight of the momentum model's soft targets (ALBEF: 0.4), reached after
        `alpha_warmup_steps`; `queue_size`: momentum embeddings kept as extra negatives (ALBEF: 65536);
        `loss`: "infonce" (CLIP, ALBEF) or "sigmoid" (SigLIP, with the backbone's learnable bias:
        `init_logit_bias`); `exchange`: how the sigmoid loss visits other ranks' texts, "ring" or
        "bidirectional"; `score_against`: "online" (vlp: the global online batch plus the queue) or
        "momentum" (ALBEF: the momentum embeddings plus the queue)."""
        super().__init__(backbone, optim)
        check_distillation("itc", backbone, alpha, alpha_warmup_steps)
        if queue_size < 0:
            raise ValueError(f"itc: queue_size must be >= 0, got {queue_size}")
        if queue_size > 0 and backbone.momentum is None:
            raise ValueError(
                "itc: queue_size > 0 fills the queue from the backbone's momentum model; "
                "set backbone.init_args.momentum: {decay: 0.995}"
            )
        if loss not in ("infonce", "sigmoid"):
            raise ValueError(f"itc: loss must be 'infonce' or 'sigmoid', got {loss!r}")
        if loss == "sigmoid" and (alpha > 0 or queue_size > 0):
            raise ValueError(
                "itc: the sigmoid loss has no momentum distillation; set alpha: 0 and queue_size: 0"
            )
        if exchange not in ("ring", "bidirectional"):
            raise ValueError(f"itc: exchange must be 'ring' or 'bidirectional', got {exchange!r}")
        if score_against not in ("online", "momentum"):
            raise ValueError(f"itc: score_against must be 'online' or 'momentum', got {score_against!r}")
        if score_against == "momentum" and (backbone.momentum is None or loss != "infonce"):
            raise ValueError(
                "itc: score_against: momentum scores against the momentum model's embeddings (InfoNCE); "
                "set backbone.init_args.momentum: {decay: 0.995} and loss: infonce"
            )
        if loss == "sigmoid" and backbone.logit_bias is None:
            raise ValueError(
                "itc: the sigmoid loss learns the backbone's pair bias b: set backbone.init_args.init_logit_bias "
                "(SigLIP: -10)"
            )
        self.chunk_size = chunk_size
        self.alpha, self.alpha_warmup_steps = alpha, alpha_warmup_steps
        self.loss, self.exchange, self.score_against = loss, exchange, score_against
        # the sigmoid loss scores each rank's texts by exchange, not from the step's shared gather
        self.reads_global_rows = loss == "infonce"
        self.queue = FeatureQueue(queue_size, backbone.vision_proj.out_features) if queue_size else None
        self.val_images, self.val_texts = SplitRows(("embedding",)), SplitRows(("embedding",))

    @property
    def pair_bias(self) -> Tensor | None:
        """The backbone's learnable pair bias b when this objective trains with the sigmoid loss, else None."""
        return self.backbone.logit_bias if self.loss == "sigmoid" else None

    def forward_loss(self, batch: dict, features: FeatureCache) -> ObjectiveOutput:
        scale = self.backbone.logit_scale()
        image, text = features.image.embedding, features.text.embedding
        if self.pair_bias is not None:
            loss = sigmoid_loss(
                image,
                text,
                scale,
                self.pair_bias,
                image_ids=batch["image_id"],
                captions=self.caption_keys(batch),
                exchange=self.exchange,
                chunk_size=self.chunk_size,
            )
            return ObjectiveOutput(loss, {"loss": loss, "logit_scale": scale, "logit_bias": self.pair_bias})
        alpha = ramped_alpha(self.alpha, self.alpha_warmup_steps, self.current_step())
        if self.queue is None and alpha == 0 and self.score_against == "online":
            gathered = self.shared_columns(features) if is_distributed() else None
            loss = infonce_loss(image, text, scale, gathered=gathered, chunk_size=self.chunk_size)
            return ObjectiveOutput(loss, {"loss": loss, "logit_scale": scale})
        gathered = self.shared_columns(features) if self.score_against == "online" else None
        momentum = None
        if self.backbone.momentum is not None:
            momentum = (features.momentum_image.embedding, features.momentum_text.embedding)
        loss = distilled_infonce_loss(
            image,
            text,
            scale,
            batch["image_id"],
            alpha=alpha,
            momentum=momentum,
            queue=None if self.queue is None else self.queue.contents(),
            gathered=gathered,
            score_against=self.score_against,
        )
        if self.queue is not None and self.training and torch.is_grad_enabled():
            self.queue.enqueue(*momentum, batch["image_id"])
        return ObjectiveOutput(loss, {"loss": loss, "logit_scale": scale, "alpha": torch.tensor(alpha)})

    def shared_columns(self, features: FeatureCache) -> tuple[Tensor, Tensor] | None:
        """Every rank's (image, text) embeddings [W * B, E] from the step's one gather when ITM gathers too
        (`features.share_global_rows`); None lets the loss gather its own."""
        if not features.share_global_rows:
            return None
        rows = global_rows(features)
        return rows.image.embedding, rows.text_embedding

    def caption_keys(self, batch: dict) -> Tensor:
        """[B, 1 + max_len]: each caption's length, then its token ids zero-padded to the text tower's limit
        (a width every rank knows): equal rows are identical captions, whatever the batch's padding."""
        mask = batch["attention_mask"]
        tokens = pad_to(batch["input_ids"] * mask, 1, self.backbone.text.max_len)
        return torch.cat([mask.sum(dim=1, keepdim=True), tokens], dim=1)

    def validation_update(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        image_emb, text_emb = features.image.embedding, features.text.embedding
        self.val_images.update(batch["image_id"], real_rows(batch), embedding=image_emb)
        texts = retrieval_texts(batch, features)
        self.val_texts.update(texts.image_id, texts.real, embedding=texts.features.embedding)
        scale = self.backbone.logit_scale()
        if self.pair_bias is None:
            return {"loss": infonce_loss(image_emb, text_emb, scale, gather=False)}
        keys = torch.cat([batch["image_id"][:, None], self.caption_keys(batch)], dim=1)
        positives = positive_pairs(keys, keys)
        return {
            "loss": sigmoid_contrastive_loss(image_emb, text_emb, scale, self.pair_bias, positives=positives)
        }

    def match_probability(self, image: Tensor, text: Tensor) -> Tensor:
        """[N] sigmoid(t <x, y> + b) of the pairs (image [N, E], text [N, E]) of a model trained with the
        sigmoid loss: each pair's own probability of matching, with no reference to other candidates."""
        if self.pair_bias is None:
            raise ValueError(
                "itc: match probabilities need the sigmoid loss; InfoNCE scores only rank candidates"
            )
        logits = self.backbone.logit_scale() * (image.float() * text.float()).sum(dim=-1) + self.pair_bias
        return logits.sigmoid()

    def validation_scores(self) -> dict[str, float]:
        if not self.val_images.update_called:
            return {}
        images, texts = unique_images(self.val_images.pop()), self.val_texts.pop()
        # cosine order: the order of the InfoNCE logits s cos and of the sigmoid scores sigmoid(t cos + b),
        # monotone in it (t > 0), without their rounding ties
        similarity = images["embedding"].float() @ texts["embedding"].float().T
        scores = retrieval_recall(similarity, text_image_ids=texts["image_id"], image_ids=images["image_id"])
        return {f"val/retrieval/{key}": value for key, value in scores.items()}

    @torch.no_grad()
    def predict(self, batch: dict, features: FeatureCache) -> dict:
        out = {"image_embedding": features.image.embedding, "text_embedding": features.text.embedding}
        if self.pair_bias is not None:
            out["match_probability"] = self.match_probability(out["image_embedding"], out["text_embedding"])
        return out
