"""Every `vlp` / `make` command the README and docs/ show runs, as a user types it, in their order.

litgpt's `tests/test_readme.py` is the pattern: the commands a user is shown are the interface, so a command
whose form changes fails here instead of on a user's machine. The commands run in a scratch folder laid out
as the repository (configs/ and the data files the data commands name), in the order they are documented,
sharing their runs: pre-train -> evaluate -> export -> zero-shot / fine-tune -> test -> predict, each
strategy and precision, `vlp data optimize` -> `fit` on the chunks. A short form keeps each one to seconds
(`SHORT`: two steps, two validation batches). A command that needs what only a user has (a GPU cluster, COCO,
a bucket) says so in a trailing `# needs: ...` comment: it is parsed (`--print_config`, `--dry-run`), not run.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).parents[1]
# reading order, which is also the order the commands' inputs come to exist in: `make train` (README) makes
# runs/shapes-tiny/version_0 that configs.md resumes, tests and predicts from, data.md writes the chunks it
# trains on, evaluation.md exports version_0 and fine-tunes from it before testing the fine-tuned runs
PAGE_ORDER = ["README.md", "docs/configs.md", "docs/data.md", "docs/scaling.md", "docs/token-reduction.md",
              "docs/evaluation.md", "docs/checkpoints.md", "docs/slurm.md", "docs/kernels.md",
              "docs/tensorboard.md", "docs/performance.md", "docs/troubleshooting.md", "docs/design.md"]  # fmt: skip
PAGES = [ROOT / name for name in PAGE_ORDER]
VLP = str(Path(sys.executable).parent / "vlp")
# a few steps, two validation batches, no progress bar: what every fit / validate / test / predict adds
SHORT = [
    "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
    "--trainer.limit_test_batches", "2", "--trainer.limit_predict_batches", "2",
    "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
]  # fmt: skip
COUNT = 48  # samples of each data file: more than one batch of the configs that read them
NOT_RUN = {
    "make test": "the suite itself (CI runs it)",
    "make tensorboard": "a server (tests/cli/test_tensorboard.py)",
    "make bench BENCH_ARGS=--smoke": "every benchmark script (tests/test_benchmarks.py)",
}
# `make` targets the pages name in their prose (`make lint`), not in a fenced block: each is run by a block's
# command, or by something else that this says
PROSE_TARGETS_RUN_ELSEWHERE = {
    "install": "every target's first step; CI's fresh clone runs it (.ci/run)",
    "test": "the suite itself (CI runs it)",
    "test-fast": "the suite without the tests marked slow (CI runs the whole suite)",
    "lint": "CI runs it before the suite (.ci/run)",
    "format": "rewrites the checkout's files; `make lint` (CI) checks what it leaves",
    "tensorboard": "a server (tests/cli/test_tensorboard.py)",
    "gpu-check": "needs a CUDA GPU (scripts/gpu-check.sh; the device machine when one is lent)",
    "gpu-wheels": "downloads wheels from a package registry for a GPU machine that has none",
}


@dataclass
class Command:
    page: str
    line: int
    text: str  # the command, continuation lines joined
    needs: str | None  # what only a user has, from a trailing `# needs: ...`

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text)

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def numbered_lines(page: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, line, whether it lies in a fenced block) of every line of `page` but the fences."""
    fenced = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        else:
            yield number, line, fenced


def documented_commands() -> list[Command]:
    """The `vlp ...` and `make ...` lines of every fenced block, comments split off, in page order."""
    commands = []
    for page in PAGES:
        start, pending = 0, ""
        for number, line, fenced in numbered_lines(page):
            if not fenced:
                continue
            if not pending and not re.match(r"\s*(vlp|make) ", line):
                continue
            start = start if pending else number
            pending += " " + line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            text, _, comment = pending.partition(" #")
            needs = re.search(r"needs: ?(.*)", comment)
            commands.append(Command(page.name, start, " ".join(text.split()), needs and needs.group(1)))
            pending = ""
    return commands


def prose_make_targets() -> dict[str, str]:
    """target -> where it is first named, for every `make TARGET ...` in inline code of the pages' prose."""
    targets: dict[str, str] = {}
    for page in PAGES:
        for number, line, fenced in numbered_lines(page):
            if not fenced:
                for target in re.findall(r"`make ([a-z][a-z-]*)", line):
                    targets.setdefault(target, f"{page.relative_to(ROOT)}:{number}")
    return targets


def jpeg(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, ((37 * seed) % 256, (91 * seed) % 256, (53 * seed) % 256)).save(buffer, "JPEG")
    return buffer.getvalue()


def lay_out_user_files(folder: Path) -> None:
    """The repository's configs, and the data files the data commands name: COCO captions with images,
    WebDataset shards, a TSV table."""
    (folder / "configs").symlink_to(ROOT / "configs")
    for name in ("Makefile", "pyproject.toml", "requirements-lock.txt"):
        (folder / name).symlink_to(ROOT / name)
    words = ["red", "blue", "green", "small", "large", "circle", "square", "left", "right", "top"]
    images, captions = [], []
    for index in range(COUNT):
        (folder / "coco").mkdir(exist_ok=True)
        (folder / "coco" / f"{index:06d}.jpg").write_bytes(jpeg(index))
        images.append({"id": index, "file_name": f"{index:06d}.jpg"})
        captions.append({"id": index, "image_id": index, "caption": f"a {words[index % 10]} picture {index}"})
    (folder / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (folder / "shards").mkdir()
    for shard in range(2):
        with tarfile.open(folder / "shards" / f"shard-{shard:03d}.tar", "w") as archive:
            for index in range(COUNT):
                key = f"{shard}{index:04d}"
                for name, data in ((f"{key}.jpg", jpeg(index + COUNT * shard, (64, 48))),
                                   (f"{key}.txt", f"the {words[index % 10]} shard image {index}".encode())):  # fmt: skip
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    (folder / "images").mkdir()
    rows = ["filepath\ttitle"]
    for index in range(COUNT):
        (folder / "images" / f"{index}.jpg").write_bytes(jpeg(100 + index))
        rows.append(f"{index}.jpg\ta {words[index % 10]} table image {index}")
    (folder / "train.tsv").write_text("\n".join(rows[: COUNT - 15]) + "\n")
    (folder / "val.tsv").write_text("\n".join(rows[:1] + rows[COUNT - 15 :]) + "\n")


def short_form(command: Command) -> tuple[list[str], bool]:
    """(argv to run, whether it runs for real). Training commands get `SHORT`; a command that `needs`
    something is parsed instead: `--print_config` for the LightningCLI ones, `--dry-run` for a Slurm submit or bootstrap."""
    words = command.words
    if words[0] == "make":
        # the checkout's environment, never reinstalled from here (-o: its stamp counts as up to date; make
        # would otherwise install the scratch folder's symlinked project), the short form in ARGS
        venv = Path(sys.executable).parents[1]
        return [
            "make",
            "-o",
            f"{venv}/.installed",
            *words[1:],
            f"VENV={venv}",
            f"ARGS={' '.join(SHORT)}",
        ], True
    argv = [VLP, *words[1:]]
    lightning = words[1] in ("fit", "validate", "test", "predict")
    if command.needs is None:
        return [*argv, *SHORT] if lightning else argv, True
    if lightning:
        return [*argv, "--print_config"], False
    if words[1:3] in (["slurm", "submit"], ["slurm", "bootstrap"]):
        separator = argv.index("--") if "--" in argv else len(argv)
        return [*argv[:separator], "--dry-run", *argv[separator:]], False
    return [], False


# what Lightning, torch.distributed, DeepSpeed and Slurm set in a process that ran (or is) a rank
LEFT_BEHIND = ("SLURM_", "PL_", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "MASTER_",
               "TORCHELASTIC_", "DS_ACCELERATOR")  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(argv: list[str], folder: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`argv` in `folder` as a user's shell runs it: without the variables earlier in-process runs of this
    suite leave behind (a Lightning DDP run sets LOCAL_RANK, NODE_RANK, MASTER_*, PL_* in its process; with
    LOCAL_RANK set, a launched `vlp fit --trainer.devices 2` takes its ranks as started by someone else and
    waits for a rank 1 that never comes) or a Slurm job's, with a rendezvous port of its own; a hang fails
    with its output."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(LEFT_BEHIND)}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    try:
        return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as hung:
        output = (hung.stdout or b"")[-3000:], (hung.stderr or b"")[-3000:]
        pytest.fail(f"{shlex.join(argv)} ran past {timeout} s; its output ended:\n{output}")


def test_every_page_is_in_the_reading_order():
    pages = {str(page.relative_to(ROOT)) for page in [ROOT / "README.md", *(ROOT / "docs").glob("**/*.md")]}
    assert pages == set(PAGE_ORDER), (
        f"add new pages to PAGE_ORDER, drop removed ones: {pages ^ set(PAGE_ORDER)}"
    )


def test_every_command_is_run_or_says_what_it_needs():
    commands = documented_commands()
    assert len(commands) >= 30, [str(c) for c in commands]
    for command in commands:
        assert "..." not in command.text and "[" not in command.text, f"not typeable: {command}"
        if command.needs is None and command.text not in NOT_RUN:
            assert short_form(command)[1], command


def test_every_make_target_named_in_prose_runs_somewhere():
    prose = prose_make_targets()
    assert {"train", "test", "bench"} <= prose.keys(), prose
    fenced = {command.words[1] for command in documented_commands() if command.words[0] == "make"}
    for target, place in prose.items():
        assert target in fenced or target in PROSE_TARGETS_RUN_ELSEWHERE, (
            f"{place}: `make {target}` is run by no fenced command: show it in a fenced block or say in "
            "PROSE_TARGETS_RUN_ELSEWHERE what runs it"
        )


@pytest.mark.slow
def test_documented_commands_run_in_order(tmp_path):
    lay_out_user_files(tmp_path)
    ran = []
    for command in documented_commands():
        if command.text in NOT_RUN:
            continue
        argv, real = short_form(command)
        if not argv:
            continue
        result = run(argv, tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{command}\n{output[-4000:]}"
        trains = command.words[0] == "vlp" and command.words[1] in ("fit", "validate", "test")
        if real and trains and "--print_config" not in command.words:
            written = re.findall(r"metrics\.json: (\S+)", result.stdout)
            assert written and json.loads(Path(written[-1]).read_text()), (
                f"{command}: no scores\n{output[-2000:]}"
            )
        ran.append((command, real))
    assert sum(real for _, real in ran) >= 25
    # every strategy config ran with the default TensorBoard logger, and the pictures reached its event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for version in sorted((tmp_path / "runs" / "shapes-tiny").glob("version_*")):
        config = (version / "config.yaml").read_text()
        if "strategies.DeepSpeedStrategy" in config or "strategies.FSDP2Strategy" in config:
            events = EventAccumulator(str(version), size_guidance={"images": 0}).Reload()
            assert any(tag.startswith("val/") for tag in events.Tags()["images"]), version
