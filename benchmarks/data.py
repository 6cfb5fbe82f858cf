"""Data loading: samples/s through decode + transform + collate at 224 px, and the data-wait share of a
`vlp fit` step on real-format images.

Input: a COCO-style folder of 640x480 JPEGs made from scikit-image's photographs (random crops, so every
file differs) with two captions each, and the same set as litdata chunks (`vlp data optimize`).
- Loader rows: one pass over the training split (random resized crop + flip at 224 px, batch 32), raw JPEG
  files vs chunks, with 0, 1 and 2 workers; samples/s after the first batch (worker start-up excluded).
- Fit row: `vlp fit --config configs/pretrain/captions.yaml` at 224 px (patch 32, the config's small
  towers), Lightning's SimpleProfiler: time waiting for the next batch over the whole step time, overall
  and without the first step of each pass over the (small) data (where, before the data module kept one
  loader for every pass, fresh workers started). Goal: under 5 %.

    python benchmarks/data.py            # ~1-2 min on 2 CPU cores
    python benchmarks/data.py --quick    # ~1 min smoke version
    python benchmarks/data.py --smoke    # every measurement at the smallest sizes, seconds: checks it runs
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import add_smoke_flag, report
from PIL import Image
from torch.utils.data import DataLoader

from vlp.cli import run as vlp_run
from vlp.datamodules.captions import CocoCaptionsSource
from vlp.datamodules.streaming import StreamingSource

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "captions.yaml"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg")


def make_folder(root: Path, count: int) -> None:
    """`count` 640x480 JPEG crops of the bundled photographs + a COCO captions file."""
    import skimage.data

    shipped = Path(skimage.data.__file__).parent
    photos = [Image.open(shipped / name).convert("RGB").resize((960, 720)) for name in PHOTOS]
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        left, top = int(rng.integers(0, 320)), int(rng.integers(0, 240))
        photos[index % len(photos)].crop((left, top, left + 640, top + 480)).save(
            root / "images" / f"{index}.jpg", quality=90
        )
        images.append({"id": index, "file_name": f"{index}.jpg"})
        annotations += [{"image_id": index, "caption": f"photo {index} of a {PHOTOS[index % 6][:-4]}"}] * 2
    (root / "train.json").write_text(json.dumps({"images": images, "annotations": annotations}))


def loader_rate(source, workers: int, batch_size: int = 32) -> float:
    """Samples/s of one pass over the train split, timed from the first batch on."""
    loader = DataLoader(
        source.dataset("train"),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=source.collate,
    )
    iterator = iter(loader)
    next(iterator)
    start, samples = time.perf_counter(), 0
    for batch in iterator:
        samples += batch["image"].shape[0]
    return samples / (time.perf_counter() - start)


def fit_data_share(
    root: Path, steps: int, workers: int, image_size: int = 224, batch_size: int | None = None
) -> dict:
    """`vlp fit` on the folder: its data-wait share. `batch_size`: the config's unless given."""
    backbone = "--model.init_args.backbone.init_args"
    batch = [] if batch_size is None else [f"--data.sources.captions.init_args.batch_size={batch_size}"]
    cli = vlp_run(
        ["fit", "--config", str(CONFIG), f"--data.train_annotations={root / 'train.json'}"]
        + [f"--data.val_annotations={root / 'train.json'}", f"--data.image_root={root / 'images'}"]
        + [
            f"--data.sources.captions.init_args.image_size={image_size}",
            f"--data.sources.captions.init_args.num_workers={workers}",
        ]
        + batch
        + [f"{backbone}.vision.image_size={image_size}", f"{backbone}.vision.patch_size=32"]
        + [f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.profiler=simple"]
        + [
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}",
        ]
    )
    durations = cli.trainer.profiler.recorded_durations
    waits = durations["[_TrainingEpochLoop].train_dataloader_next"]
    steps_time = durations["run_training_batch"]
    # the first step of each pass is where a per-pass loader would start fresh workers
    per_pass = cli.datamodule.train_loader.steps_per_epoch
    inside = [i for i in range(1, len(waits)) if i % per_pass]
    wait, step = sum(waits[1:]), sum(steps_time[1:])
    wait_inside, step_inside = sum(waits[i] for i in inside), sum(steps_time[i] for i in inside)
    return {
        "steps": steps,
        "workers": workers,
        "steps_per_pass": per_pass,
        "data_wait_s": wait,
        "step_s": step,
        "data_share": wait / (wait + step),
        # None where every measured step starts a pass (one step a pass): there is no inside to measure
        "data_share_within_pass": wait_inside / (wait_inside + step_inside) if inside else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer images and steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    add_smoke_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    count, steps = (96, 10) if args.quick else (320, 40)
    worker_counts, size, batch = (0, 1, 2), 224, 32
    if args.smoke:
        # batch 4 over 8 images: 2 loader batches a pass (one timed) and 2 fit steps a pass (one of them inside
        # a pass, which the within-pass share needs); 1 worker keeps the worker path
        count, steps, worker_counts, size, batch = 8, 2, (0, 1), 64, 4
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_folder(root, count)
        command = [
            sys.executable,
            "-c",
            "import sys; from vlp.cli import main; main(sys.argv[1:])",
            "data",
            "optimize",
        ]
        command += [
            "--input",
            str(root / "train.json"),
            "--image-root",
            str(root / "images"),
            "--output",
            str(root / "chunks"),
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=600)
        files = CocoCaptionsSource(str(root / "train.json"), str(root / "images"), image_size=size)
        chunks = StreamingSource(str(root / "chunks"), image_size=size)
        rows = []
        for name, source in (("jpeg files", files), ("litdata chunks", chunks)):
            for workers in worker_counts:
                rate = loader_rate(source, workers, batch)
                rows.append({"input": name, "workers": workers, "samples_per_s": rate})
        # the real run's fit takes the config's batch size, the smoke run's its 4
        fit = fit_data_share(
            root, steps, workers=worker_counts[-1], image_size=size, batch_size=batch if args.smoke else None
        )
    report(
        "data_quick" if args.quick else "data",  # a quick run keeps the full run's file
        rows,
        {f"fit_{key}": value for key, value in fit.items()} | {"images": count, "image_px": "640x480"},
        smoke=args.smoke,
    )


if __name__ == "__main__":
    main()
