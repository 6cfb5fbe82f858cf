"""Masked language modelling conditioned on the image (BERT masking, ALBEF MLM).

15 % of the real, non-special tokens are selected; of those 80 % become [MASK], 10 % a random
non-special token, 10 % stay unchanged. The masked caption is encoded, fused with the image tokens (the last
fusion layer computes the selected positions' queries only) and only the selected positions are scored, by a BERT prediction head tied to the word embeddings through
the fused linear + cross-entropy kernel (the [M, V] logits are never materialised in training).

`masking: albef` masks as ALBEF does instead: 15 % of every token but [PAD] and [CLS] ([SEP] can be
masked, and other special tokens), random replacements drawn from the whole vocabulary (special and unused
ids included). ALBEF computes the logits at every position and scores the masked ones; the loss, its
gradients and the logits at the masked positions are the same whichever positions the last layer
computes (fusion is bidirectional and the loss reads only masked positions), so vlp computes those alone.
vlp's default keeps special tokens as they are, since predicting [SEP] at the end of a caption
teaches nothing.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from vlp.platform.kernels import linear_cross_entropy
from vlp.platform.model.backbone import FeatureCache, FusionBackbone, ImageFeatures
from vlp.platform.model.momentum import distilled_cross_entropy, ramped_alpha
from vlp.platform.optim import OptimConfig
from vlp.tasks.base import Objective, ObjectiveOutput, check_distillation, real_rows

IGNORE_INDEX = -100


def mask_tokens(
    input_ids: Tensor,
    maskable: Tensor,
    mask_token_id: int,
    random_token_ids: Tensor,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking of input_ids [B, L] where `maskable` [B, L] is True (real, non-special tokens).

    Returns (masked ids [B, L], labels [B, L] with IGNORE_INDEX where not selected). Random draws come
    from `generator` on the CPU when given (reproducible validation), else from the global RNG.
    """
    device = input_ids.device
    rand_device = "cpu" if generator is not None else device

    def uniform() -> Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=rand_device).to(device)

    selected = (uniform() < probability) & maskable
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = uniform()
    masked = input_ids.clone()
    masked[selected & (action < 0.8)] = mask_token_id
    use_random = selected & (action >= 0.8) & (action < 0.9)
    picks = torch.randint(len(random_token_ids), input_ids.shape, generator=generator, device=rand_device)
    masked[use_random] = random_token_ids.to(device)[picks.to(device)][use_random]
    return masked, labels


def selected_positions(selected: Tensor) -> tuple[Tensor, Tensor]:
    """bool [B, L] -> (positions [B, Q] of each row's selected tokens in order, Q = the most in a row,
    padded with 0; kept [B, Q] marking the real ones), so `fused[kept]` lists them as `x[selected]` does."""
    counts = selected.sum(dim=1)
    order = torch.sort((~selected).to(torch.uint8), dim=1, stable=True).indices
    width = int(counts.max()) if counts.numel() else 0
    kept = torch.arange(width, device=selected.device)[None, :] < counts[:, None]
    return order[:, :width], kept


class MLMHead(nn.Module):
    """BERT's transform (dense, GELU, LayerNorm); the decoder weight is the tied word embedding."""

    def __init__(self, width: int, vocab_size: int, layer_norm_eps: float = 1e-5) -> None:
        """`layer_norm_eps`: the fusion stack's (`FusionConfig.layer_norm_eps`; BERT / ALBEF: 1e-12)."""
        super().__init__()
        self.transform = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=layer_norm_eps)
        )
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.transform(hidden)


class MLMObjective(Objective):
    """Masked language modelling on the fused text tokens; loss only on masked positions."""

    name = "mlm"

    def __init__(
        self,
        backbone: FusionBackbone,
        optim: OptimConfig | None = None,
        mask_probability: float = 0.15,
        chunk_size: int | None = None,
        alpha: float = 0.0,
        alpha_warmup_steps: int = 0,
        masking: Literal["bert", "albef"] = "bert",
    ) -> None:
        """`alpha`: weight of the momentum model's token distributions in the loss (ALBEF: 0.4), reached
        after `alpha_warmup_steps`; needs the backbone's momentum model. `masking`: "bert" (real,
        non-special tokens; random replacements among non-special ids) or "albef" (see the module doc)."""
        super().__init__(backbone, optim)
        if not 0.0 < mask_probability < 1.0:
            raise ValueError(f"mask_probability must be in (0, 1), got {mask_probability}")
        check_distillation("mlm", backbone, alpha, alpha_warmup_steps)
        self.alpha, self.alpha_warmup_steps = alpha, alpha_warmup_steps
        self.mask_probability = mask_probability
        self.chunk_size = chunk_size
        self.head = MLMHead(backbone.width, backbone.vocab_size, backbone.fusion.config.layer_norm_eps)
        self.momentum_head = backbone.momentum.track("mlm", self.head) if alpha > 0 else None
        if masking not in ("bert", "albef"):
            raise ValueError(f"mlm: masking must be 'bert' or 'albef', got {masking!r}")
        self.masking = masking
        if masking == "albef":  # ALBEF draws from the word-embedding rows (its config's vocab_size)
            random_ids = torch.arange(backbone.vocab_size)
        else:
            vocab = torch.arange(len(backbone.tokenizer))
            random_ids = vocab[~torch.isin(vocab, backbone.special_token_ids)]
        self.register_buffer("random_token_ids", random_ids, persistent=False)
        self.val_accuracy = MeanMetric()

    def masked_hidden(self, batch: dict, features: FeatureCache, seeded: bool = False):
        """Fused, transformed hidden states at the selected positions [M, D] and their labels [M]."""
        masked_ids, labels = self.mask(batch, seeded)
        hidden = self.fused_hidden(self.backbone, self.head, features.fused_image, masked_ids, batch, labels)
        return hidden, labels[labels != IGNORE_INDEX]

    def mask(self, batch: dict, seeded: bool = False) -> tuple[Tensor, Tensor]:
        """BERT-masked caption ids [B, L] and labels [B, L] (IGNORE_INDEX where not selected).

        `seeded` (validation) masks each caption with a generator seeded by its image id, over its real
        tokens only, and never masks `is_padding` repeats: every sample gets the same masks whatever
        batch, padding or number of ranks it lands in, and counts once.
        """
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        if self.masking == "albef":  # every real token but [CLS]
            maskable = attention_mask.bool() & (input_ids != self.backbone.tokenizer.cls_token_id)
        else:
            maskable = attention_mask.bool() & ~self.backbone.special_tokens_mask(input_ids)
        if not seeded:
            return self._mask(input_ids, maskable)
        masked_ids, labels = input_ids.clone(), torch.full_like(input_ids, IGNORE_INDEX)
        rows = zip(
            batch["image_id"].tolist(),
            attention_mask.sum(dim=1).tolist(),
            real_rows(batch).tolist(),
            strict=True,
        )
        for i, (image_id, n, real) in enumerate(rows):
            if real:
                masked_ids[i, :n], labels[i, :n] = self._mask(
                    input_ids[i : i + 1, :n], maskable[i : i + 1, :n], torch.Generator().manual_seed(image_id)
                )
        return masked_ids, labels

    def _mask(
        self, input_ids: Tensor, maskable: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        return mask_tokens(
            input_ids,
            maskable,
            self.backbone.tokenizer.mask_token_id,
            self.random_token_ids,
            self.mask_probability,
            generator,
        )

    @staticmethod
    def fused_hidden(
        backbone: FusionBackbone,
        head: MLMHead,
        image: ImageFeatures,
        masked_ids: Tensor,
        batch: dict,
        labels: Tensor,
    ) -> Tensor:
        """`head` on the fused masked caption at the selected positions [M, D] (the last fusion layer
        computes those queries only), for the online or the momentum backbone."""
        attention_mask = batch["attention_mask"]
        text = backbone.text_tokens(masked_ids, attention_mask)
        positions, kept = selected_positions(labels != IGNORE_INDEX)
        fused = backbone.fuse(image, text, attention_mask, merge_text=False, positions=positions)
        return head(fused[kept])

    def forward_loss(self, batch: dict, features: FeatureCache) -> ObjectiveOutput:
        masked_ids, all_labels = self.mask(batch)
        hidden = self.fused_hidden(
            self.backbone, self.head, features.fused_image, masked_ids, batch, all_labels
        )
        labels = all_labels[all_labels != IGNORE_INDEX]
        weight = self.backbone.text.word_embeddings.weight
        alpha = ramped_alpha(self.alpha, self.alpha_warmup_steps, self.current_step())
        logs = {"masked_tokens": torch.tensor(float(labels.numel()))}
        if alpha == 0:
            loss = linear_cross_entropy(
                hidden, weight, labels, bias=self.head.bias, chunk_size=self.chunk_size
            )
            return ObjectiveOutput(loss, {"loss": loss, **logs})
        with torch.no_grad():  # the momentum model's distributions over the same masked positions
            momentum = features.momentum_backbone
            image_m = momentum.with_fusion_keys(features.momentum_image)
            hidden_m = self.fused_hidden(momentum, self.momentum_head, image_m, masked_ids, batch, all_labels)
            logits_m = hidden_m @ momentum.text.word_embeddings.weight.T + self.momentum_head.bias
        logits = hidden @ weight.T + self.head.bias
        loss = distilled_cross_entropy(logits, labels, logits_m, alpha)
        return ObjectiveOutput(loss, {"loss": loss, "alpha": torch.tensor(alpha), **logs})

    def validation_update(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        hidden, labels = self.masked_hidden(batch, features, seeded=True)
        logits = hidden @ self.backbone.text.word_embeddings.weight.T + self.head.bias
        if labels.numel():
            self.val_accuracy.update((logits.argmax(-1) == labels).float().mean(), weight=labels.numel())
        loss = nn.functional.cross_entropy(logits, labels) if labels.numel() else logits.sum() * 0
        return {"loss": loss}

    def validation_scores(self) -> dict[str, float]:
        if not self.val_accuracy.update_called:
            return {}
        accuracy = self.val_accuracy.compute().item()
        self.val_accuracy.reset()
        return {"val/mlm/acc": accuracy}
