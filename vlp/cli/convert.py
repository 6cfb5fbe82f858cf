"""`vlp convert albef|blip CKPT OUT`: a published ALBEF or BLIP checkpoint as a vlp weights file, for `init_from`.

BLIP: CKPT is an official BLIP release file (`model_base.pth`, `model_base_capfilt_large.pth`, the COCO
captioning and retrieval fine-tuned ones) or a LAVIS BLIP checkpoint, mapped by
`vlp.platform.model.convert_blip` onto `BlipBackbone` (architecture stored with `layout: blip`), the `itm`
head, and (unless `--no-momentum`) the momentum model and the `itc` queue; a captioning file's projections and
temperature start fresh and are listed.

CKPT is an official ALBEF release file (`ALBEF.pth`, `ALBEF_4M.pth`: {"model": state_dict}) or a LAVIS ALBEF
checkpoint (pre-trained or fine-tuned retrieval); OUT is written as `vlp export` writes (`.safetensors`, else
`torch.save` of a name -> tensor dict) under a `MultiTaskModule`'s names (`vlp.platform.model.convert_albef`):
the backbone, the `itm` and `mlm` heads, and (unless `--no-momentum`) the momentum model and the `itc` queue,
with the backbone's architecture (`albef_architecture`: in the safetensors metadata, else beside the weights
as `vlp export` stores it). A run starts from it with `model.init_args.init_from: OUT` and a config that
names only objectives and data (the backbone built from the stored architecture), or one whose backbone
agrees with it (`configs/finetune/albef-*.yaml`): `init_from` loads the backbone
strictly and the heads by name, and syncs the momentum model to the loaded weights as ALBEF's fine-tuning
does; the converted momentum copies and queue are there for code that continues pre-training from them
(`load_state_dict`). Runs on the CPU; the file is read with `weights_only`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vlp.platform.model.architecture import ARCHITECTURE_KEY
from vlp.platform.model.convert_albef import albef_architecture, convert_albef
from vlp.platform.model.convert_blip import blip_architecture, convert_blip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlp convert", description=__doc__.split("\n\n")[0])
    formats = parser.add_subparsers(dest="format", required=True)
    albef = formats.add_parser("albef", help="an ALBEF release or LAVIS ALBEF checkpoint")
    blip = formats.add_parser("blip", help="a BLIP release or LAVIS BLIP checkpoint")
    sources = (
        (albef, "ALBEF.pth, ALBEF_4M.pth, or a LAVIS ALBEF checkpoint", 30522),
        (blip, "model_base.pth, model_base_capfilt_large.pth, ..., or a LAVIS BLIP checkpoint", 30524),
    )
    for sub, name, vocab in sources:
        sub.add_argument("checkpoint", type=Path, help=name)
        sub.add_argument("out", type=Path, help="output file: .safetensors, else torch.save format")
        sub.add_argument("--image-size", type=int, default=None, help="resample positions to this size (384)")
        sub.add_argument("--max-len", type=int, default=None, help="text positions to keep (text.max_len)")
        sub.add_argument("--vocab-size", type=int, default=vocab, help="the tokenizer's length, checked")
        sub.add_argument("--temperature", choices=("clamped", "log_scale"), default="clamped")
        sub.add_argument("--vision-heads", type=int, default=None, help="ViT heads (default: width / 64)")
        sub.add_argument("--text-heads", type=int, default=None, help="BERT heads (default: width / 64)")
        sub.add_argument("--no-momentum", action="store_true", help="skip the momentum copies and queues")
    blip.add_argument(
        "--embed-dim", type=int, default=256, help="a captioning file's fresh projections' size"
    )
    blip.add_argument("--no-decoder", action="store_true", help="skip the caption decoder (retrieval)")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no such checkpoint: {args.checkpoint}")
    stored = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    options = dict(
        image_size=args.image_size,
        max_len=args.max_len,
        vocab_size=args.vocab_size,
        temperature=args.temperature,
        momentum=not args.no_momentum,
    )
    fresh: list[str] = []
    if args.format == "blip":
        state, fresh = convert_blip(stored, embed_dim=args.embed_dim, decoder=not args.no_decoder, **options)
        architecture = blip_architecture(state, args.vision_heads, args.text_heads, args.temperature)
    else:
        state = convert_albef(stored, **options)
        architecture = albef_architecture(state, args.vision_heads, args.text_heads, args.temperature)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"format": "pt", ARCHITECTURE_KEY: json.dumps(architecture)}
        save_file({k: v.contiguous() for k, v in state.items()}, str(args.out), metadata=metadata)
    else:
        torch.save({"state_dict": state, ARCHITECTURE_KEY: architecture}, args.out)
    numel = sum(t.numel() for t in state.values())
    if fresh:
        print(f"not in {args.checkpoint}, started fresh: {', '.join(fresh)}")
    print(f"{args.out}: {len(state)} tensors, {numel / 1e6:.2f} M values from {args.checkpoint}")
    return 0
