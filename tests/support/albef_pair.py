"""A LAVIS `AlbefPretrain` (small, random, momentum copies apart from the online model) and the vlp module
its converted weights load into, with ALBEF's ITM and MLM options on: the pair the ALBEF objective tests
compare."""

from __future__ import annotations

from functools import partial

import torch
from lavis_reference import albef_pretrain, bert_tokenizer

from vlp.platform.model.backbone import FusionBackbone
from vlp.platform.model.convert_albef import convert_albef
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig
from vlp.platform.model.momentum import MomentumConfig
from vlp.tasks.itm import ITMObjective
from vlp.tasks.mlm import MLMObjective
from vlp.tasks.multitask import MultiTaskModule

CAPTIONS = [
    "a red square left of a blue circle",
    "two dogs",
    "a small green triangle above a large yellow square",
    "the cat sleeps",
    "a yellow circle",
]


def albef_pair():
    reference = albef_pretrain(queue_size=20)  # a multiple of the batch (LAVIS asserts it)
    with torch.no_grad():  # momentum copies apart from the online model: ITM weights read them
        generator = torch.Generator().manual_seed(7)
        for _, momentum in reference.model_pairs:
            for p in momentum.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    reference.momentum = 1.0  # LAVIS updates its momentum model at the start of forward: keep it fixed
    tokenizer = bert_tokenizer()
    backbone = FusionBackbone(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(width=32, depth=2, heads=2, max_len=40, token_types=False),
        fusion=FusionConfig(depth=2, heads=2, norm="post", layer_norm_eps=1e-12),
        embed_dim=16,
        tokenizer=tokenizer,
        temperature="clamped",
        momentum=MomentumConfig(0.995),
    )
    objectives = {
        "itm": partial(ITMObjective, negatives="albef"),
        "mlm": partial(MLMObjective, masking="albef", alpha=0.4),
    }
    module = MultiTaskModule(backbone, objectives, mode="joint")
    converted = convert_albef(reference.state_dict(), max_len=40, vocab_size=len(tokenizer))
    converted = {k: v for k, v in converted.items() if not k.startswith("objectives.itc.")}
    module.load_state_dict(converted, strict=False)
    return reference, module, tokenizer
