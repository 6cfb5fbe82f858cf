"""Momentum (EMA) model and feature queues, as ALBEF trains with them.

`MomentumModel` holds an exponential moving average of the backbone (and of the heads objectives register
with `track`): after every optimizer step, p_m <- decay * p_m + (1 - decay) * p. Its parameters never get
gradients and are not in the optimizer; they live in the backbone's state dict (`backbone.momentum.*`), so
checkpoints resume them exactly. Objectives read it to distil (soft targets mixed into their labels by
`alpha`, ramped up by `ramped_alpha`).

`FeatureQueue` keeps the momentum model's image and text embeddings of past batches (gathered over ranks
before they are enqueued, so every rank holds the same queue), with the image id of each, as extra
contrastive negatives far beyond the batch; its pointer is a buffer, so it resumes too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.platform.distributed.collectives import all_gather_many


@dataclass
class MomentumConfig:
    """`decay`: EMA factor per optimizer step (ALBEF: 0.995)."""

    decay: float = 0.995

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"momentum decay must be in [0, 1), got {self.decay}")


class MomentumModel(nn.Module):
    """EMA copies of a backbone and of registered heads; `update()` after each optimizer step."""

    def __init__(self, backbone: nn.Module, config: MomentumConfig, shared: tuple = ()) -> None:
        """`shared`: attributes to reference rather than copy (e.g. the tokenizer)."""
        super().__init__()
        self.config = config
        memo = {id(obj): obj for obj in shared}
        self.backbone = frozen(copy.deepcopy(backbone, memo))
        self.heads = nn.ModuleDict()
        # the online modules, held outside this module's children so their parameters exist once
        self._online: dict[str, nn.Module] = {"backbone": backbone}

    def track(self, name: str, head: nn.Module) -> nn.Module:
        """Register an objective's head: returns its EMA copy (updated with the backbone)."""
        if name in self.heads:
            raise ValueError(f"a momentum head named {name!r} is registered already")
        self.heads[name] = frozen(copy.deepcopy(head))
        self._online[name] = head
        return self.heads[name]

    def pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum) module pairs, backbone first."""
        return [(self._online["backbone"], self.backbone)] + [
            (self._online[name], head) for name, head in self.heads.items()
        ]

    def held_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """(online, momentum) tensors this rank holds, matched element for element (see `held_tensors`)."""
        online, momentum = [], []
        for source, target in self.pairs():
            for (name, p), (name_m, p_m) in zip(
                online_parameters(source), target.named_parameters(), strict=True
            ):
                if name != name_m:
                    raise RuntimeError(f"momentum copy out of step with the model: {name} vs {name_m}")
                held, held_m = held_tensors(p), held_tensors(p_m)
                if [t.shape for t in held] != [t.shape for t in held_m]:
                    raise RuntimeError(f"momentum copy of {name} is not sharded like the model")
                online += held
                momentum += held_m
        return online, momentum

    @torch.no_grad()
    def sync(self) -> None:
        """Set every momentum copy equal to its online module (ALBEF's `copy_params`, e.g. after loading)."""
        online, momentum = self.held_pairs()
        # Private API (torch 2.14.1, tests/test_private_apis.py): the multi-tensor ops (one kernel launch for
        # all parameters, what torch's own optimizers and swa_utils use); the public route is a Python loop
        torch._foreach_copy_(momentum, online)

    @torch.no_grad()
    def update(self) -> None:
        """p_m <- decay * p_m + (1 - decay) * p for every tracked parameter, on what this rank holds."""
        online, momentum = self.held_pairs()
        torch._foreach_lerp_(momentum, online, 1.0 - self.config.decay)


def held_tensors(param: Tensor) -> list[Tensor]:
    """What this rank holds of `param`, to update in place. The momentum copy is a child of the backbone,
    so every strategy shards it like the backbone and the EMA is a local, element-wise update:
    - FSDP2: the parameter is a DTensor whose local shard lines up with its copy's (same mesh, Shard(0));
    - DeepSpeed ZeRO-3: the rank's partition `ds_tensor` (the parameter itself is empty outside forward),
      plus the whole tensor while ZeRO-3 keeps it gathered (parameters under the persistence threshold),
      so both stay equal; DeepSpeed checkpoints the partitions of frozen parameters;
    - otherwise (DDP, ZeRO-2, one process): the parameter.
    """
    partition = getattr(param, "ds_tensor", None)
    if partition is None:
        return [param.detach()]
    held = [partition]
    if param.data.numel() == param.ds_numel:
        held.append(param.data)
    return held


def online_parameters(module: nn.Module) -> list[tuple[str, Tensor]]:
    """`module`'s named parameters without those of its own momentum model (in the same order as the copy)."""
    return [(name, p) for name, p in module.named_parameters() if not name.startswith("momentum.")]


def frozen(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum_j targets_ij log softmax(logits_i)_j (logits, targets [N, C]); -inf logits with
    0 target add nothing. The distillation loss against the momentum model's soft targets."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(targets * log_probs.masked_fill(targets == 0, 0.0)).sum(dim=-1).mean()


def distilled_cross_entropy(
    logits: Tensor, labels: Tensor, momentum_logits: Tensor | None, alpha: float, label_smoothing: float = 0.0
) -> Tensor:
    """(1 - alpha) CE(logits, labels) + alpha * soft CE against softmax(momentum_logits) (ALBEF MLM, BLIP LM);
    logits [N, V], labels [N]."""
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    if momentum_logits is None or alpha == 0:
        return loss
    return (1 - alpha) * loss + alpha * soft_cross_entropy(logits, momentum_logits.float().softmax(dim=-1))


def ramped_alpha(alpha: float, warmup_steps: int, step: int) -> float:
    """ALBEF's distillation weight: `alpha` ramped up linearly over the first `warmup_steps` steps."""
    if warmup_steps <= 0:
        return alpha
    return alpha * min(1.0, step / warmup_steps)


class FeatureQueue(nn.Module):
    """A ring buffer of `size` (image embedding [E], text embedding [E], image id) rows.

    `enqueue` gathers the rows of every rank first, so all ranks hold the same queue. `contents()` returns
    the filled rows (fewer than `size` until it wraps), oldest first after a wrap is not promised.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.size = size
        self.register_buffer("image", torch.zeros(size, dim))
        self.register_buffer("text", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image: Tensor, text: Tensor, ids: Tensor) -> None:
        """Append rows [B, E], [B, E], [B] of every rank at the pointer, overwriting the oldest ones."""
        image, text, ids = all_gather_many([image.detach(), text.detach(), ids])
        n = ids.shape[0]
        if n > self.size:  # more rows than the queue holds: the last `size` stay
            image, text, ids = image[-self.size :], text[-self.size :], ids[-self.size :]
            n = self.size
        slots = (self.pointer + torch.arange(n, device=ids.device)) % self.size
        self.image[slots] = image.to(self.image.dtype)
        self.text[slots] = text.to(self.text.dtype)
        self.ids[slots] = ids.to(self.ids.dtype)
        self.pointer.copy_((self.pointer + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))

    def contents(self) -> tuple[Tensor, Tensor, Tensor]:
        """The filled rows: image [K, E], text [K, E], ids [K], K <= size."""
        k = int(self.filled)
        return self.image[:k], self.text[:k], self.ids[:k]
