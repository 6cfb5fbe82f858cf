"""Append one run of the default to `benchmarks/results/make-train.csv`, read from the run's own files.

    python benchmarks/record_run.py runs/shapes-tiny/version_0 [--csv FILE] [--machine TEXT] [--note TEXT]

Every number comes from the run folder, never typed by hand: the validation scores from `metrics.json`
(every `val/*` key), the seed from `config.yaml`, the date, the steps and the time from the TensorBoard event
files: from the event file's first event (written as the fit starts, after the imports and the model's
construction) to the last logged scalar (the final validation's scores). The commit is the checkout's
(`git rev-parse`, with `-dirty` when vlp/, configs/ or the Makefile differ from it); the machine is the CPU
model and core count unless `--machine` names it. A score the CSV has no column for yet adds one (earlier
rows leave it empty).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import yaml

CSV_PATH = Path(__file__).resolve().parent / "results" / "make-train.csv"
# the columns every row has, before the scores
FIXED = ["date", "machine", "commit", "seed", "steps", "time_s", "source", "note"]


def read_events(run_dir: Path) -> tuple[float, float, int]:
    """(start, end, steps) from the run's TensorBoard events: the wall time of the event file's first event
    (the logger opens it as the fit starts), of the last logged scalar (the final validation), and the
    optimizer steps (Lightning logs at a step's 0-based index: the last logged index + 1)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    scalars = [event for tag in events.Tags()["scalars"] for event in events.Scalars(tag)]
    if not scalars:
        raise SystemExit(f"{run_dir}: no TensorBoard scalars (is it a run folder of `vlp fit`?)")
    return events.FirstEventTimestamp(), max(e.wall_time for e in scalars), max(e.step for e in scalars) + 1


def read_seed(run_dir: Path) -> int | None:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return config.get("seed_everything")


def checkout_commit(repo: Path) -> str:
    """The short commit of `repo`, `-dirty` when the code or configs differ from it; `unknown` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "vlp", "configs", "Makefile"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if changed else "")


def this_machine() -> str:
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


def run_row(run_dir: Path, machine: str | None = None, note: str = "") -> dict[str, str]:
    """The CSV row of one run folder: the fixed columns, then every `val/*` score of its metrics.json."""
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        raise SystemExit(f"{run_dir}: no metrics.json (a fit writes it when it ends)")
    metrics = json.loads(metrics_path.read_text())
    first, last, step = read_events(run_dir)
    row = {
        "date": datetime.fromtimestamp(first, UTC).strftime("%Y-%m-%d"),
        "machine": machine or this_machine(),
        "commit": checkout_commit(Path(__file__).resolve().parents[1]),
        "seed": str(read_seed(run_dir)),
        "steps": str(step),
        "time_s": f"{last - first:.1f}",
        "source": f"record_run.py {run_dir}",
        "note": note,
    }
    row.update({key: repr(float(value)) for key, value in sorted(metrics.items()) if key.startswith("val/")})
    return row


def append_row(csv_path: Path, row: dict[str, str]) -> None:
    """Append `row`; a column the file lacks is added (the file is rewritten, earlier rows keep their values)."""
    rows, columns = [], list(FIXED)
    if csv_path.exists():
        with csv_path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or FIXED)
            rows = list(reader)
    columns += [key for key in row if key not in columns]
    rows.append(row)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder: runs/<experiment>/version_<n>")
    parser.add_argument("--csv", type=Path, default=CSV_PATH, help="the CSV to append to")
    parser.add_argument("--machine", default=None, help="the machine in words (default: CPU model, cores)")
    parser.add_argument("--note", default="", help="what else a reader needs (a variant, a busy machine)")
    args = parser.parse_args(argv)
    row = run_row(args.run_dir, args.machine, args.note)
    append_row(args.csv, row)
    print(f"{args.csv}: {', '.join(f'{k}={v}' for k, v in row.items() if k in FIXED[:6])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
