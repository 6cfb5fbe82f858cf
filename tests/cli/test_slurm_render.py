"""`vlp slurm submit --dry-run`: the rendered sbatch script (directives, quoting, profile defaults) and the
checks made before anything reaches Slurm. No Slurm needed: the script's shell part runs with a stub `srun`."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vlp.cli.slurm import SbatchOptions, SubmitError, main, match_allocation, render_sbatch

CONFIGS = Path(__file__).parents[1] / "configs"
TINY = str(CONFIGS / "tiny.yaml")
DDP = str(CONFIGS / "slurm-ddp.yaml")
HOSTILE = "a b 'q' \"d\" $(touch PWNED) `touch PWNED`; touch PWNED & x"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def dry_run(capsys, *args: str) -> str:
    assert main(["submit", "--config", TINY, "--config", DDP, "--dry-run", *args]) == 0
    return capsys.readouterr().out


def directives(script: str) -> dict[str, str | None]:
    """`#SBATCH --key=value` lines, unquoted the way sbatch reads them."""
    found = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line.removeprefix("#SBATCH --").partition("=")
            found[key] = shlex.split(value)[0] if value else None
    return found


def srun_argv(script: str, folder: Path) -> list[str]:
    """Runs the script's shell part with a stub `srun` that records its arguments; returns them."""
    stub = folder / "bin" / "srun"
    stub.parent.mkdir()
    stub.write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$SRUN_ARGS"\n')
    stub.chmod(0o755)
    (folder / "job.sh").write_text(script)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "SRUN_ARGS": str(folder / "argv")}
    env |= {"SLURM_JOB_ID": "1"}
    subprocess.run(["bash", str(folder / "job.sh")], cwd=folder, env=env, check=True, timeout=30)
    return (folder / "argv").read_bytes().decode().split("\0")[:-1]


def test_dry_run_asks_for_one_task_per_device_a_requeue_signal_and_logs_in_the_run_folder(in_tmp, capsys):
    script = dry_run(capsys, "--job-name", "shapes", "--time", "00:20:00", "--", "--trainer.max_steps", "40")
    run_dir = in_tmp / "runs" / "default" / "version_0"
    assert directives(script) == {
        "job-name": "shapes",
        "nodes": "1",
        "ntasks-per-node": "2",
        "cpus-per-task": "1",
        "time": "00:20:00",
        "signal": "USR1@90",
        "requeue": None,
        "open-mode": "append",
        "chdir": str(in_tmp),
        "output": str(run_dir / "slurm-%j.out"),
        "error": str(run_dir / "slurm-%j.err"),
    }
    srun = shlex.split(next(line for line in script.splitlines() if line.startswith("srun ")))
    assert srun[1:8] == [
        sys.executable,
        "-m",
        "vlp.cli",
        "fit",
        "--config",
        str(run_dir / "job.yaml"),
        "--trainer.max_steps",
    ]
    pins = dict(zip(srun[9::2], srun[10::2], strict=True))
    assert pins == {
        "--trainer.num_nodes": "1",
        "--trainer.devices": "2",
        "--trainer.default_root_dir": str(run_dir),
        "--trainer.logger.init_args.save_dir": str(in_tmp / "runs"),
        "--trainer.logger.init_args.name": "default",
        "--trainer.logger.init_args.version": "0",
    }
    assert not (in_tmp / "runs").exists()  # a dry run writes nothing


def test_the_next_free_version_becomes_the_run_folder(in_tmp, capsys):
    (in_tmp / "runs" / "default" / "version_3").mkdir(parents=True)
    script = dry_run(capsys)
    assert directives(script)["output"] == str(in_tmp / "runs" / "default" / "version_4" / "slurm-%j.out")


def test_profile_gives_defaults_and_the_command_line_overrides_them(in_tmp, capsys):
    profile = in_tmp / "cluster.yaml"
    profile.write_text(
        "partition: gpu\naccount: lab-42\nqos: high\ntime: '24:00:00'\nmem: 64G\ncpus_per_task: 8\n"
        "setup:\n  - module load cuda/12.4\n  - export VLP_PROFILE=1\n"
    )
    script = dry_run(capsys, "--profile", str(profile), "--time", "01:00:00", "--qos", "low")
    found = directives(script)
    assert (found["partition"], found["account"], found["mem"], found["cpus-per-task"]) == (
        "gpu",
        "lab-42",
        "64G",
        "8",
    )
    assert (found["time"], found["qos"]) == ("01:00:00", "low")
    body = script.split("set -eo pipefail\n", 1)[1]
    assert body.index("module load cuda/12.4") < body.index("export VLP_PROFILE=1") < body.index("srun ")


def test_profile_with_an_unknown_key_is_named(in_tmp, capsys):
    profile = in_tmp / "cluster.yaml"
    profile.write_text("partition: gpu\nwalltime: '1:00:00'\n")
    assert main(["submit", "--config", TINY, "--profile", str(profile), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(profile) in err and "walltime" in err


def test_quotes_spaces_substitutions_and_semicolons_run_nothing(tmp_path, monkeypatch, capsys):
    """A hostile job name, run folder (experiment name and working folder) and extra argument reach
    srun as exactly the strings given, and nothing they contain runs."""
    workdir = tmp_path / "work $(touch PWNED) dir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    script = dry_run(
        capsys,
        "--job-name",
        HOSTILE,
        "--",
        f"--trainer.logger.init_args.name={HOSTILE}",
        "--model.init_args.optim.lr",
        "1e-3",
    )
    found = directives(script)
    assert found["job-name"] == HOSTILE
    run_dir = workdir / "runs" / HOSTILE / "version_0"
    assert found["output"] == str(run_dir / "slurm-%j.out") and found["chdir"] == str(workdir)
    argv = srun_argv(script, tmp_path)
    assert argv[:6] == [sys.executable, "-m", "vlp.cli", "fit", "--config", str(run_dir / "job.yaml")]
    assert argv[6] == f"--trainer.logger.init_args.name={HOSTILE}"
    assert argv[argv.index("--trainer.default_root_dir") + 1] == str(run_dir)
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"job_name": "two\nlines"}, "job name"),
        ({"job_name": "back\\slash"}, "job name"),
        ({"time": "1 day"}, "time"),
        ({"partition": "gpu;reboot"}, "partition"),
        ({"account": "$(id)"}, "account"),
        ({"mem": "lots"}, "mem"),
        ({"nodes": 0}, "nodes"),
        ({"gpus_per_node": -1}, "gpus_per_node"),
    ],
)
def test_invalid_sbatch_values_are_refused_naming_the_field(change, message):
    options = SbatchOptions(**{"job_name": "ok", **change})
    with pytest.raises(SubmitError, match=message):
        render_sbatch(options, Path("/runs/x"), Path("/work"), ["vlp"], [])


def test_a_newline_in_an_argument_is_refused():
    with pytest.raises(SubmitError, match="value"):
        render_sbatch(SbatchOptions(job_name="ok"), Path("/runs/x"), Path("/w"), ["vlp", "a\ntouch x"], [])


@pytest.mark.parametrize(
    ("trainer", "nodes", "gpus", "message"),
    [
        ({"num_nodes": 1, "devices": 2}, 2, None, r"--nodes 2 but trainer.num_nodes is 1"),
        (
            {"num_nodes": 1, "devices": 2, "accelerator": "gpu"},
            None,
            4,
            r"--gpus-per-node 4 but trainer.devices is 2",
        ),
        ({"num_nodes": 1, "devices": "auto", "accelerator": "cpu"}, None, None, r"trainer.devices is 'auto'"),
        ({"num_nodes": 1, "devices": 2, "accelerator": "cpu"}, None, 2, r"trainer.accelerator is cpu"),
        ({"num_nodes": 1, "devices": 2, "accelerator": "gpu"}, None, None, r"no --gpus-per-node"),
    ],
)
def test_allocation_and_trainer_must_agree(trainer, nodes, gpus, message):
    with pytest.raises(SubmitError, match=message):
        match_allocation(trainer, nodes, gpus)


def test_allocation_follows_the_trainer_when_options_are_left_out():
    assert match_allocation({"num_nodes": 2, "devices": "4"}, None, None) == (2, 4, 0)
    assert match_allocation({"num_nodes": 2, "devices": "auto", "accelerator": "auto"}, 2, 8) == (2, 8, 8)


def test_disagreement_is_reported_before_submitting(in_tmp, capsys):
    code = main(["submit", "--config", TINY, "--config", DDP, "--nodes", "2", "--dry-run"])
    assert code == 2
    assert "--nodes 2 but trainer.num_nodes is 1" in capsys.readouterr().err


def test_a_bad_config_key_fails_before_submitting(in_tmp, capsys):
    code = main(["submit", "--config", TINY, "--dry-run", "--", "--trainer.not_a_key", "1"])
    assert code == 2
    assert "not_a_key" in capsys.readouterr().err


def test_profile_numbers_are_read_as_slurm_text(in_tmp, capsys):
    """YAML reads `mem: 0` (all of a node's memory) and `time: 30` (minutes) as numbers."""
    profile = in_tmp / "cluster.yaml"
    profile.write_text("mem: 0\ntime: 30\n")
    found = directives(dry_run(capsys, "--profile", str(profile)))
    assert (found["mem"], found["time"]) == ("0", "30")


PERCENT_NAMES = ["exp-%x", "run %j", "100%% done", "50%", "%", "a 'quoted' \"name\" %x%j%%", "%n-%N-%u-%A_%a"]


@pytest.mark.parametrize("name", PERCENT_NAMES)
def test_a_percent_in_the_experiment_name_is_escaped_in_the_log_paths(in_tmp, capsys, name):
    """Slurm expands `%x`, `%j`, ... in --output / --error: the run folder's `%` are written `%%`, so the
    job's logs land in its run folder, under the name `vlp slurm logs` looks for."""
    script = dry_run(capsys, "--", "--trainer.logger.init_args.name", name)
    run_dir = in_tmp / "runs" / name / "version_0"
    found = directives(script)
    escaped = str(run_dir).replace("%", "%%")
    assert found["output"] == f"{escaped}/slurm-%j.out" and found["error"] == f"{escaped}/slurm-%j.err"
    assert found["chdir"] == str(in_tmp)
    argv = srun_argv(script, in_tmp)
    assert argv[argv.index("--trainer.logger.init_args.name") + 1] == name


PROFILE_FIELDS = [
    # (profile line, the field, what is wrong)
    *[
        (f"cpus_per_task: {bad}", "cpus_per_task", "must be a whole number")
        for bad in ("four", 2.5, "[1]", "true", "{a: 1}", "'-1'", "''")
    ],
    *[(f"nodes: {bad}", "nodes", "must be a whole number") for bad in ("two", 1.5, "[2]")],
    *[(f"gpus_per_node: {bad}", "gpus_per_node", "must be a whole number") for bad in ("eight", "no")],
    ("mem: [64G]", "mem", "must be text"),
    ("mem: 64 GB", "mem", "is not a Slurm mem"),
    ("time: soon", "time", "is not a Slurm time"),
    ("time: 1.5", "time", "must be text"),
    ("partition: 'a;b'", "partition", "is not a Slurm partition"),
    ("qos: {x: 1}", "qos", "must be text"),
    ("account: true", "account", "must be text"),
    ("python: [python3]", "python", "must be text"),
]


@pytest.mark.parametrize(("line", "key", "problem"), PROFILE_FIELDS)
def test_a_malformed_profile_field_is_a_submit_error_naming_profile_and_field(
    in_tmp, capsys, line, key, problem
):
    profile = in_tmp / "cluster.yaml"
    profile.write_text(line + "\n")
    code = main(["submit", "--config", TINY, "--config", DDP, "--dry-run", "--profile", str(profile)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"vlp slurm submit: profile {profile}: {key} ") and problem in err
    assert "Traceback" not in err


def test_profile_whole_numbers_may_be_quoted(in_tmp, capsys):
    profile = in_tmp / "cluster.yaml"
    profile.write_text("cpus_per_task: '4'\nnodes: 1\n")
    assert directives(dry_run(capsys, "--profile", str(profile)))["cpus-per-task"] == "4"


def test_bootstrap_job_runs_one_rank_per_task_beside_its_output_without_a_requeue_signal(in_tmp, capsys):
    args = ["--model", "last.ckpt", "--input", "pairs.tsv", "--output", "cleaned", "--threshold", "0.4"]
    assert main(["bootstrap", "--gpus-per-node", "4", "--nodes", "2", "--dry-run", "--", *args]) == 0
    script = capsys.readouterr().out
    run_dir = in_tmp / "cleaned-slurm"
    assert directives(script) == {
        "job-name": "vlp-bootstrap-cleaned",
        "nodes": "2",
        "ntasks-per-node": "4",
        "cpus-per-task": "1",
        "gpus-per-node": "4",
        "open-mode": "append",
        "chdir": str(in_tmp),
        "output": str(run_dir / "slurm-%j.out"),
        "error": str(run_dir / "slurm-%j.err"),
    }  # no signal or requeue: a resubmitted job skips the shards it finished
    assert srun_argv(script, in_tmp) == [sys.executable, "-m", "vlp.cli", "data", "bootstrap", *args]
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "pairs.tsv", "--output", "o"], "do not parse: .*required: --model"),
        (["--model", "m", "--input", "p.tsv", "--output", "o", "--devices", "2"], "leave out --devices"),
    ],
)
def test_bootstrap_arguments_are_checked_before_submitting(in_tmp, capsys, args, message):
    assert main(["bootstrap", "--dry-run", "--", *args]) == 2
    assert re.search(message, capsys.readouterr().err)
