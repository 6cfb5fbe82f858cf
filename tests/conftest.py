"""Shared fixtures: a tiny tokenizer, backbone and batch, so tests run in seconds on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlp.datamodules.shapes import ShapesSource
from vlp.platform.model.backbone import FusionBackbone
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig

TINY_CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"


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
