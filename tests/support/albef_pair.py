"""A LAVIS `AlbefPretrain` (small, random, momentum copies apart from the online model) and the vlp module
its converted weights load into, with ALBEF's ITM and MLM options on (and, with `itc=True`, ALBEF's ITC:
alpha 0.4, scored against the momentum embeddings, LAVIS's queue copied over): the pair the ALBEF objective
tests compare."""

from __future__ import annotations

from functools import partial

import torch
from lavis_reference import albef_pretrain, bert_tokenizer

from vlp.platform.model.backbone import FusionBackbone
from vlp.platform.model.convert_albef import convert_albef
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig
from vlp.platform.model.momentum import MomentumConfig
from vlp.tasks.itc import ITCObjective
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


QUEUE_SIZE = 20  # a multiple of the batch of 5 (LAVIS asserts it)


def albef_pair(itc: bool = False):
    """(LAVIS model, vlp `MultiTaskModule`, tokenizer). `itc`: add ALBEF's ITC objective and load LAVIS's
    queue into it; the queue's pointer starts mid-way (10) so that its wrap-around is compared too."""
    reference = albef_pretrain(queue_size=QUEUE_SIZE)
    with torch.no_grad():  # momentum copies apart from the online model: ITM weights read them
        generator = torch.Generator().manual_seed(7)
        for _, momentum in reference.model_pairs:
            for p in momentum.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        reference.queue_ptr.fill_(10)
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
        **(
            {"itc": partial(ITCObjective, alpha=0.4, queue_size=QUEUE_SIZE, score_against="momentum")}
            if itc
            else {}
        ),
        "itm": partial(ITMObjective, negatives="albef"),
        "mlm": partial(MLMObjective, masking="albef", alpha=0.4),
    }
    module = MultiTaskModule(backbone, objectives, mode="joint")
    converted = convert_albef(reference.state_dict(), max_len=40, vocab_size=len(tokenizer))
    if not itc:
        converted = {k: v for k, v in converted.items() if not k.startswith("objectives.itc.")}
    missing, unexpected = module.load_state_dict(converted, strict=False)
    assert not unexpected, unexpected
    return reference, module, tokenizer


def lavis_gradients(reference) -> dict[str, torch.Tensor]:
    """LAVIS's gradients under vlp's names: the converter applied to a state dict of gradients."""
    state = {}
    params = dict(reference.named_parameters())
    for key, value in reference.state_dict(keep_vars=True).items():
        if isinstance(value, torch.nn.Parameter):
            param = params.get(key, value)
            state[key] = param.grad if param.grad is not None else torch.zeros_like(param)
        else:
            state[key] = value
    return convert_albef(state, max_len=40, momentum=False)
