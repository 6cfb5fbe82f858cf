"""Image captioning (BLIP's language-modelling objective) on the backbone's caption decoder.

Training: teacher forcing, inputs [CLS] w1 .. wn, targets w1 .. wn [SEP]; mean cross-entropy over the real
target tokens only (optional label smoothing), through the fused linear + cross-entropy kernel so the
[B * L, V] logits are never materialised. Validation: teacher-forced loss and next-token accuracy, then
captions generated from the image alone (greedy, or beam search when num_beams > 1) and scored with
corpus BLEU-4 and CIDEr-D against every reference caption of the split, gathered over all ranks.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from vlp.platform.distributed.collectives import all_gather_objects
from vlp.platform.metrics import bleu4, cider_d, simple_tokenize
from vlp.platform.model.backbone import FeatureCache, FusionBackbone, ImageFeatures
from vlp.platform.model.decoder import (
    IGNORE_INDEX,
    CaptionDecoder,
    beam_search,
    greedy_search,
    shift_for_teacher_forcing,
)
from vlp.platform.model.momentum import distilled_cross_entropy, ramped_alpha
from vlp.platform.optim import OptimConfig
from vlp.platform.run.visualization import annotate_captions
from vlp.tasks.base import Objective, ObjectiveOutput, check_distillation, real_rows
from vlp.tasks.caption_prompt import ignore_prompt, prompt_token_ids, prompted, with_prompt

MAX_LOGGED_IMAGES = 8


class CaptionObjective(Objective):
    """Captioning with the backbone's decoder (`FusionBackbone(caption_decoder=True)`).

    `num_beams` 1 decodes greedily; `max_length` bounds the generated tokens ([SEP] included);
    `length_penalty` divides a beam's log-probability by length ** length_penalty; `repetition_penalty`
    and `min_length` (EOS allowed from the `min_length`-th token on) as transformers and BLIP define them
    (BLIP's captioning: 3 beams, min_length 5); `early_stopping` when beam search ends a caption: "exact"
    (once no live beam can beat the finished ones) or "heuristic" (transformers' default, so BLIP's).
    """

    name = "caption"

    def __init__(
        self,
        backbone: FusionBackbone,
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
        chunk_size: int | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        max_length: int = 40,
        alpha: float = 0.0,
        alpha_warmup_steps: int = 0,
        repetition_penalty: float = 1.0,
        min_length: int = 0,
        prompt: str = "",
        early_stopping: Literal["exact", "heuristic"] = "exact",
    ) -> None:
        """`alpha`: weight of the momentum decoder's next-token distributions in the loss (BLIP-style
        distillation), reached after `alpha_warmup_steps`; needs the backbone's momentum model.
        `prompt`: text every caption starts with, never scored and fed before generating (BLIP's captioner:
        "a picture of "; `vlp.tasks.caption_prompt`); `max_length` counts the tokens after it."""
        super().__init__(backbone, optim)
        check_distillation("caption", backbone, alpha, alpha_warmup_steps)
        self.alpha, self.alpha_warmup_steps = alpha, alpha_warmup_steps
        if backbone.decoder is None:
            raise ValueError("CaptionObjective needs a backbone built with caption_decoder=True")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if not 1 <= max_length <= backbone.text.max_len:
            raise ValueError(
                f"max_length must be in [1, text.max_len={backbone.text.max_len}], got {max_length}"
            )
        if not repetition_penalty > 0 or not 0 <= min_length <= max_length:
            raise ValueError(
                f"need repetition_penalty > 0 and 0 <= min_length <= max_length, got {repetition_penalty}, "
                f"{min_length}"
            )
        self.repetition_penalty, self.min_length = repetition_penalty, min_length
        if early_stopping not in ("exact", "heuristic"):
            raise ValueError(f"early_stopping must be 'exact' or 'heuristic', got {early_stopping!r}")
        self.early_stopping = early_stopping
        self.prompt = prompt
        self.prompt_ids = prompt_token_ids(backbone.tokenizer, prompt)
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.max_length = max_length
        self.val_accuracy = MeanMetric()
        self._candidates: dict[int, str] = {}
        self._references: dict[int, list[str]] = {}

    @property
    def decoder(self) -> CaptionDecoder:
        return self.backbone.decoder

    def teacher_forced(self, batch: dict, features: FeatureCache) -> tuple[Tensor, Tensor]:
        """Decoder hidden states [B, L-1, D] and next-token targets [B, L-1] (IGNORE_INDEX at padding)."""
        inputs, mask, targets = self.teacher_inputs(batch)
        return self.backbone.decode(features.fused_image, inputs, mask), targets

    def teacher_inputs(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs [B, L'], their mask, next-token targets [B, L']) of the batch's captions, prompt first."""
        ids, mask = with_prompt(
            batch["input_ids"], batch["attention_mask"], self.prompt_ids, self.backbone.text.max_len
        )
        inputs, mask, targets = shift_for_teacher_forcing(ids, mask)
        return inputs, mask, ignore_prompt(targets, self.prompt_ids)

    def forward_loss(self, batch: dict, features: FeatureCache) -> ObjectiveOutput:
        hidden, targets = self.teacher_forced(batch, features)
        alpha = ramped_alpha(self.alpha, self.alpha_warmup_steps, self.current_step())
        if alpha == 0:
            loss = self.decoder.loss(hidden, targets, self.label_smoothing, self.chunk_size)
            return ObjectiveOutput(loss, {"loss": loss})
        keep = targets != IGNORE_INDEX
        with torch.no_grad():  # the momentum decoder's next-token distributions on the same prefixes
            momentum = features.momentum_backbone
            inputs, mask, _ = self.teacher_inputs(batch)
            hidden_m = momentum.decode(momentum.with_fusion_keys(features.momentum_image), inputs, mask)
            logits_m = momentum.decoder.logits(hidden_m[keep])
        logits = self.decoder.logits(hidden[keep])
        loss = distilled_cross_entropy(logits, targets[keep], logits_m, alpha, self.label_smoothing)
        return ObjectiveOutput(loss, {"loss": loss, "alpha": torch.tensor(alpha)})

    @torch.no_grad()
    def generate(self, image: ImageFeatures) -> Tensor:
        """Token ids [B, T] of one caption per image (no [CLS]; [PAD] after [SEP]); images encoded once,
        their fusion keys and values computed once, one token per step through the decoder's cache."""
        tokenizer = self.backbone.tokenizer
        b, k = image.tokens.shape[0], self.num_beams
        image = self.backbone.with_fusion_keys(image)
        expanded = (
            image if k == 1 else image.take(torch.arange(b, device=image.tokens.device).repeat_interleave(k))
        )
        decode = prompted(self.backbone.start_decoding(expanded), self.prompt_ids)
        tokens = {
            "bos_id": tokenizer.cls_token_id,
            "eos_id": tokenizer.sep_token_id,
            "pad_id": tokenizer.pad_token_id,
            "max_length": self.max_length,
            "device": image.tokens.device,
            "repetition_penalty": self.repetition_penalty,
            "min_length": self.min_length,
        }
        if k == 1:
            return greedy_search(decode, b, **tokens)
        return beam_search(
            decode,
            b,
            num_beams=k,
            length_penalty=self.length_penalty,
            early_stopping=self.early_stopping,
            **tokens,
        )[0]

    def captions(self, image: ImageFeatures) -> list[str]:
        return self.backbone.tokenizer.batch_decode(self.generate(image), skip_special_tokens=True)

    def validation_update(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        hidden, targets = self.teacher_forced(batch, features)
        keep = targets != IGNORE_INDEX
        logits = self.decoder.logits(hidden[keep]).float()
        labels = targets[keep]
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        scored = real_rows(batch)[:, None].expand_as(keep)[keep]
        if scored.any():
            correct = (logits.argmax(-1) == labels)[scored]
            self.val_accuracy.update(correct.float().mean(), weight=correct.numel())
        references = batch.get("references") or [[caption] for caption in batch["captions"]]
        for image_id, caption, refs in zip(
            batch["image_id"].tolist(), self.captions(features.fused_image), references, strict=True
        ):
            self._candidates[image_id] = caption
            self._references[image_id] = list(refs)
        return {"loss": loss}

    def validation_scores(self) -> dict[str, float]:
        candidates, references = self._gathered_captions()
        self._candidates, self._references = {}, {}
        if not candidates:
            return {}
        accuracy = self.val_accuracy.compute().item()
        self.val_accuracy.reset()
        candidates = {key: simple_tokenize(text) for key, text in candidates.items()}
        references = {key: [simple_tokenize(text) for text in refs] for key, refs in references.items()}
        return {
            "val/caption/acc": accuracy,
            "val/caption/bleu4": bleu4(candidates, references),
            "val/caption/cider": cider_d(candidates, references),
        }

    def _gathered_captions(self) -> tuple[dict[int, str], dict[int, list[str]]]:
        """Every rank's captions; keyed by image id, so the repeats a DistributedSampler pads with vanish."""
        candidates: dict[int, str] = {}
        references: dict[int, list[str]] = {}
        for shard_candidates, shard_references in all_gather_objects((self._candidates, self._references)):
            candidates.update(shard_candidates)
            references.update(shard_references)
        return candidates, references

    def validation_images(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        """Up to 8 images with the generated caption (yellow) above the reference caption (grey)."""
        n = min(MAX_LOGGED_IMAGES, batch["image"].shape[0])
        generated = self.captions(features.fused_image.take(torch.arange(n, device=batch["image"].device)))
        texts = [
            [f"gen: {gen}", f"ref: {ref}"] for gen, ref in zip(generated, batch["captions"][:n], strict=True)
        ]
        return {"val/caption/samples": annotate_captions(batch["image"][:n], texts)}

    def predict(self, batch: dict, features: FeatureCache) -> dict[str, Any]:
        return {"caption": self.captions(features.fused_image)}
