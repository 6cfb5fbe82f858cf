"""Shared benchmark helpers: isolated peak-memory runs, median timing, a printed table and a JSON file.

Memory is the growth of the process's peak resident set (ru_maxrss) around one call, so each measurement
runs in a fresh interpreter (`run_isolated`) where earlier work cannot have raised the peak already.
Imported by the other benchmark scripts; running this file does nothing.
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def revision_tree(revision: str, folder: Path) -> Path:
    """The `vlp` package of git `revision`, unpacked under `folder` (for `run_isolated(vlp_root=folder)`)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "vlp"], capture_output=True)
    if archive.returncode != 0:
        raise RuntimeError(
            f"git archive {revision} failed (a shallow clone lacks older revisions: `git fetch --unshallow`, "
            f"or name another --baseline): {archive.stderr.decode().strip()}"
        )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def peak_rss_growth_mib(fn: Callable[[], object]) -> float:
    """MiB by which `fn()` raises this process's peak RSS; only meaningful in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # Linux reports KiB


def median_seconds(fn: Callable[[], object], repeat: int = 3) -> float:
    """Median wall time of `repeat` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_isolated(
    script: str | Path, function: str, timeout: float = 600, vlp_root: str | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Call `function(**kwargs)` from `script` in a fresh Python process and return its dict result.

    The script is loaded with `runpy` (its `__main__` block does not run); kwargs and result go as JSON.
    `vlp_root`: a folder holding another tree's `vlp` package (`git archive` of a revision), imported
    in place of this one's, script included (to time the same measurement over old and new code); the call
    fails if the `vlp` it used came from elsewhere.
    """
    script = Path(script).resolve()
    first = last = ""
    if vlp_root is not None:
        root = str(Path(vlp_root).resolve())
        first = f"sys.path.insert(0, {root!r})\n"
        last = (
            "used = sys.modules['vlp'].__file__\n"
            f"assert used.startswith({root!r}), f'measured the vlp of {{used}}, not {root}'\n"
        )
    code = (
        "import json, runpy, sys\n"
        f"sys.path.insert(0, {str(script.parent)!r})\n"
        + first
        + f"fn = runpy.run_path({str(script)!r})[{function!r}]\n"
        "result = fn(**json.loads(sys.argv[1]))\n" + last + "print(json.dumps(result))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{function}({kwargs}) failed in its subprocess:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_from_config(config: str | Path, overrides: list[str], threads: int | None = 1) -> tuple[Any, Any]:
    """The LightningModule and data module that `vlp fit --config CONFIG [overrides]` builds, without a
    trainer run; the module's logging muted. vlp is imported here, on use, so a caller can first put
    another tree on sys.path (`run_isolated(vlp_root=...)`: the benchmarks measure an older revision that way)."""
    from vlp.cli import VLPCLI
    from vlp.datamodules.multitask import MultiTaskDataModule
    from vlp.tasks.base import TrainableModule

    if threads is not None:
        torch.set_num_threads(threads)
    sys.argv = sys.argv[:1]  # LightningCLI reads them too; the arguments are all here
    cli = VLPCLI(
        TrainableModule,
        MultiTaskDataModule,
        subclass_mode_model=True,
        auto_configure_optimizers=False,
        run=False,
        args=[f"--config={config}", *overrides, "--trainer.logger=false"],  # last: overlays may name a logger
    )
    cli.model.log = lambda *args, **kwargs: None
    return cli.model, cli.datamodule


def add_smoke_flag(parser: argparse.ArgumentParser) -> None:
    """`--smoke`, which every benchmark script takes (`make bench BENCH_ARGS=--smoke`, run by the test suite):
    each measurement the script's default run makes, at the smallest sizes that reach its code, in seconds."""
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every measurement at the smallest sizes, in seconds: checks that the script runs "
        "(the numbers mean nothing, and nothing is written to benchmarks/results)",
    )


def report(
    name: str, rows: list[dict[str, Any]], summary: dict[str, Any] | None = None, smoke: bool = False
) -> Path | None:
    """Print `rows` as a table (plus `summary`) and write both to benchmarks/results/<name>.json (a smoke
    run only prints)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_format(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    print("  ".join(col.rjust(w) for col, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)))
    for key, value in (summary or {}).items():
        print(f"{key}: {_format(value)}")
    if smoke:
        print(f"smoke run: {name}.json not written")
        return None
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu": cpu_identity(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    path.write_text(
        json.dumps({"name": name, "machine": machine, "rows": rows, "summary": summary or {}}, indent=2)
    )
    print(f"wrote {path}")
    return path


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The CPU a result was measured on: its model name, family and model numbers (a name such as "AMD EPYC"
    covers several generations) and the instruction set torch's CPU kernels use (`AVX2`, `AVX512`; scores
    after the same steps can differ in the last digits between them). Empty fields where the system does
    not say."""
    try:
        first = cpuinfo.read_text().split("\n\n", 1)[0]  # the first processor's block
    except OSError:
        first = ""
    values = {
        key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())
    }
    fields = {"model name": "model_name", "cpu family": "family", "model": "model"}
    found = {name: values.get(key, "") for key, name in fields.items()}
    found["model_name"] = found["model_name"] or platform.processor()
    return {**found, "capability": torch.backends.cpu.get_cpu_capability()}


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
