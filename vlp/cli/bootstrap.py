"""`vlp data bootstrap`: BLIP's CapFilt as a command. A trained model captions every image of a data set
(nucleus sampling), its ITM head scores the original and each synthetic caption, and the pairs whose match
probability reaches the threshold make a new data set of litdata chunks, with a CSV of every decision.

The work is cut into shards of `--shard-size` consecutive input images, fixed by the input alone. Rank r of
W (`--devices W` processes here, or the RANK / WORLD_SIZE of torchrun, or SLURM_PROCID / SLURM_NTASKS under
srun, or an initialised process group) takes shards r, r + W, ...; data-loader workers decode the images.
A shard's captions are drawn from a generator seeded by (seed, shard), so they are the same whoever runs it
and however often. Each shard is written to a temporary folder and renamed when complete
(`<output>/shards/shard-NNNNN/`: its chunks, `decisions.csv`, `counts.json`); a rerun skips complete
shards, so a killed run resumes without redoing them. When every shard is there, rank 0 merges them into
`<output>` (chunks + `index.json`, readable by the streaming source and `vlp fit`), `decisions.csv` and
`counts.json`, saves the model's tokenizer in `<output>/tokenizer` and prints the counts.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vlp.cli.capfilt_model import CapFiltModel, SamplingSettings, load_tokenizer_from, tokenizer_source
from vlp.datamodules.images import MAX_IMAGE_PIXELS, ImageTransform, SkipSample, decode_image
from vlp.datamodules.refcoco import GroundingRecord
from vlp.datamodules.streaming import TOKENIZER_FOLDER, record_image_bytes
from vlp.datamodules.webdataset import ShardRecord

DECISION_FIELDS = ("image_id", "image", "caption", "source", "itm_score", "kept", "reason")
SHARDS = "shards"
WAIT_SECONDS = 1.0


def image_name(record: Any) -> str:
    """The image key a decision names: the annotation's path, a shard member's key, else the image id."""
    if isinstance(record, ShardRecord):
        return record.key
    return str(record.image_id) if isinstance(record.path, bytes) else str(record.path)


class ShardImages(Dataset):
    """A shard's records -> (position, image [3, S, S], encoded bytes) or (position, skip reason)."""

    def __init__(self, records: list, transform: ImageTransform) -> None:
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        try:
            data = record.path if isinstance(record.path, bytes) else record_image_bytes(record)
            image = decode_image(data, MAX_IMAGE_PIXELS)
        except SkipSample as skip:
            return {"index": index, "skip": skip.reason}
        return {"index": index, "image": self.transform(image)[0], "bytes": data}


def keep_items(items: list[dict]) -> list[dict]:
    return items  # a batch stays a list: usable and skipped images are told apart by the caller


@dataclass
class ShardResult:
    samples: list[dict]  # chunk samples: {"image": bytes, "meta": JSON}
    decisions: list[dict]
    counts: Counter


def bootstrap_shard(
    model: CapFiltModel, records: list, shard: int, args: argparse.Namespace, device: torch.device
) -> ShardResult:
    """Caption, score and filter one shard's images."""
    transform = ImageTransform(args.image_size, tuple(args.mean), tuple(args.std))
    loader = DataLoader(
        ShardImages(records, transform),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=keep_items,
    )
    generator = torch.Generator(device).manual_seed(args.seed * 1_000_003 + shard)
    settings = SamplingSettings(
        args.top_p, args.top_k, args.temperature, args.repetition_penalty, args.min_length, args.max_length
    )
    samples, decisions, counts = [], [], Counter()
    for items in loader:
        usable = [item for item in items if "skip" not in item]
        for item in items:
            if "skip" in item:
                record = records[item["index"]]
                counts["images"] += 1
                counts[f"images_skipped/{item['skip']}"] += 1
                decisions.append(decision(record, "", "image", None, False, item["skip"]))
        if not usable:
            continue
        image = model.encode_images(torch.stack([item["image"] for item in usable]).to(device))
        synthetic = []  # --captions-per-image 0: the filter alone, on the original captions
        if args.captions_per_image:
            synthetic = model.sample_captions(image, args.captions_per_image, settings, generator)
        pairs: list[tuple[int, str, str]] = []  # (row, caption, source)
        for row, item in enumerate(usable):
            record = records[item["index"]]
            pairs += [(row, caption, "original") for caption in record.captions]
            k = args.captions_per_image
            pairs += [(row, caption, "synthetic") for caption in synthetic[row * k : (row + 1) * k]]
        scored = [i for i, (_, caption, _) in enumerate(pairs) if caption]
        scores = [None] * len(pairs)
        if scored:
            rows = torch.tensor([pairs[i][0] for i in scored])
            probability = model.match_probability(image, rows, [pairs[i][1] for i in scored]).tolist()
            for i, p in zip(scored, probability, strict=True):
                scores[i] = p
        for row, item in enumerate(usable):
            record = records[item["index"]]
            counts["images"] += 1
            mine = [i for i, pair in enumerate(pairs) if pair[0] == row]
            passed = {i for i in mine if scores[i] is not None and scores[i] >= args.threshold}
            original_kept = any(pairs[i][2] == "original" for i in passed)
            kept = []
            for i in mine:
                _, caption, source = pairs[i]
                counts[f"{source}/total"] += 1
                if scores[i] is None:
                    reason = "empty_caption"
                elif i not in passed:
                    reason = "below_threshold"
                elif source == "synthetic" and original_kept and args.keep_original_if_matching:
                    reason = "original_kept"
                else:
                    reason = "kept"
                counts[f"{source}/{reason}"] += 1
                decisions.append(decision(record, caption, source, scores[i], reason == "kept", reason))
                if reason == "kept":
                    kept.append(caption)
            if kept:
                counts["images_written"] += 1
                meta = {"image_id": record.image_id, "captions": kept}
                samples.append({"image": item["bytes"], "meta": json.dumps(meta)})
            else:
                counts["images_without_kept_caption"] += 1
    return ShardResult(samples, decisions, counts)


def decision(record: Any, caption: str, source: str, score: float | None, kept: bool, reason: str) -> dict:
    return {
        "image_id": record.image_id,
        "image": image_name(record),
        "caption": caption,
        "source": source,
        "itm_score": "" if score is None else f"{score:.6f}",
        "kept": int(kept),
        "reason": reason,
    }


def write_decisions(path: Path, rows: list[dict], header: bool = True) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, DECISION_FIELDS)
        if header:
            writer.writeheader()
        writer.writerows(rows)


def shard_folder(output: Path, shard: int) -> Path:
    return output / SHARDS / f"shard-{shard:05d}"


def write_shard(
    output: Path, shard: int, result: ShardResult, chunk_bytes: str, rank: int = 0, world: int = 1
) -> None:
    """Write the shard into a temporary folder, then rename it into place: a shard folder is complete.
    `written_by.json` records the rank that wrote it."""
    from litdata.streaming.writer import BinaryWriter

    final = shard_folder(output, shard)
    temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    if result.samples:
        writer = BinaryWriter(str(temporary), chunk_bytes=chunk_bytes)
        for index, sample in enumerate(result.samples):
            writer.add_item(index, sample)
        writer.done()
        # the writer's own index (litdata's merge would wait for the other ranks of a process group)
        (own,) = temporary.glob("*.index.json")
        own.rename(temporary / "index.json")
    write_decisions(temporary / "decisions.csv", result.decisions)
    (temporary / "counts.json").write_text(json.dumps(dict(sorted(result.counts.items())), indent=1))
    (temporary / "written_by.json").write_text(json.dumps({"rank": rank, "world": world}))
    os.replace(temporary, final)


def stale_temporaries(output: Path) -> None:
    """Remove temporary shard folders whose writer is gone (a killed run's)."""
    for folder in (output / SHARDS).glob(".shard-*.tmp-*"):
        pid = int(folder.name.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(folder, ignore_errors=True)


def merge_shards(output: Path, shards: int) -> Counter:
    """Every shard's chunks under one `index.json` in `output`, their decisions in one CSV, summed counts."""
    for old in output.glob("chunk-*.bin"):
        old.unlink()
    (output / "index.json").unlink(missing_ok=True)
    chunks, config, counts, number = [], None, Counter(), 0
    with open(output / "decisions.csv.tmp", "w", newline="", encoding="utf-8") as merged:
        writer = csv.DictWriter(merged, DECISION_FIELDS)
        writer.writeheader()
        for shard in range(shards):
            folder = shard_folder(output, shard)
            counts.update(json.loads((folder / "counts.json").read_text()))
            with open(folder / "decisions.csv", newline="", encoding="utf-8") as part:
                writer.writerows(csv.DictReader(part))
            if not (folder / "index.json").is_file():
                continue
            index = json.loads((folder / "index.json").read_text())
            config = config or index["config"]
            for chunk in index["chunks"]:
                name = f"chunk-0-{number}.bin"
                os.link(folder / chunk["filename"], output / name)
                chunks.append({**chunk, "filename": name})
                number += 1
    os.replace(output / "decisions.csv.tmp", output / "decisions.csv")
    (output / "counts.json").write_text(json.dumps(dict(sorted(counts.items())), indent=1))
    if chunks:
        (output / "index.json.tmp").write_text(json.dumps({"config": config, "chunks": chunks}))
        os.replace(output / "index.json.tmp", output / "index.json")
    return counts


def summary(counts: Counter, output: Path) -> str:
    lines = [f"images: {counts['images']} read, {counts['images_written']} written to {output}"]
    for source in ("original", "synthetic"):
        total = counts[f"{source}/total"]
        lines.append(f"{source} captions: {counts[f'{source}/kept']} kept of {total}")
        for key in sorted(counts):
            if key.startswith(f"{source}/") and key.split("/")[1] not in ("total", "kept"):
                lines.append(f"  {key.split('/')[1]}: {counts[key]}")
    skipped = {key.split("/")[1]: n for key, n in counts.items() if key.startswith("images_skipped/")}
    lines.append(
        f"images skipped: {sum(skipped.values())}"
        + "".join(f"\n  {r}: {n}" for r, n in sorted(skipped.items()))
    )
    lines.append(f"images without a kept caption: {counts['images_without_kept_caption']}")
    return "\n".join(lines)


# what a shard's content depends on; a rerun into the same output must agree on them to reuse its shards
SHARD_SETTINGS = (
    "model", "input", "format", "image_root", "split", "image_key", "caption_key", "captions_per_image",
    "threshold", "keep_original_if_matching", "tokenizer", "image_size", "mean", "std", "batch_size",
    "shard_size", "seed", "top_p", "top_k", "temperature", "repetition_penalty", "min_length", "max_length",
)  # fmt: skip


def check_settings(output: Path, args: argparse.Namespace) -> None:
    """Record the settings the shards are made with; a rerun with other settings is an error (its complete
    shards would otherwise be mixed with new ones)."""
    settings = {key: getattr(args, key, None) for key in SHARD_SETTINGS}
    settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
    path = output / SHARDS / "settings.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        differ = [f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in settings.items() if stored.get(k) != v]
        if differ:
            raise ValueError(
                f"{output} holds shards made with other settings ({'; '.join(differ)}): rerun with the same "
                "settings to resume, or choose another --output"
            )
        return
    temporary = path.with_name(f"settings.json.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(settings, indent=1))
    os.replace(temporary, path)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks: a process group, torchrun's or Slurm's variables."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world])
    return 0, 1


def pick_device(accelerator: str) -> torch.device:
    if accelerator == "cpu" or accelerator == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", os.environ.get("RANK", "0"))))
    return torch.device("cuda", local % max(1, torch.cuda.device_count()))


def launch_local_ranks(argv: list[str], devices: int) -> list[subprocess.Popen]:
    """Ranks 1 .. devices - 1 as child processes running the same command (this process is rank 0)."""
    children = []
    for rank in range(1, devices):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(devices)}
        children.append(
            subprocess.Popen([sys.executable, "-m", "vlp.cli", "data", "bootstrap", *argv], env=env)
        )
    return children


def wait_for_shards(output: Path, shards: int, children: list[subprocess.Popen]) -> None:
    """Rank 0 waits until every shard is complete; a local rank that failed is an error."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    while True:
        missing = [s for s in range(shards) if not shard_folder(output, s).is_dir()]
        failed = [c for c in children if c.poll() not in (None, 0)]
        if failed:
            raise RuntimeError(f"rank process {failed[0].args} failed with exit code {failed[0].returncode}")
        if not missing:
            return
        if all(c.poll() == 0 for c in children) and children:
            raise RuntimeError(f"every rank finished but shards {missing[:5]} are missing")
        time.sleep(WAIT_SECONDS)


def run_bootstrap(args: argparse.Namespace, records: list, skipped_input: Counter, argv: list[str]) -> int:
    """Run this rank's shards, and on rank 0 merge them and print the counts."""
    if records and isinstance(records[0], GroundingRecord):
        raise ValueError(
            "bootstrap captions images: the input holds grounding phrases (refcoco), not captions"
        )
    if not records:
        raise ValueError("nothing to bootstrap: no usable samples in the input")
    if not 0.0 <= args.threshold <= 1.0 or args.captions_per_image < 0 or args.shard_size < 1:
        raise ValueError("need 0 <= --threshold <= 1, --captions-per-image >= 0, --shard-size >= 1")
    rank, world = rank_and_world()
    children: list[subprocess.Popen] = []
    if world == 1 and args.devices > 1:
        children, world = launch_local_ranks(argv, args.devices), args.devices
    try:
        return run_rank(args, records, skipped_input, rank, world, children)
    finally:
        for child in children:  # a failed rank 0 leaves no rank behind
            if child.poll() is None:
                child.terminate()
                child.wait()


def run_rank(
    args: argparse.Namespace,
    records: list,
    skipped_input: Counter,
    rank: int,
    world: int,
    children: list[subprocess.Popen],
) -> int:
    """This rank's shards; rank 0 then waits for the others, merges and prints the counts."""
    output = Path(args.output)
    (output / SHARDS).mkdir(parents=True, exist_ok=True)
    check_settings(output, args)
    if rank == 0:
        stale_temporaries(output)
    checkpoint = Path(args.model)
    tokenizer = load_tokenizer_from(tokenizer_source(checkpoint, args.tokenizer))
    device = pick_device(args.accelerator)
    model = CapFiltModel.from_checkpoint(checkpoint, tokenizer, device)
    if args.image_size is None:
        args.image_size = model.backbone.vision.config.image_size
    shards = (len(records) + args.shard_size - 1) // args.shard_size
    mine = [s for s in range(rank, shards, world) if not shard_folder(output, s).is_dir()]
    done_before = sum(1 for s in range(rank, shards, world)) - len(mine)
    print(f"[rank {rank}/{world}] {shards} shards of {args.shard_size} images, {len(mine)} to do here"
          + (f" ({done_before} complete from an earlier run)" if done_before else ""), flush=True)  # fmt: skip
    start, images_done = time.monotonic(), 0
    to_do = sum(len(records[s * args.shard_size : (s + 1) * args.shard_size]) for s in mine)
    for number, shard in enumerate(mine, 1):
        part = records[shard * args.shard_size : (shard + 1) * args.shard_size]
        result = bootstrap_shard(model, part, shard, args, device)
        write_shard(output, shard, result, args.chunk_bytes, rank, world)
        images_done += len(part)
        elapsed = time.monotonic() - start
        rate = images_done / max(elapsed, 1e-9)
        eta = (to_do - images_done) / rate if rate > 0 else 0.0
        print(f"[rank {rank}] shard {shard} done ({number}/{len(mine)}): {images_done}/{to_do} images, "
              f"{rate:.2f} images/s, {rate * args.captions_per_image:.2f} captions/s, ETA {eta:.0f} s",
              flush=True)  # fmt: skip
    if rank != 0:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return 0
    wait_for_shards(output, shards, children)
    for child in children:
        child.wait()
    counts = merge_shards(output, shards)
    for reason, n in skipped_input.items():
        counts["images"] += n
        counts[f"images_skipped/{reason}"] += n
    (output / "counts.json").write_text(json.dumps(dict(sorted(counts.items())), indent=1))
    tokenizer.save_pretrained(str(output / TOKENIZER_FOLDER))
    print(summary(counts, output))
    print(f"decisions: {output / 'decisions.csv'}")
    bad = sum(n for key, n in counts.items() if key.startswith("images_skipped/"))
    if counts["images"] and bad > args.max_bad_fraction * counts["images"]:
        print(f"more than --max-bad-fraction={args.max_bad_fraction:g} of the images are unusable "
              f"({bad} of {counts['images']}); check the data with vlp data inspect", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def add_arguments(command: argparse.ArgumentParser) -> None:
    """`vlp data bootstrap`'s own options (the input options are `vlp data optimize`'s)."""
    command.add_argument("--model", required=True, help="vlp checkpoint with a caption decoder and ITM head")
    command.add_argument("--output", required=True, help="folder of the new data set (resumed if present)")
    command.add_argument("--captions-per-image", type=int, default=1, help="synthetic captions per image")
    command.add_argument("--threshold", type=float, default=0.5, help="keep pairs with P(match) >= this")
    command.add_argument(
        "--keep-original-if-matching",
        action="store_true",
        help="an image whose original caption passes keeps its originals only (synthetic ones not added)",
    )
    command.add_argument(
        "--tokenizer", help="tokenizer folder or training config (default: the run's config.yaml)"
    )
    command.add_argument("--image-size", type=int, help="default: the checkpoint's vision.image_size")
    command.add_argument("--mean", type=float, nargs=3, default=(0.5, 0.5, 0.5), help="as in training")
    command.add_argument("--std", type=float, nargs=3, default=(0.5, 0.5, 0.5), help="as in training")
    command.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    command.add_argument("--num-workers", type=int, default=0, help="data-loader workers decoding images")
    command.add_argument("--shard-size", type=int, default=1000, help="images per shard (the resume unit)")
    command.add_argument("--devices", type=int, default=1, help="local processes (ranks) to run")
    command.add_argument("--accelerator", choices=("auto", "cpu", "cuda"), default="auto")
    command.add_argument("--seed", type=int, default=0, help="seeds each shard's caption sampling")
    command.add_argument("--top-p", type=float, default=0.9)
    command.add_argument("--top-k", type=int, default=50, help="0: off")
    command.add_argument("--temperature", type=float, default=1.0)
    command.add_argument("--repetition-penalty", type=float, default=1.1)
    command.add_argument("--min-length", type=int, default=5, help="generated tokens, [SEP] counted")
    command.add_argument("--max-length", type=int, default=20, help="generated tokens, [SEP] counted")
    command.add_argument("--chunk-bytes", default="64MB")
    command.add_argument("--max-bad-fraction", type=float, default=0.01, help="unusable images allowed")
