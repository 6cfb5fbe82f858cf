"""Captions per second of `vlp data bootstrap` and `vlp predict`, one thread, at the shapes default's size and
at ViT-B/16 (224 px) + BERT-base (6 text + 6 fusion layers, 768 wide, 12 heads, BLIP's 30,524 tokens).

Random weights, so every caption is generated to full length: EOS is forbidden until `--length` tokens
(min_length = max_length), the same work for every method. Methods, interleaved round by round over
`--rounds` rounds of `--batches` batches of `--batch-size` images (median per round reported):
- `bootstrap`: what the command does per batch, without file input and output: encode the images, sample
  `--captions-per-image` captions each (nucleus, top-p 0.9, top-k 50, repetition penalty 1.1), score the
  original caption and every synthetic one with the ITM head. Captions/s counts the synthetic captions.
- `predict-greedy`, `predict-beam3`: `CaptionObjective.generate` as `vlp predict` runs it, greedy and BLIP's
  3-beam search (repetition penalty 1.0, as BLIP's beam captioning).
A reference implementation's `generate` (LAVIS's BLIP) can join as one more entry of the dict `methods` returns: a function
(size, batch of images) -> captions, measured in the same rounds.

    python benchmarks/caption_speed.py                 # both sizes
    python benchmarks/caption_speed.py --sizes shapes  # seconds
    python benchmarks/caption_speed.py --smoke         # every measurement at the smallest sizes, seconds: checks it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import add_smoke_flag, report  # noqa: E402


@dataclass
class Size:
    image_size: int
    backbone: dict  # FusionBackbone arguments (plain data)
    vocab: int | None  # None: the shapes grammar's tokenizer


def shapes_size() -> Size:
    settings = yaml.safe_load((ROOT / "configs" / "models" / "shapes-tiny.yaml").read_text())["init_args"]
    return Size(settings["vision"]["image_size"], settings, None)


SIZES: dict[str, Callable[[], Size]] = {
    "shapes": shapes_size,
    "vitb16-bertbase": lambda: Size(
        224,
        {
            "vision": {"model": "vit_base_patch16_224", "image_size": 224, "pool": "cls"},
            "text": {"width": 768, "depth": 6, "heads": 12, "max_len": 40},
            "fusion": {"depth": 6, "heads": 12},
            "embed_dim": 256,
            "caption_decoder": True,
        },
        30524,
    ),
}


def build(size: Size):
    """CapFiltModel and CaptionObjective on one random-weight backbone of `size`."""
    from vlp.cli.capfilt_model import CapFiltModel, backbone_settings
    from vlp.datamodules.shapes import GRAMMAR_WORDS
    from vlp.datamodules.tokenizer import SPECIAL_TOKENS, build_wordpiece_tokenizer
    from vlp.platform.model.backbone import FusionBackbone
    from vlp.tasks.caption import CaptionObjective

    words = (
        GRAMMAR_WORDS if size.vocab is None else [f"w{i}" for i in range(size.vocab - len(SPECIAL_TOKENS))]
    )
    tokenizer = build_wordpiece_tokenizer(words)
    torch.manual_seed(0)
    backbone = FusionBackbone(**backbone_settings(size.backbone), tokenizer=tokenizer).eval()
    capfilt = CapFiltModel(backbone, torch.nn.Linear(backbone.width, 2)).eval()
    return capfilt, CaptionObjective(backbone).eval()


def methods(capfilt, objective, length: int, per_image: int) -> dict[str, Callable[[torch.Tensor], int]]:
    """name -> function(images) -> captions made."""
    from vlp.cli.capfilt_model import SamplingSettings

    settings = SamplingSettings(min_length=length, max_length=length)
    generator = torch.Generator().manual_seed(0)
    words = " ".join(capfilt.tokenizer.convert_ids_to_tokens(list(range(5, 15))))

    def bootstrap(images: torch.Tensor) -> int:
        image = capfilt.encode_images(images)
        captions = capfilt.sample_captions(image, per_image, settings, generator)
        b = images.shape[0]
        rows = torch.arange(b).repeat_interleave(per_image + 1)
        texts = [t for i in range(b) for t in [words, *captions[i * per_image : (i + 1) * per_image]]]
        capfilt.match_probability(image, rows, texts)
        return len(captions)

    def predict(num_beams: int) -> Callable[[torch.Tensor], int]:
        def run(images: torch.Tensor) -> int:
            objective.num_beams, objective.max_length, objective.min_length = num_beams, length, length
            with torch.no_grad():
                return objective.generate(objective.backbone.encode_image(images)).shape[0]

        return run

    return {"bootstrap": bootstrap, "predict-greedy": predict(1), "predict-beam3": predict(3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--length", type=int, default=20, help="tokens per caption, [SEP] counted")
    parser.add_argument("--captions-per-image", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:  # every method and the warm-up, shapes size only: 1 round, 1 batch of 2, short captions
        args.sizes, args.batch_size, args.batches, args.rounds, args.length = ["shapes"], 2, 1, 1, 4
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.sizes:
        size = SIZES[name]()
        capfilt, objective = build(size)
        runs = methods(capfilt, objective, args.length, args.captions_per_image)
        images = torch.randn(args.batch_size, 3, size.image_size, size.image_size)
        for fn in runs.values():  # warm-up
            fn(images[:2])
        rates: dict[str, list[float]] = {method: [] for method in runs}
        for _ in range(args.rounds):
            for method, fn in runs.items():  # interleaved: every method once per round
                start, made = time.perf_counter(), 0
                for _ in range(args.batches):
                    made += fn(images)
                rates[method].append(made / (time.perf_counter() - start))
        for method, values in rates.items():
            rows.append({"size": name, "method": method, "captions_per_s": statistics.median(values),
                         "min": min(values), "max": max(values)})  # fmt: skip
    report(
        "caption_speed",
        rows,
        {"batch_size": args.batch_size, "length": args.length, "threads": args.threads},
        smoke=args.smoke,
    )


if __name__ == "__main__":
    main()
