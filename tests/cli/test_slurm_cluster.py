"""`vlp slurm` against a real single-node Slurm (scripts/slurm-local.sh): a 2-rank DDP job (gloo, CPU)
that completes with files from rank 0 only, and a job that gets the requeue signal mid-run and finishes
with the same TensorBoard losses, step for step, as the uninterrupted job.

Uses the cluster that SLURM_CONF points at (`.ci/run` starts one), else starts one for this module and
stops it afterwards; skips only where Slurm cannot run at all (not root, or no apt-get to install it)."""

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard_scalars import scalars

from vlp.cli.slurm import main

pytestmark = pytest.mark.slow  # minutes of training or many processes: `make test-fast` skips it

REPO = Path(__file__).parents[2]
CONFIGS = REPO / "tests" / "configs"
PROFILE = REPO / "configs" / "slurm" / "local.yaml"
MAX_STEPS = 24
JOB_NAME = "vlp 'tiny' \"ddp\" job"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


def cluster_is_up() -> bool:
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    return result.returncode == 0 and "idle" in result.stdout


@pytest.fixture(scope="module")
def slurm():
    if os.environ.get("SLURM_CONF") and shutil.which("sinfo") and cluster_is_up():
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (scripts/slurm-local.sh starts its daemons as root)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    script = REPO / "scripts" / "slurm-local.sh"
    started = subprocess.run([str(script), "start"], capture_output=True, text=True, timeout=600)
    if started.returncode == 2:
        pytest.skip(started.stderr.strip())
    assert started.returncode == 0, started.stdout + started.stderr
    ours = "already running" not in started.stdout  # stop only a cluster this fixture started
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = re.search(r"SLURM_CONF=(\S+)", started.stdout).group(1)
    try:
        yield
    finally:
        if ours:
            subprocess.run([str(script), "stop"], timeout=120)
        if previous is None:
            del os.environ["SLURM_CONF"]
        else:
            os.environ["SLURM_CONF"] = previous


def job_state(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def job_name(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return re.search(r"JobName=(.*)$", out, re.MULTILINE).group(1).strip()


def wait_for(job: str, timeout_s: float = 240) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_state(job)
        if state.get("JobState") in DONE:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish in {timeout_s} s: {job_state(job)}")


def submit(workdir: Path) -> tuple[str, Path]:
    """Submits the tiny 2-rank config from `workdir`; returns the job id and the run folder."""
    args = ["--profile", str(PROFILE), "--job-name", JOB_NAME, "--config", str(CONFIGS / "tiny.yaml")]
    args += ["--config", str(CONFIGS / "slurm-ddp.yaml"), "--", "--trainer.max_steps", str(MAX_STEPS)]
    printed, cwd = io.StringIO(), os.getcwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(printed):
            assert main(["submit", *args]) == 0
    finally:
        os.chdir(cwd)
    out = printed.getvalue()
    job = re.search(r"job:\s+(\d+)", out).group(1)
    run_dir = Path(re.search(r"run folder:\s+(.+)", out).group(1))
    assert f"slurm-{job}.out" in out and "vlp tensorboard --logdir" in out
    return job, run_dir


def log_text(run_dir: Path, job: str) -> str:
    return (run_dir / f"slurm-{job}.out").read_text() + (run_dir / f"slurm-{job}.err").read_text()


@pytest.fixture(scope="module")
def straight_job(slurm, tmp_path_factory):
    """The uninterrupted reference, submitted once for the module: (job id, run folder, final state)."""
    job, run_dir = submit(tmp_path_factory.mktemp("straight"))
    return job, run_dir, wait_for(job)


def test_submitted_job_completes_with_files_from_rank_zero_only(straight_job, capsys):
    job, run_dir, state = straight_job
    assert state["JobState"] == "COMPLETED", log_text(run_dir, job)[-3000:]
    assert job_name(job) == JOB_NAME  # quotes and spaces arrive as given
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]
    files = sorted(p.name for p in run_dir.iterdir())
    events = [name for name in files if name.startswith("events.out.tfevents.")]
    assert len(events) == 1, files  # one writer: rank 0
    rest = sorted(set(files) - set(events))
    expected = ["checkpoints", "config.yaml", "hparams.yaml", "job.sbatch", "job.yaml", "metrics.json"]
    assert rest == sorted([*expected, f"slurm-{job}.err", f"slurm-{job}.out"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "last.ckpt",
        f"step={MAX_STEPS}.ckpt",
    ]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == MAX_STEPS
    logged = scalars(run_dir)
    assert [step for step, _ in logged["train/loss"]] == list(range(MAX_STEPS))
    log = log_text(run_dir, job)
    assert log.count("metrics.json:") == 1 and "restart 0" in log


def test_requeue_mid_run_resumes_into_the_same_run_with_identical_losses(straight_job, tmp_path):
    _, reference_dir, _ = straight_job
    job, run_dir = submit(tmp_path)
    first_checkpoint = run_dir / "checkpoints" / "step=4.ckpt"
    deadline = time.monotonic() + 180
    while not first_checkpoint.exists():
        assert time.monotonic() < deadline and job_state(job).get("JobState") not in DONE, log_text(
            run_dir, job
        )
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # what Slurm sends 90 s before the limit
    state = wait_for(job)
    log = log_text(run_dir, job)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-3000:]
    assert "restart 0" in log and "restart 1" in log

    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=True, map_location="cpu")
    assert 4 <= hpc["global_step"] < MAX_STEPS  # saved mid-run, at a step boundary
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert final["global_step"] == MAX_STEPS
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]  # same run folder

    resumed, reference = scalars(run_dir), scalars(reference_dir)
    for tag in (
        "train/loss",
        "train/itc/loss",
        "train/itm/loss",
        "train/mlm/loss",
        "val/itc/loss",
        "val/retrieval/t2i_r1",
    ):
        assert resumed[tag] == reference[tag], tag  # every step once, values bit for bit


def interruptible() -> None:
    """Ctrl-C reaches the child even when this run inherited an ignored SIGINT (a background CI job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_status_logs_and_cancel(straight_job, tmp_path, capsys):
    job, run_dir, _ = straight_job
    assert main(["status", job]) == 0
    out = capsys.readouterr().out
    assert "JobState:  COMPLETED" in out and f"StdOut:    {run_dir / f'slurm-{job}.out'}" in out
    assert main(["logs", job]) == 0
    assert f"vlp: job {job}, restart 0" in capsys.readouterr().out

    follow = [sys.executable, "-m", "vlp.cli", "slurm", "logs", job, "--follow"]
    follower = subprocess.Popen(
        follow, stdout=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=interruptible
    )
    try:
        lines = iter(follower.stdout.readline, "")
        assert any(line.startswith("metrics.json:") for line in lines)  # the whole log, then waits
        assert follower.poll() is None
    finally:
        os.killpg(follower.pid, signal.SIGINT)
    assert follower.wait(timeout=30) == 0

    sleeper = subprocess.run(
        ["sbatch", "--parsable", "--output", str(tmp_path / "sleep.out"), "--wrap", "sleep 300"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        assert main(["status"]) == 0 and sleeper in capsys.readouterr().out  # the queue
        assert main(["cancel", sleeper]) == 0
        assert wait_for(sleeper, timeout_s=60)["JobState"] == "CANCELLED"
    finally:
        subprocess.run(["scancel", sleeper])  # never leave it holding the node's CPUs


@pytest.mark.parametrize("experiment", ["exp %x %j %% 'q' \"d\"", "50% of %u"])
def test_a_percent_in_the_experiment_name_keeps_the_logs_in_the_run_folder(
    slurm, tmp_path, capsys, experiment
):
    """Slurm expands `%x`, `%j`, `%%` in --output / --error: escaped, the job's log lands in its run folder
    (whose name holds them as written), and `vlp slurm status` / `logs` find it."""
    args = ["--profile", str(PROFILE), "--config", str(CONFIGS / "tiny.yaml"), "--"]
    args += [
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.logger.init_args.name",
        experiment,
    ]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["submit", *args]) == 0
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    job = re.search(r"job:\s+(\d+)", out).group(1)
    run_dir = tmp_path / "runs" / experiment / "version_0"
    state = wait_for(job)
    assert state["JobState"] == "COMPLETED", sorted(p.name for p in run_dir.iterdir())
    assert sorted(p.name for p in run_dir.glob("slurm-*")) == [f"slurm-{job}.err", f"slurm-{job}.out"]
    assert (run_dir / "metrics.json").is_file()
    assert main(["status", job]) == 0
    assert f"StdOut:    {run_dir / f'slurm-{job}.out'}\n" in capsys.readouterr().out
    assert main(["logs", job]) == 0
    assert f"vlp: job {job}, restart 0" in capsys.readouterr().out


def test_a_bootstrap_job_of_two_tasks_writes_what_one_local_rank_writes(slurm, tmp_path):
    """`vlp slurm bootstrap`: the srun tasks are the ranks (SLURM_PROCID / SLURM_NTASKS), and the merged
    data set, decisions and counts equal one process's (a 2-step checkpoint: the decisions need not be good)."""
    from PIL import Image

    env = {key: value for key, value in os.environ.items() if not key.startswith(("LOCAL_RANK", "MASTER_"))}
    fit = [sys.executable, "-m", "vlp.cli", "fit", "--config", str(CONFIGS.parent / "configs" /
           "bootstrap-pretrain.yaml"), "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    assert subprocess.run(fit, env=env, capture_output=True, timeout=300).returncode == 0
    (tmp_path / "images").mkdir()
    rows = ["filepath\ttitle"]
    for index in range(12):
        Image.new("RGB", (40, 32), (20 * index, 255 - 20 * index, 90)).save(
            tmp_path / "images" / f"{index}.jpg"
        )
        rows.append(f"{index}.jpg\ta picture numbered {index}")
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
    args = ["--model", str(tmp_path / "checkpoints" / "last.ckpt"), "--input", "pairs.tsv", "--image-root",
            "images", "--captions-per-image", "2", "--shard-size", "3", "--max-length", "8"]  # fmt: skip
    local = [sys.executable, "-m", "vlp.cli", "data", "bootstrap", *args, "--output", "local"]
    assert subprocess.run(local, cwd=tmp_path, env=env, capture_output=True, timeout=300).returncode == 0
    printed, cwd = io.StringIO(), os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(printed):
            assert main(["bootstrap", "--profile", str(PROFILE), "--tasks-per-node", "2", "--",
                         *args, "--output", "job"]) == 0  # fmt: skip
    finally:
        os.chdir(cwd)
    job = re.search(r"job:\s+(\d+)", printed.getvalue()).group(1)
    state = wait_for(job)
    log = tmp_path / "job-slurm" / f"slurm-{job}.out"
    assert state["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert "[rank 1/2]" in log.read_text()  # two ranks ran
    for name in ("decisions.csv", "counts.json"):
        assert (tmp_path / "job" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
