"""`vlp tensorboard [--logdir runs] [--port N]`: TensorBoard over the runs, on 127.0.0.1 only.

Binds to the loopback address so a shared or cluster machine never exposes the runs; reach it from
elsewhere with an SSH tunnel (`ssh -L 6006:127.0.0.1:6006 host`). Prints the URL, serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

HOST = "127.0.0.1"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlp tensorboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", default="runs", help="the folder of runs (default: runs)")
    parser.add_argument(
        "--port", default="default", help="a port, 0 for any free one, default: 6006 or the next free one"
    )
    args = parser.parse_args(argv)
    logdir = Path(args.logdir)
    if not logdir.is_dir():
        parser.error(f"--logdir {logdir}: no such folder (runs appear there once `vlp fit` starts)")

    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(logdir), "--host", HOST, "--port", str(args.port)])
    url = board.launch()
    print(f"TensorBoard for {logdir.resolve()}: {url}  (Ctrl-C stops it)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0
