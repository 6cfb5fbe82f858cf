"""`vlp tensorboard`: serves the runs folder on 127.0.0.1 and prints the URL."""

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from vlp.cli.tensorboard import main


def test_serves_the_runs_on_loopback_and_prints_the_url(tmp_path):
    with SummaryWriter(str(tmp_path / "runs" / "shapes" / "version_0")) as writer:
        writer.add_scalar("train/itc/loss", 2.5, 0)
    command = [
        sys.executable,
        "-m",
        "vlp.cli",
        "tensorboard",
        "--logdir",
        str(tmp_path / "runs"),
        "--port",
        "0",
    ]
    env = {"PYTHONPATH": str(Path(__file__).parents[2]), "PATH": "/usr/bin:/bin"}
    server = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        preexec_fn=interruptible,
    )
    try:
        line = server.stdout.readline()
        url = re.search(r"(http://\S+)", line).group(1)
        assert url.startswith("http://127.0.0.1:")
        deadline, runs = time.monotonic() + 60, []
        while not runs and time.monotonic() < deadline:  # the first scan of the folder takes a moment
            with urllib.request.urlopen(url.rstrip("/") + "/data/runs", timeout=10) as response:
                runs = json.load(response)
            time.sleep(0.5)
        assert runs == ["shapes/version_0"]
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0


def test_a_missing_logdir_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--logdir", str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert f"--logdir {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err


def interruptible() -> None:
    """Ctrl-C reaches the child even when this run inherited an ignored SIGINT (a background CI job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
