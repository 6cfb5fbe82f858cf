"""`vlp slurm submit | bootstrap | status | cancel | logs`: the same `vlp fit` config, on a Slurm cluster.

`submit` resolves the configs (a bad key fails here, not in the queue), saves the resolved config in
the run folder `<save_dir>/<name>/version_<n>/` (`job.yaml`: the job runs what was submitted even if the
files change) and pins that folder on the job's command line (logger version, `trainer.default_root_dir`),
so every requeue of the job logs to the same TensorBoard run and finds Lightning's `hpc_ckpt_<n>.ckpt`
there. The sbatch parameters are validated data rendered by one function,
`render_sbatch`, which shell-quotes every value; the job runs `srun <python> -m vlp.cli fit --config
job.yaml [extra args] [pins]`, one task per device, and asks Slurm for USR1 90 s before its time limit, which
Lightning's `SLURMEnvironment` turns into a checkpoint and a requeue (see `vlp.platform.run.requeue`).
`bootstrap` submits `vlp data bootstrap` the same way: its srun tasks are its ranks (SLURM_PROCID /
SLURM_NTASKS), its script and logs go beside the output folder (`<output>-slurm/`), and it asks for no requeue
signal: a job stopped by its time limit is submitted again and skips the shards it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

JOB_CONFIG = "job.yaml"
JOB_SCRIPT = "job.sbatch"
REQUEUE_SIGNAL = "USR1@90"  # reaches the srun tasks (not `B:`, which signals only the batch shell)
LOG_PATTERN = "slurm-%j.out"
ERR_PATTERN = "slurm-%j.err"

SLURM_NAME = re.compile(r"[A-Za-z0-9_.,+-]+")  # partitions, accounts, QOS names
SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}")  # MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
SLURM_MEM = re.compile(r"\d+[KMGT]?")
JOB_ID = re.compile(r"\d+(_\d+)?")


class SubmitError(ValueError):
    """A submission that cannot work, with what to change."""


@dataclasses.dataclass
class SbatchOptions:
    """What the job asks of Slurm. `tasks_per_node` is the trainer's devices per node."""

    job_name: str
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None

    def validate(self) -> None:
        check_text("job name", self.job_name)
        for field in ("nodes", "tasks_per_node", "cpus_per_task"):
            if getattr(self, field) < 1:
                raise SubmitError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.gpus_per_node < 0:
            raise SubmitError(f"gpus_per_node must be >= 0, got {self.gpus_per_node}")
        patterns = {"mem": SLURM_MEM, "time": SLURM_TIME, "partition": SLURM_NAME, "account": SLURM_NAME}
        for field, pattern in {**patterns, "qos": SLURM_NAME}.items():
            value = getattr(self, field)
            if value is not None and not pattern.fullmatch(value):
                raise SubmitError(f"{field} {value!r} is not a Slurm {field} (expected {pattern.pattern})")


def check_text(what: str, value: str) -> None:
    """Quoting makes any printable text safe in the shell and in `#SBATCH` lines, except a backslash
    (sbatch reads it as an escape even inside quotes) and control characters (a newline would start a
    new line of the script)."""
    if not value:
        raise SubmitError(f"{what} is empty")
    bad = [c for c in value if c == "\\" or not c.isprintable()]
    if bad:
        raise SubmitError(f"{what} {value!r} contains {bad[0]!r}; use printable characters without '\\'")


def slurm_filename(folder: Path, pattern: str) -> str:
    """`folder/pattern` for `--output` / `--error`, where Slurm expands `%x`, `%j`, ... : a `%` of the
    folder (an experiment named `50%` or `run-%j`) is written `%%`, so only `pattern`'s are expanded."""
    return f"{str(folder).replace('%', '%%')}/{pattern}"


def render_sbatch(
    options: SbatchOptions,
    run_dir: Path,
    workdir: Path,
    command: list[str],
    setup: list[str],
    requeue: bool = True,
) -> str:
    """The whole batch script. Every value is validated or shell-quoted (sbatch parses `#SBATCH` lines
    with the same quoting rules); `setup` lines come from the user's profile and are written as they are.
    `requeue`: ask for the signal Lightning turns into a checkpoint and a requeue (a `vlp fit` job)."""
    options.validate()
    for value in (str(run_dir), str(workdir), *command):
        check_text("value", value)
    directives = {
        "job-name": options.job_name,
        "nodes": options.nodes,
        "ntasks-per-node": options.tasks_per_node,
        "cpus-per-task": options.cpus_per_task,
        "gpus-per-node": options.gpus_per_node or None,
        "mem": options.mem,
        "time": options.time,
        "partition": options.partition,
        "account": options.account,
        "qos": options.qos,
        "signal": REQUEUE_SIGNAL if requeue else None,
        "requeue": True if requeue else None,
        "open-mode": "append",
        "chdir": str(workdir),
        "output": slurm_filename(run_dir, LOG_PATTERN),
        "error": slurm_filename(run_dir, ERR_PATTERN),
    }
    lines = ["#!/bin/bash", f"# vlp slurm: run folder {shlex.quote(str(run_dir))}"]
    for key, value in directives.items():
        if value is True:
            lines.append(f"#SBATCH --{key}")
        elif value is not None:
            lines.append(f"#SBATCH --{key}={shlex.quote(str(value))}")
    lines += ["", "set -eo pipefail", *setup, ""]
    lines.append('echo "vlp: job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, $(date)"')
    lines.append("srun " + shlex.join(command))
    return "\n".join(lines) + "\n"


# --- profiles and the resolved config -------------------------------------------------------------

PROFILE_KEYS = {f.name for f in dataclasses.fields(SbatchOptions)} - {"tasks_per_node"} | {"setup", "python"}


INTEGER_KEYS = {"nodes", "gpus_per_node", "cpus_per_task"}
TEXT_KEYS = {"mem", "time", "partition", "account", "qos", "job_name", "python"}
TEXT_PATTERNS = {
    "mem": SLURM_MEM,
    "time": SLURM_TIME,
    "partition": SLURM_NAME,
    "account": SLURM_NAME,
    "qos": SLURM_NAME,
}


def profile_integer(path: Path, key: str, value: object) -> int | None:
    """A whole-number profile field (YAML may give `4` or `"4"`); anything else is a SubmitError naming
    the profile and the field."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise SubmitError(f"profile {path}: {key} must be a whole number, got {value!r}")


def load_profile(path: Path | None) -> dict[str, Any]:
    """A `configs/slurm/*.yaml` profile: defaults for the sbatch options, `setup` (shell lines run before
    training: modules, environment) and `python` (the interpreter on the nodes; default: this one)."""
    if path is None:
        return {}
    if not path.is_file():
        raise SubmitError(f"profile {path}: no such file")
    profile = yaml.safe_load(path.read_text()) or {}
    if not isinstance(profile, dict):
        raise SubmitError(f"profile {path}: expected a mapping of {sorted(PROFILE_KEYS)}")
    unknown = set(profile) - PROFILE_KEYS
    if unknown:
        raise SubmitError(f"profile {path}: unknown key(s) {sorted(unknown)}; known: {sorted(PROFILE_KEYS)}")
    for key in INTEGER_KEYS & set(profile):
        profile[key] = profile_integer(path, key, profile[key])
    for key in TEXT_KEYS & set(profile):
        value = profile[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
            raise SubmitError(f"profile {path}: {key} must be text, got {value!r}")
        pattern = TEXT_PATTERNS.get(key)
        if value is not None and pattern is not None and not pattern.fullmatch(str(value)):
            raise SubmitError(
                f"profile {path}: {key} {value!r} is not a Slurm {key} (expected {pattern.pattern})"
            )
    setup = profile.get("setup") or []
    if not isinstance(setup, list) or not all(isinstance(line, str) for line in setup):
        raise SubmitError(f"profile {path}: setup must be a list of shell lines")
    for line in setup:
        if "\n" in line:
            raise SubmitError(f"profile {path}: setup line {line!r} spans lines; give one entry per line")
    return profile


def resolve_config(config_files: list[str], extra: list[str]) -> dict[str, Any]:
    """The full `vlp fit` config these files and arguments give (LightningCLI's --print_config)."""
    from vlp.cli import run

    args = ["fit", *(arg for path in config_files for arg in ("--config", path)), *extra, "--print_config"]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            run(args)
    except SystemExit as exit_info:
        if exit_info.code not in (0, None):
            raise SubmitError(f"the config does not parse (vlp fit {shlex.join(args[1:-1])})") from None
    return yaml.safe_load(printed.getvalue())


def tensorboard_logger_args(config: dict[str, Any]) -> dict[str, Any]:
    logger = config["trainer"].get("logger")
    if not (isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("TensorBoardLogger")):
        raise SubmitError(
            "trainer.logger must be one TensorBoardLogger for a Slurm run (its version folder is the run "
            f"folder that requeues continue in); got {logger!r}"
        )
    return logger.setdefault("init_args", {})


def next_version(experiment_dir: Path) -> int:
    versions = [
        int(path.name.split("_", 1)[1])
        for path in experiment_dir.glob("version_*")
        if path.name.split("_", 1)[1].isdigit()
    ]
    return max(versions, default=-1) + 1


def match_allocation(
    trainer: dict[str, Any], nodes: int | None, gpus_per_node: int | None
) -> tuple[int, int, int]:
    """(nodes, tasks per node, gpus per node) that agree with the trainer's num_nodes and devices, or a
    SubmitError that says what disagrees. Missing values are taken from the other side."""
    num_nodes, devices, accelerator = (
        trainer.get("num_nodes", 1),
        trainer.get("devices"),
        trainer.get("accelerator"),
    )
    if isinstance(devices, str) and devices.isdigit():  # `--trainer.devices 2` stays a string
        devices = int(devices)
    if nodes is not None and nodes != num_nodes:
        raise SubmitError(
            f"--nodes {nodes} but trainer.num_nodes is {num_nodes}; make them equal "
            f"(e.g. -- --trainer.num_nodes {nodes})"
        )
    counted = isinstance(devices, int) and devices > 0
    if gpus_per_node:
        if accelerator == "cpu":
            raise SubmitError(f"--gpus-per-node {gpus_per_node} but trainer.accelerator is cpu")
        if counted and devices != gpus_per_node:
            raise SubmitError(
                f"--gpus-per-node {gpus_per_node} but trainer.devices is {devices}; one task runs per device, "
                f"make them equal (e.g. -- --trainer.devices {gpus_per_node})"
            )
        return num_nodes, gpus_per_node, gpus_per_node
    if not counted:
        raise SubmitError(
            f"trainer.devices is {devices!r}: give --gpus-per-node, or a number of devices per node "
            "(-- --trainer.devices N) so the job can ask for one task per device"
        )
    if accelerator in ("gpu", "cuda"):
        raise SubmitError(f"trainer.accelerator is {accelerator} but no --gpus-per-node was given")
    return num_nodes, devices, 0


@dataclasses.dataclass
class Submission:
    run_dir: Path
    script: str
    job_config: dict[str, Any] | None  # the resolved `vlp fit` config (None: not a fit job)


def pick(args: argparse.Namespace, profile: dict[str, Any], name: str, default: Any = None) -> Any:
    """The command line's value, else the profile's, else `default`."""
    value = getattr(args, name)
    return value if value is not None else profile.get(name, default)


def pick_text(args: argparse.Namespace, profile: dict[str, Any], name: str) -> str | None:
    """Like `pick`, as text: YAML reads `mem: 0` or `time: 30` as numbers."""
    value = pick(args, profile, name)
    return None if value is None else str(value)


def sbatch_options(
    args: argparse.Namespace,
    profile: dict[str, Any],
    job_name: str,
    nodes: int,
    tasks_per_node: int,
    gpus: int | None,
) -> SbatchOptions:
    """The job's sbatch options: the allocation given, the rest from the command line, else the profile."""
    return SbatchOptions(
        job_name=args.job_name or profile.get("job_name") or job_name,
        nodes=nodes,
        tasks_per_node=tasks_per_node,
        gpus_per_node=gpus,
        cpus_per_task=int(pick(args, profile, "cpus_per_task", 1)),
        mem=pick_text(args, profile, "mem"),
        time=pick_text(args, profile, "time"),
        partition=pick_text(args, profile, "partition"),
        account=pick_text(args, profile, "account"),
        qos=pick_text(args, profile, "qos"),
    )


def prepare(args: argparse.Namespace, workdir: Path) -> Submission:
    """Everything `submit` writes, computed without touching the disk or the queue."""
    profile = load_profile(Path(args.profile) if args.profile else None)
    extra = list(args.extra)
    full = resolve_config(args.config, extra)  # what runs: files + extra args (checked here)
    job_config = resolve_config(args.config, []) if extra else full  # saved; extra go on the srun line
    nodes, tasks_per_node, gpus = match_allocation(
        full["trainer"], pick(args, profile, "nodes"), pick(args, profile, "gpus_per_node")
    )

    logger_args = tensorboard_logger_args(full)
    save_dir = Path(logger_args.get("save_dir") or "runs")
    experiment_dir = (workdir / save_dir / (logger_args.get("name") or "default")).resolve()
    version = logger_args.get("version")
    version = next_version(experiment_dir) if version is None else version
    run_dir = experiment_dir / (f"version_{version}" if isinstance(version, int) else str(version))
    if run_dir.exists():
        raise SubmitError(f"run folder {run_dir} exists; choose another trainer.logger.init_args.version")
    pins = {  # after the extra args, so they win: every (re)run of the job writes to this one folder
        "trainer.num_nodes": nodes,
        "trainer.devices": tasks_per_node,
        "trainer.default_root_dir": run_dir,
        "trainer.logger.init_args.save_dir": experiment_dir.parent,
        "trainer.logger.init_args.name": experiment_dir.name,
        "trainer.logger.init_args.version": version,
    }

    options = sbatch_options(args, profile, f"vlp-{experiment_dir.name}", nodes, tasks_per_node, gpus)
    python = str(profile.get("python") or sys.executable)
    command = [python, "-m", "vlp.cli", "fit", "--config", str(run_dir / JOB_CONFIG), *extra]
    command += [arg for key, value in pins.items() for arg in (f"--{key}", str(value))]
    script = render_sbatch(options, run_dir, workdir, command, list(profile.get("setup") or []))
    return Submission(run_dir, script, job_config)


def prepare_bootstrap(args: argparse.Namespace, workdir: Path) -> Submission:
    """`vlp data bootstrap EXTRA` as a job of `--nodes` x `--tasks-per-node` srun tasks (default: one per GPU,
    else one), each a rank; checked here with bootstrap's own parser, so a bad option fails before the queue."""
    from vlp.cli.data import parser as data_parser

    profile = load_profile(Path(args.profile) if args.profile else None)
    extra = list(args.extra)
    try:
        with contextlib.redirect_stderr(io.StringIO()) as errors:
            bootstrap = data_parser().parse_args(["bootstrap", *extra])
    except SystemExit:
        message = errors.getvalue().strip().splitlines()[-1:] or ["(no message)"]
        raise SubmitError(f"the bootstrap arguments do not parse: {message[0]}") from None
    if bootstrap.devices != 1:
        raise SubmitError(
            "under Slurm the srun tasks are the ranks: leave out --devices (use --tasks-per-node)"
        )
    nodes = int(pick(args, profile, "nodes", 1))
    gpus = int(pick(args, profile, "gpus_per_node", 0))
    tasks_per_node = args.tasks_per_node or gpus or 1
    output = (workdir / bootstrap.output).resolve()
    run_dir = output.parent / f"{output.name}-slurm"
    options = sbatch_options(args, profile, f"vlp-bootstrap-{output.name}", nodes, tasks_per_node, gpus)
    python = str(profile.get("python") or sys.executable)
    command = [python, "-m", "vlp.cli", "data", "bootstrap", *extra]
    setup = list(profile.get("setup") or [])
    script = render_sbatch(options, run_dir, workdir, command, setup, requeue=False)
    return Submission(run_dir, script, None)


def submit_bootstrap(args: argparse.Namespace) -> int:
    workdir = Path.cwd()
    submission = prepare_bootstrap(args, workdir)
    if args.dry_run:
        print(submission.script, end="")
        return 0
    submission.run_dir.mkdir(parents=True, exist_ok=True)  # a resubmission reuses it
    script = submission.run_dir / JOB_SCRIPT
    script.write_text(submission.script)
    job = sbatch(script)
    if job is None:
        return 1
    print(f"job:         {job}")
    print(f"log:         {submission.run_dir / LOG_PATTERN.replace('%j', job)}")
    return 0


def sbatch(script: Path) -> str | None:
    """Submit `script`; the job id, or None (the error printed)."""
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"sbatch failed ({result.returncode}): {result.stderr.strip()}", file=sys.stderr)
        return None
    return result.stdout.strip().split(";")[0]


def submit(args: argparse.Namespace) -> int:
    workdir = Path.cwd()
    submission = prepare(args, workdir)
    if args.dry_run:
        print(submission.script, end="")
        return 0
    run_dir = submission.run_dir
    run_dir.mkdir(parents=True, exist_ok=False)  # a concurrent submit that took this version fails loudly
    (run_dir / JOB_CONFIG).write_text(yaml.safe_dump(submission.job_config, sort_keys=False))
    script = run_dir / JOB_SCRIPT
    script.write_text(submission.script)
    job_id = sbatch(script)
    if job_id is None:
        return 1
    experiment_dir = run_dir.parent
    print(f"job:         {job_id}")
    print(f"run folder:  {run_dir}")
    print(f"log:         {run_dir / LOG_PATTERN.replace('%j', job_id)}")
    print(f"tensorboard: vlp tensorboard --logdir {shlex.quote(str(experiment_dir))}")
    return 0


# --- status, cancel, logs -------------------------------------------------------------------------


def job_id(value: str) -> str:
    if not JOB_ID.fullmatch(value):
        raise argparse.ArgumentTypeError(f"not a Slurm job id: {value!r}")
    return value


# `scontrol show job` fields that end their line and may hold spaces (paths, the job name)
LINE_END_FIELDS = ("JobName", "Command", "WorkDir", "StdErr", "StdIn", "StdOut")


def job_fields(job: str) -> dict[str, str]:
    """`scontrol show job` as key -> value (empty once Slurm has forgotten the job); paths and the job
    name are read to the end of their line, so spaces in them survive."""
    result = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    if result.returncode != 0:
        return {}
    fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout))
    for key in LINE_END_FIELDS:
        found = re.search(rf"(?:^|\s){key}=(.*)$", result.stdout, re.MULTILINE)
        if found:
            fields[key] = found.group(1).rstrip()
    return fields


def status(args: argparse.Namespace) -> int:
    if args.job is None:
        queue = subprocess.run(["squeue"], capture_output=True, text=True)
        sys.stdout.write(queue.stdout)
        sys.stderr.write(queue.stderr)
        return queue.returncode
    fields = job_fields(args.job)
    if not fields:
        print(f"job {args.job}: unknown to Slurm (finished long ago, or never existed)", file=sys.stderr)
        return 1
    fields["StdOut"] = str(log_path(args.job, Path("runs"), fields) or fields.get("StdOut", ""))
    keys = ("JobId", "JobName", "JobState", "Reason", "Restarts", "RunTime", "TimeLimit", "StdOut")
    for key in keys:
        print(f"{key + ':':<11}{fields.get(key, '')}")
    return 0


def cancel(args: argparse.Namespace) -> int:
    return subprocess.run(["scancel", args.job]).returncode


def log_path(job: str, search_root: Path, fields: dict[str, str] | None = None) -> Path | None:
    """The job's output file: beside its script (`<run folder>/job.sbatch`, from Slurm while it knows the
    job), else Slurm's StdOut (another script), else found under `search_root`. Slurm's own display of
    StdOut garbles a path holding `%` (it expands the escaped `%%`), so the script's folder comes first."""
    fields = job_fields(job) if fields is None else fields
    name = LOG_PATTERN.replace("%j", job)
    command = fields.get("Command")
    if command and Path(command).name == JOB_SCRIPT:
        return Path(command).parent / name
    stdout = fields.get("StdOut")
    if stdout and "%" not in stdout.replace("%j", ""):
        return Path(stdout.replace("%j", job))
    found = sorted(search_root.rglob(name))
    return found[0] if found else None


def logs(args: argparse.Namespace) -> int:
    path = log_path(args.job, Path(args.runs))
    if path is None or not path.is_file():
        print(f"job {args.job}: no log file found (looked in Slurm and under {args.runs})", file=sys.stderr)
        return 1
    if args.follow:
        with contextlib.suppress(KeyboardInterrupt):
            return subprocess.run(["tail", "-n", "+1", "-F", str(path)]).returncode
        return 0
    sys.stdout.write(path.read_text())
    errors = path.with_name(path.name.replace(".out", ".err"))
    if errors.is_file() and errors.stat().st_size:
        sys.stdout.write(f"--- {errors} ---\n{errors.read_text()}")
    return 0


def add_sbatch_arguments(sub: argparse.ArgumentParser) -> None:
    """The sbatch options every submitting command takes (defaults from `--profile`)."""
    sub.add_argument(
        "--profile", help="configs/slurm/*.yaml: defaults for the options below and set-up lines"
    )
    sub.add_argument("--nodes", type=int)
    sub.add_argument("--gpus-per-node", type=int, dest="gpus_per_node")
    sub.add_argument("--cpus-per-task", type=int, dest="cpus_per_task")
    sub.add_argument("--mem", help="memory per node, e.g. 64G")
    sub.add_argument("--time", help="time limit, e.g. 24:00:00 or 2-00:00:00")
    sub.add_argument("--partition")
    sub.add_argument("--account")
    sub.add_argument("--qos")
    sub.add_argument("--job-name", dest="job_name")
    sub.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp slurm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    sub = commands.add_parser("submit", help="submit `vlp fit` of a config as a Slurm job")
    sub.add_argument("--config", action="append", required=True, help="a vlp fit config (repeatable)")
    add_sbatch_arguments(sub)
    sub.add_argument("extra", nargs="*", help="after --: more `vlp fit` arguments")
    sub.set_defaults(run=submit)

    sub = commands.add_parser(
        "bootstrap", help="submit `vlp data bootstrap` as a Slurm job (srun tasks = ranks)"
    )
    add_sbatch_arguments(sub)
    sub.add_argument("--tasks-per-node", type=int, dest="tasks_per_node", help="default: one per GPU, else 1")
    sub.add_argument("extra", nargs="*", help="after --: the `vlp data bootstrap` arguments")
    sub.set_defaults(run=submit_bootstrap)

    sub = commands.add_parser("status", help="the queue, or one job's state")
    sub.add_argument("job", nargs="?", type=job_id)
    sub.set_defaults(run=status)

    sub = commands.add_parser("cancel", help="cancel a job")
    sub.add_argument("job", type=job_id)
    sub.set_defaults(run=cancel)

    sub = commands.add_parser("logs", help="print (or --follow) a job's output")
    sub.add_argument("job", type=job_id)
    sub.add_argument("--follow", action="store_true")
    sub.add_argument("--runs", default="runs", help="where to look once Slurm has forgotten the job")
    sub.set_defaults(run=logs)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SubmitError as error:
        print(f"vlp slurm {args.command}: {error}", file=sys.stderr)
        return 2
