"""Captions per second: vlp's BLIP captioner (cached decoder, its beam search) against LAVIS's
`BlipCaption.generate` (transformers' `generate` over LAVIS's decoder) on the same converted weights.

Both caption the same batches with BLIP's COCO settings that both implement: the prompt "a picture of ", beam
search with `--beams` beams, at most `--max-length` tokens counting [DEC] and the prompt (LAVIS's convention),
no minimum length, repetition penalty 1. Random weights (LAVIS's model with non-trivial norms and biases,
converted with `convert_blip`), one thread, the two runs interleaved batch by batch; each batch's captions are
compared too. `--size base`: ViT-B/16 + BERT-base at `--image-size` (384, COCO captioning); `--size tiny`: the
test size. `--sample`: nucleus sampling as BLIP's CapFilt captioner (and `vlp data bootstrap`) draws: top-p 0.9,
top-k 50, repetition penalty 1.1, at least 5 tokens (LAVIS's `generate(use_nucleus_sampling=True)` against
vlp's `nucleus_sampling` through the same cache); the draws differ, so captions are not compared.

    OMP_NUM_THREADS=1 python benchmarks/blip_generate_speed.py --size base --batch 8 --batches 3
    OMP_NUM_THREADS=1 python benchmarks/blip_generate_speed.py --size base --image-size 224 --sample
    OMP_NUM_THREADS=1 python benchmarks/blip_generate_speed.py --smoke  # every measurement at the smallest sizes, seconds: checks it runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from harness import add_smoke_flag

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))

PROMPT = "a picture of "
SIZES = {
    "tiny": dict(patch_size=8, vision_width=32, vision_depth=2, vision_heads=2, text_width=32, text_layers=3,
                 text_heads=2, max_position=40),
    "base": dict(patch_size=16, vision_width=768, vision_depth=12, vision_heads=12, text_width=768,
                 text_layers=12, text_heads=12, max_position=512),
}  # fmt: skip


def build(size: str, image_size: int, beams: int, max_length: int):
    """(LAVIS BlipCaption with `generate`, vlp CaptionObjective on the converted weights)."""
    from lavis_reference import bert_tokenizer, blip_caption, with_generate

    from vlp.platform.model.blip import BlipBackbone
    from vlp.platform.model.convert_blip import convert_blip
    from vlp.platform.model.encoders import TextConfig, VisionConfig
    from vlp.platform.model.fusion import FusionConfig
    from vlp.tasks.caption import CaptionObjective

    s = SIZES[size]
    reference = with_generate(blip_caption(prompt=PROMPT, image_size=image_size, **s))
    converted, _ = convert_blip(reference.state_dict(), embed_dim=16)
    backbone = BlipBackbone(
        vision=VisionConfig(image_size=image_size, patch_size=s["patch_size"], width=s["vision_width"],
                            depth=s["vision_depth"], heads=s["vision_heads"]),
        text=TextConfig(width=s["text_width"], depth=0, heads=s["text_heads"], max_len=s["max_position"],
                        token_types=False),
        fusion=FusionConfig(depth=s["text_layers"], heads=s["text_heads"], norm="post", layer_norm_eps=1e-12),
        embed_dim=16,
        tokenizer=bert_tokenizer(),
        caption_decoder=True,
        temperature="clamped",
    ).eval()  # fmt: skip
    backbone.load_state_dict({k[len("backbone.") :]: v for k, v in converted.items()})
    prompt_tokens = 1 + len(reference.tokenizer(PROMPT, add_special_tokens=False).input_ids)
    captioner = CaptionObjective(
        backbone, num_beams=beams, max_length=max_length - prompt_tokens, length_penalty=1.0, prompt=PROMPT
    ).eval()
    return reference, captioner


def as_lavis_decodes(captioner, ids: torch.Tensor) -> list[str]:
    """Generated ids [B, T] as LAVIS returns captions: prompt and caption decoded together, then the prompt's
    characters cut off (so a caption starting with a word piece reads differently than decoded alone)."""
    prompt = torch.tensor(captioner.prompt_ids).expand(len(ids), -1)
    texts = captioner.backbone.tokenizer.batch_decode(torch.cat([prompt, ids], 1), skip_special_tokens=True)
    return [text[len(PROMPT) :] for text in texts]


def vlp_sample(captioner, images: torch.Tensor, max_length: int, generator: torch.Generator) -> torch.Tensor:
    """vlp's nucleus sampling with the prompt, as `vlp data bootstrap` draws captions (CapFilt's settings)."""
    from vlp.platform.model.sampling import nucleus_sampling
    from vlp.tasks.caption_prompt import prompted

    backbone, tokenizer = captioner.backbone, captioner.backbone.tokenizer
    decode = prompted(backbone.start_decoding(backbone.encode_image(images)), captioner.prompt_ids)
    return nucleus_sampling(
        decode, len(images), tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
        max_length, generator=generator, top_p=0.9, top_k=50, repetition_penalty=1.1, min_length=2,
    )  # fmt: skip


def measure(reference, captioner, args: argparse.Namespace, sample: bool) -> dict:
    """Both captioners over the same `args.batches` batches, interleaved; beam search, or nucleus sampling
    when `sample`: the result row (captions/s of each, speedup, identical captions)."""
    seconds = {"lavis": 0.0, "vlp": 0.0}
    equal = 0
    with torch.no_grad():
        for i in range(args.batches):
            images = torch.randn(
                args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(i)
            )
            start = time.perf_counter()
            if sample:
                theirs = reference.generate({"image": images}, use_nucleus_sampling=True, top_p=0.9,
                                            max_length=args.max_length, min_length=5, repetition_penalty=1.1)  # fmt: skip
            else:
                theirs = reference.generate(
                    {"image": images}, num_beams=args.beams, max_length=args.max_length, min_length=0
                )
            seconds["lavis"] += time.perf_counter() - start
            start = time.perf_counter()
            if sample:
                prompt_tokens = 1 + len(captioner.prompt_ids)
                ours = vlp_sample(
                    captioner, images, args.max_length - prompt_tokens, torch.Generator().manual_seed(i)
                )
            else:
                ours = captioner.generate(captioner.backbone.encode_image(images))
            seconds["vlp"] += time.perf_counter() - start
            if not sample:
                equal += sum(a == b for a, b in zip(as_lavis_decodes(captioner, ours), theirs, strict=True))
            print(f"batch {i}: lavis {seconds['lavis']:.1f} s, vlp {seconds['vlp']:.1f} s (cumulative)")
    captions = args.batch * args.batches
    return {
        "size": args.size, "image_size": args.image_size, "batch": args.batch, "batches": args.batches,
        "method": "nucleus sampling" if sample else f"beam search ({args.beams})",
        "max_length": args.max_length, "threads": 1,
        "lavis_captions_per_s": captions / seconds["lavis"], "vlp_captions_per_s": captions / seconds["vlp"],
        "speedup": seconds["lavis"] / seconds["vlp"], "identical_captions": "not compared" if sample else f"{equal}/{captions}",
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--sample", action="store_true", help="nucleus sampling (CapFilt) instead of beams")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "blip_generate_speed.json"
    )
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:  # the test size, one batch of 2 at 32 px; beam search (captions compared) and sampling
        args.size, args.image_size, args.batch, args.batches = "tiny", 32, 2, 1
    torch.set_num_threads(1)
    start = time.perf_counter()
    reference, captioner = build(args.size, args.image_size, args.beams, args.max_length)
    print(f"built and converted in {time.perf_counter() - start:.1f} s")
    # a smoke run takes both methods through the models built once; a real run the one asked for
    results = [
        measure(reference, captioner, args, sample)
        for sample in ((False, True) if args.smoke else (args.sample,))
    ]
    print(
        "| size | image | batch x batches | method | LAVIS captions/s | vlp captions/s | vlp / LAVIS | same |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        print(f"| {args.size} | {args.image_size} | {args.batch} x {args.batches} | {result['method']} | "
              f"{result['lavis_captions_per_s']:.3f} | {result['vlp_captions_per_s']:.3f} | {result['speedup']:.2f}x | "
              f"{result['identical_captions']} |")  # fmt: skip
    if args.smoke:
        print(f"smoke run: {args.out} not written")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results[0], indent=2))


if __name__ == "__main__":
    main()
