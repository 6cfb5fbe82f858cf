"""`make bench BENCH_ARGS=--smoke`, as the README shows it: every script in benchmarks/ runs its measurements at
the smallest sizes and writes nothing to benchmarks/results/.

The benchmarks import vlp's internals, its configs and its reference models (LAVIS, open_clip, MiniLM), so a
moved function or a changed config breaks them without breaking anything else (`benchmarks/step.py` did, after
the layout moves); this test is where that shows. The numbers of a smoke run mean nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BENCHMARKS = ROOT / "benchmarks"
NOT_SCRIPTS = {"harness.py", "record_run.py"}  # helpers, which the Makefile's loop leaves out too

pytestmark = pytest.mark.slow  # minutes of training or many processes: `make test-fast` skips it


def files_under(folder: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime in ns) of every file under `folder`, caches left out."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_every_benchmark_script_runs_its_smoke_form():
    scripts = sorted(path.name for path in BENCHMARKS.glob("*.py") if path.name not in NOT_SCRIPTS)
    for name in scripts:
        assert "add_smoke_flag(" in (BENCHMARKS / name).read_text(), f"benchmarks/{name} takes no --smoke"
    before = files_under(BENCHMARKS)
    venv = Path(sys.executable).parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # -o: the checkout's environment counts as installed (never reinstalled from a test)
    command = ["make", "-o", f"{venv}/.installed", "bench", "BENCH_ARGS=--smoke", f"VENV={venv}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    ran = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("== benchmarks/")]
    assert ran == [f"benchmarks/{name}" for name in scripts], ran
    # each script's output: from its header to the next; each printed a smoke table and wrote no results file
    sections = result.stdout.split("== benchmarks/")[1:]
    for section in sections:
        assert "smoke run" in section, f"no smoke table in:\n{section[-3000:]}"
    assert files_under(BENCHMARKS) == before, "a smoke run wrote under benchmarks/"
