"""`benchmarks/record_run.py` appends a real run to the default's CSV with the numbers the run wrote."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmark_script import load_benchmark

ROOT = Path(__file__).parents[1]
CSV_PATH = ROOT / "benchmarks" / "results" / "make-train.csv"


def load_record_run():
    return load_benchmark("record_run")


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def test_committed_csv_has_the_fixed_columns_and_every_score_of_its_rows():
    record_run = load_record_run()
    columns, rows = read_rows(CSV_PATH)
    assert columns[: len(record_run.FIXED)] == record_run.FIXED
    scores = [column for column in columns if column.startswith("val/")]
    assert {"val/retrieval/t2i_r1", "val/itm/acc", "val/caption/cider", "val/grounding/acc50"} <= set(scores)
    assert rows
    for row in rows:
        assert row["steps"] and row["seed"] and row["commit"] and row["time_s"], row
        assert all(0 <= float(row[score]) for score in scores if row[score]), row


def test_a_two_step_fit_becomes_a_row_equal_to_its_metrics_json(tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    fit = [
        str(Path(sys.executable).parent / "vlp"), "fit", "--config", "configs/pretrain/shapes-tiny.yaml",
        "--seed_everything", "3", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    result = subprocess.run(fit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    run_dir = tmp_path / "runs" / "shapes-tiny" / "version_0"
    metrics = json.loads((run_dir / "metrics.json").read_text())

    csv_copy = tmp_path / "make-train.csv"
    shutil.copy(CSV_PATH, csv_copy)
    columns_before, rows_before = read_rows(csv_copy)
    assert load_record_run().main([str(run_dir), "--csv", str(csv_copy), "--note", "test"]) == 0

    columns, rows = read_rows(csv_copy)
    assert rows[:-1] == [
        {**row, **{c: "" for c in columns if c not in columns_before}} for row in rows_before
    ]
    row = rows[-1]
    assert (row["seed"], row["steps"], row["note"]) == ("3", "2", "test")
    assert float(row["time_s"]) >= 0 and row["date"].startswith("20")
    val = {key: value for key, value in metrics.items() if key.startswith("val/")}
    assert val and {key: float(row[key]) for key in val} == val
    assert not any(row[column] for column in columns if column.startswith("val/") and column not in val)
