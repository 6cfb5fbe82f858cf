"""Shared fixtures: a tiny tokenizer, backbone and batch, so tests run in seconds on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vlp.datamodules.shapes import ShapesSource
from vlp.platform.model.backbone import FusionBackbone
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig

TINY_CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"

# Under pytest-xdist (`make test`: each file whole on one worker, files handed out in collection order)
# these files, the longest, start first, so that none starts last while the other worker idles.
LONGEST_FILES = (  # longest first, from `make test`'s durations on 2 cores (2026-12-04)
    "tests/test_documented_commands.py",
    "tests/distributed/test_strategies_cli.py",
    "tests/distributed/test_momentum_sharded.py",
    "tests/cli/test_bootstrap.py",
    "tests/cli/test_slurm_cluster.py",
    "tests/test_learning.py",
    "tests/cli/test_cli.py",
    "tests/test_benchmarks.py",
    "tests/datamodules/test_streaming.py",
    "tests/cli/test_lifecycle.py",
    "tests/platform/model/test_encoders_learning.py",
    "tests/distributed/test_bad_input_ddp.py",
    "tests/cli/test_data.py",
    "tests/distributed/test_blip_strategies.py",
    "tests/platform/model/test_blip_lavis.py",
    "tests/platform/losses/test_sigmoid_loss.py",
    "tests/tasks/test_siglip_learning.py",
    "tests/distributed/test_global_batch.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # one process: the usual order
        return
    first = {path: index for index, path in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(item.nodeid.split("::")[0], len(first)))


def _restore(saved: dict[str, str]) -> None:
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True, scope="module")
def _module_environment():
    """Gives back after each test file the environment it started with (module fixtures included)."""
    saved = dict(os.environ)
    yield
    _restore(saved)


@pytest.fixture(autouse=True)
def _test_environment():
    """Gives back after each test the environment it started with.

    Lightning's launcher sets LOCAL_RANK, NODE_RANK, MASTER_ADDR and MASTER_PORT in `os.environ` for good
    when an in-process Trainer runs a DDP-family strategy, even on one device. A later `vlp fit
    --trainer.devices=2` subprocess that inherits LOCAL_RANK takes itself for a launched rank, starts no
    second rank and waits for it until the test's timeout.
    """
    saved = dict(os.environ)
    yield
    _restore(saved)


@pytest.fixture(scope="session")
def shapes() -> ShapesSource:
    return ShapesSource(image_size=32, num_train=96, num_val=16, num_test=16, batch_size=8)


def tiny_backbone(tokenizer, **kwargs) -> FusionBackbone:
    torch.manual_seed(0)
    config = {
        "vision": VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2),
        "text": TextConfig(width=32, depth=1, heads=2, max_len=48),
        "fusion": FusionConfig(depth=1, heads=2),
        "embed_dim": 16,
    }
    return FusionBackbone(tokenizer=tokenizer, **{**config, **kwargs})


@pytest.fixture
def backbone(shapes: ShapesSource) -> FusionBackbone:
    return tiny_backbone(shapes.tokenizer)


@pytest.fixture
def batch(shapes: ShapesSource) -> dict:
    dataset = shapes.dataset("train")
    return shapes.collate([dataset[i] for i in range(8)])


@pytest.fixture
def make_backbone(shapes: ShapesSource):
    """Factory for extra tiny backbones (e.g. with merging or a decoder switched on)."""
    return lambda **kwargs: tiny_backbone(shapes.tokenizer, **kwargs)


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core machine two threads thrash (10x+)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
