"""The `vlp` command: a light dispatcher, so `vlp --help` and `vlp slurm status` answer without loading the
training stack. `vlp fit | validate | test | predict` run LightningCLI (`vlp.cli.lightning_cli`), the other
subcommands are one module each (`vlp data ...`, `vlp slurm ...`, `vlp export`, `vlp tensorboard`).

The only package that knows platform, tasks and data modules together.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from typing import Any

LIGHTNING = {
    "fit": "train (and validate) a model from a YAML config: vlp fit --config configs/pretrain/shapes-tiny.yaml",
    "validate": "score a checkpoint on the validation split (--ckpt_path, or init_from for zero-shot)",
    "test": "score a checkpoint on the test split",
    "predict": "write a checkpoint's predictions (captions, boxes, answers, embeddings) to the run folder",
}
# subcommand -> (module of this package with `main(argv: list[str]) -> int | None`, one line); imported on use
GROUPS: dict[str, tuple[str, str]] = {
    "data": (
        "data",
        "convert data to streamed chunks (optimize), look at it (inspect), clean it (bootstrap)",
    ),
    "slurm": ("slurm", "submit, watch and cancel training (and bootstrap) jobs on a Slurm cluster"),
    "export": ("export", "one consolidated weights file (with its architecture) from any checkpoint"),
    "tensorboard": ("tensorboard", "serve the runs' TensorBoard logs on 127.0.0.1"),
    "convert": ("convert", "a published checkpoint (ALBEF) as a file init_from loads"),
}


def package_version() -> str:
    try:
        return version("vlp")
    except PackageNotFoundError:
        return "unknown (not installed)"


def overview() -> str:
    width = max(map(len, [*LIGHTNING, *GROUPS]))
    lines = ["usage: vlp <command> [options]    (vlp <command> --help: its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING.items()]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in GROUPS.items()]
    lines += ["", "  --version   print vlp's version", "  --help      this overview"]
    return "\n".join(lines)


def __getattr__(name: str) -> Any:
    """`vlp.cli.run` and `vlp.cli.VLPCLI` load the training stack when first used."""
    if name in ("run", "VLPCLI"):
        return getattr(importlib.import_module(f"{__name__}.lightning_cli"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def root_cause(error: BaseException) -> BaseException:
    """The first exception of a chain: jsonargparse wraps a class's own error ("Does not validate against any
    of the Union subtypes ...") and Lightning re-raises in its own words; the user needs the original."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None and id(
        error.__cause__ or error.__context__
    ) not in seen:
        error = error.__cause__ or error.__context__
        seen.add(id(error))
    return error


def main(argv: list[str] | None = None) -> None:
    """The `vlp` console script: an overview, a group's subcommand, else LightningCLI. Exits 0 on success;
    a failed run ends its output with one line that says why."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(overview())
        return
    if args[0] == "--version":
        print(f"vlp {package_version()}")
        return
    if args[0] in GROUPS:
        module = importlib.import_module(f"{__name__}.{GROUPS[args[0]][0]}")
        code = module.main(args[1:])
        if code:
            raise SystemExit(code)
        return
    from vlp.cli.lightning_cli import run
    from vlp.platform.distributed.collectives import destroy_process_group_at_exit, leave_gloo_run

    destroy_process_group_at_exit()  # a multi-rank run must not abort at exit (see both functions)
    try:
        run(argv)  # None: LightningCLI reads sys.argv itself (and does not warn about args given twice)
    except Exception as error:
        traceback.print_exc()
        rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_PROCID")
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        cause = root_cause(error)
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        print(f"\nvlp {args[0]} failed{where}: {type(cause).__name__}: {reason}", file=sys.stderr)
        raise SystemExit(1) from None
    leave_gloo_run()


if __name__ == "__main__":
    main()
