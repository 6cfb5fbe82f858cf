"""`vlp data optimize | inspect | bootstrap`: convert any supported annotation format (or WebDataset shards) to
litdata chunks, look at a data set (counts, percentiles and a contact sheet) before training on it, and clean
it with a trained model (BLIP's CapFilt, `vlp.cli.bootstrap`)."""

from __future__ import annotations

import argparse
import io
import json
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlp.datamodules.annotations import read_json
from vlp.datamodules.captions import read_coco, read_karpathy
from vlp.datamodules.csv import read_table
from vlp.datamodules.images import SkipSample, decode_image
from vlp.datamodules.refcoco import GroundingRecord, read_grounding
from vlp.datamodules.streaming import (
    TOKENIZER_FOLDER,
    ChunkRecords,
    optimize,
    record_image_bytes,
)
from vlp.datamodules.tokenizer import build_corpus_tokenizer
from vlp.datamodules.webdataset import read_shards
from vlp.platform.run.fonts import text_font

FORMATS = ("coco", "karpathy", "csv", "refcoco", "webdataset", "chunks")


def detect_format(path: Path) -> str:
    """The format of `path` from its shape: chunk folder, tar shards, a table, or the JSON's keys."""
    if path.is_dir():
        return "chunks" if (path / "index.json").is_file() else "webdataset"
    suffix = path.suffix.lower()
    if suffix == ".tar":
        return "webdataset"
    if suffix in (".csv", ".tsv"):
        return "csv"
    data = read_json(path)
    if isinstance(data, list) or isinstance(data, dict) and "images" not in data:
        return "refcoco"
    images = data["images"] if isinstance(data, dict) else None
    first = images[0] if isinstance(images, list) and images else None
    return "karpathy" if isinstance(first, dict) and "sentences" in first else "coco"


def read_records(args: argparse.Namespace, skipped: Counter) -> list:
    """The input's usable records (bad entries counted in `skipped`), for any format."""
    path, fmt = Path(args.input), args.format or detect_format(Path(args.input))
    if fmt in ("coco", "karpathy", "csv", "refcoco"):
        if not path.is_file():
            raise FileNotFoundError(f"--input: no such file: {path}")
        if args.image_root is None or not Path(args.image_root).is_dir():
            raise FileNotFoundError(f"--image-root: not a directory: {args.image_root} (needed for {fmt})")
    root, absolute = Path(args.image_root or "."), args.allow_absolute_paths
    if fmt == "coco":
        return read_coco(path, root, skipped, absolute)
    if fmt == "karpathy":
        return read_karpathy(read_json(path), path, root, args.split, skipped, absolute)
    if fmt == "csv":
        separator = args.separator or ("\t" if path.suffix.lower() == ".tsv" else ",")
        return read_table(path, root, args.image_key, args.caption_key, separator, skipped, absolute)
    if fmt == "refcoco":
        return read_grounding(path, root, skipped, absolute)
    if fmt == "webdataset":
        return read_shards(path, skipped)
    records = ChunkRecords(str(path))
    return [records[i] for i in range(len(records))]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def run_optimize(args: argparse.Namespace) -> int:
    skipped: Counter = Counter()
    records = read_records(args, skipped)
    output = Path(args.output)
    skipped.update(optimize(records, str(output), args.num_workers, args.max_side, args.chunk_bytes))
    tokenizer = build_corpus_tokenizer(
        (c for r in records for c in r.captions), min_count=args.min_word_count
    )
    tokenizer.save_pretrained(str(output / TOKENIZER_FOLDER))
    written = len(ChunkRecords(str(output)))
    print(f"samples written: {written}")
    print(f"bytes: {folder_bytes(output)} in {output}")
    print(f"skipped: {sum(skipped.values())}" + "".join(f"\n  {r}: {n}" for r, n in sorted(skipped.items())))
    return 0


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    p = np.percentile(values, [0, 5, 50, 95, 100])
    return "  ".join(f"p{q}={v:.0f}" for q, v in zip((0, 5, 50, 95, 100), p, strict=True))


def image_of(record) -> Image.Image:
    return decode_image(record.path if isinstance(record.path, bytes) else record_image_bytes(record))


def contact_sheet(records: list, count: int, cell: int = 192, columns: int = 4) -> Image.Image:
    """A grid of `count` evenly spaced samples: image, its boxes (green) and first caption below it."""
    chosen = [
        records[i] for i in np.linspace(0, len(records) - 1, min(count, len(records))).round().astype(int)
    ]
    text_height = 48
    rows = (len(chosen) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_height)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = text_font(11)  # DejaVu Sans: accented captions draw their letters
    for n, record in enumerate(chosen):
        x0, y0 = (n % columns) * cell, (n // columns) * (cell + text_height)
        try:
            image = image_of(record)
        except SkipSample as skip:
            draw.text((x0 + 4, y0 + cell // 2), f"unusable: {skip.reason}", fill=(200, 0, 0), font=font)
            continue
        scale = (cell - 4) / max(image.size)
        thumb = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        sheet.paste(thumb, (x0 + 2, y0 + 2))
        if isinstance(record, GroundingRecord):
            x, y, w, h = (v * scale for v in record.box)
            draw.rectangle(
                (x0 + 2 + x, y0 + 2 + y, x0 + 2 + x + w, y0 + 2 + y + h), outline=(0, 220, 0), width=2
            )
        caption = textwrap.wrap(record.captions[0], width=cell // 6)[:3]
        draw.multiline_text((x0 + 4, y0 + cell), "\n".join(caption), fill=(0, 0, 0), spacing=2, font=font)
    return sheet


def header_size(record) -> tuple[int, int] | None:
    try:
        data = record.path if isinstance(record.path, bytes) else record_image_bytes(record)
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (SkipSample, OSError, Image.DecompressionBombError):
        return None


def run_inspect(args: argparse.Namespace) -> int:
    skipped: Counter = Counter()
    records = read_records(args, skipped)
    if not records:
        print(f"no usable samples; skipped: {dict(skipped)}")
        return 1
    captions = [c for r in records for c in r.captions]
    sample = [
        records[i] for i in np.linspace(0, len(records) - 1, min(args.max_images, len(records))).astype(int)
    ]
    sizes = [s for s in map(header_size, sample) if s is not None]
    summary = {
        "images": len(records),
        "captions": len(captions),
        "skipped": dict(skipped),
        "caption_words": percentiles([len(c.split()) for c in captions]),
        "image_width": percentiles([w for w, _ in sizes]),
        "image_height": percentiles([h for _, h in sizes]),
        "unreadable_in_size_sample": len(sample) - len(sizes),
    }
    for key, value in summary.items():
        print(f"{key}: {value}")
    sheet_path = Path(args.sheet or f"{Path(args.input).stem or 'data'}-sheet.png")
    contact_sheet(records, args.samples).save(sheet_path)
    print(f"contact sheet: {sheet_path}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="vlp data", description=__doc__)
    commands = main.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("optimize", "write litdata chunks of encoded images + captions"),
        ("inspect", "counts, percentiles and a contact sheet PNG"),
        ("bootstrap", "caption every image with a model, keep the pairs its ITM head matches (CapFilt)"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument(
            "input" if name == "inspect" else "--input", help="annotation file, shards or chunk folder"
        )
        command.add_argument("--format", choices=FORMATS, help="default: detected from the input")
        command.add_argument("--image-root", help="folder the annotation's image paths are relative to")
        command.add_argument(
            "--split", default="train", help="karpathy: which split (restval counts as train)"
        )
        command.add_argument("--image-key", default="filepath", help="csv: image path column")
        command.add_argument("--caption-key", default="title", help="csv: caption column")
        command.add_argument("--separator", help="csv: column separator (default: tab for .tsv, else comma)")
        command.add_argument(
            "--allow-absolute-paths",
            action="store_true",
            help="accept absolute image paths in the annotations (default: only paths under --image-root)",
        )
    optimize_command, inspect_command = commands.choices["optimize"], commands.choices["inspect"]
    from vlp.cli.bootstrap import add_arguments

    add_arguments(commands.choices["bootstrap"])
    next(a for a in commands.choices["bootstrap"]._actions if a.dest == "input").required = True
    optimize_command.add_argument("--output", required=True, help="chunk folder to write (replaced)")
    optimize_command.add_argument("--num-workers", type=int, default=1)
    optimize_command.add_argument("--max-side", type=int, help="shrink images whose longer side exceeds this")
    optimize_command.add_argument("--chunk-bytes", default="64MB")
    optimize_command.add_argument(
        "--min-word-count", type=int, default=1, help="saved vocabulary: rarer words are [UNK]"
    )
    inspect_command.add_argument("--sheet", help="contact sheet PNG path (default: <input>-sheet.png)")
    inspect_command.add_argument("--samples", type=int, default=16, help="images on the contact sheet")
    inspect_command.add_argument(
        "--max-images", type=int, default=1000, help="images read for size percentiles"
    )
    inspect_command.add_argument("--json", help="also write the summary as JSON here")
    return main


def main(argv: list[str]) -> int:
    """Run the subcommand; bad input (a missing file, malformed annotations) is one line on stderr, exit 2."""
    args = parser().parse_args(argv)
    try:
        if args.command == "bootstrap":
            from vlp.cli.bootstrap import run_bootstrap

            skipped: Counter = Counter()
            return run_bootstrap(args, read_records(args, skipped), skipped, argv[1:])
        return run_optimize(args) if args.command == "optimize" else run_inspect(args)
    except (OSError, ValueError) as error:
        print(f"vlp data {args.command}: error: {error}", file=sys.stderr)
        return 2
