"""A backbone's architecture as plain data, kept in every checkpoint, so evaluation and fine-tuning build the
model from the checkpoint instead of a copy of its config.

`FusionBackbone.architecture` holds the constructor's settings (the tokenizer aside: the data links it) as a
JSON-able dict. Checkpoints carry it under `ARCHITECTURE_KEY`: Lightning files and DeepSpeed / FSDP2 folders
through `on_save_checkpoint`, `vlp export` files in their metadata. `resolve_architecture` merges a config's
backbone over a checkpoint's: a value left at its default comes from the checkpoint; one set otherwise must
agree with it, unless it is a setting that may change between runs (`MAY_DIFFER`: image size, whose position
embeddings are resampled on load, dropout, drop path, merging, the momentum model, the temperature's start,
where the start weights come from: `pretrained`, `fusion.init_from_text_layers`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

ARCHITECTURE_KEY = "vlp_architecture"

# settings a fine-tuning or evaluation run may set differently from its checkpoint (dotted paths)
MAY_DIFFER = (
    "vision.image_size",
    "vision.drop_path",
    "vision.pretrained",
    "text.dropout",
    "text.pretrained",
    "fusion.dropout",
    "fusion.init_from_text_layers",
    "merging",
    "momentum",
    "init_temperature",
    "max_logit_scale",
    "temperature_range",
)


# the class that rebuilds an architecture stored with a `layout` (absent: FusionBackbone)
LAYOUT_CLASSES = {"blip": "vlp.platform.model.blip.BlipBackbone"}
BACKBONE_CLASS = "vlp.platform.model.backbone.FusionBackbone"


def backbone_class_path(layout: str | None, source: str = "the architecture") -> str:
    """The import path of the backbone class that builds a stored architecture of `layout`."""
    if layout is None:
        return BACKBONE_CLASS
    if layout not in LAYOUT_CLASSES:
        raise ValueError(f"{source} stores an architecture of unknown layout {layout!r}")
    return LAYOUT_CLASSES[layout]


def as_plain_data(value: Any) -> Any:
    """Dataclasses and jsonargparse namespaces -> dicts, tuples -> lists, recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if hasattr(value, "as_dict") and callable(value.as_dict):  # jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: as_plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain_data(item) for item in value]
    return value


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"vision": {"width": 128}} -> {"vision.width": 128}; a path in MAY_DIFFER stays one leaf."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in MAY_DIFFER:
            out.update(_leaves(value, f"{path}."))
        else:
            out[path] = value
    return out


def _tree(leaves: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in leaves.items():
        *parents, last = path.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
    return tree


def resolve_architecture(
    stored: dict[str, Any], configured: dict[str, Any] | None, defaults: dict[str, Any], source: str
) -> tuple[dict[str, Any], list[str]]:
    """The backbone settings to build: `stored` (the checkpoint's) with the `configured` values that differ
    from `defaults` applied where `MAY_DIFFER` allows. Returns (settings, the changes applied as text).
    A configured value that contradicts the checkpoint elsewhere is an error naming both values."""
    if configured is None:
        return stored, []
    stored_leaves, default_leaves = _leaves(stored), _leaves(defaults)
    settings, changes, conflicts = dict(stored_leaves), [], []
    for path, value in _leaves(configured).items():
        if path in default_leaves and value == default_leaves[path]:
            continue  # left at its default: the checkpoint's value
        if path not in stored_leaves or stored_leaves[path] == value:
            settings[path] = value
        elif path in MAY_DIFFER:
            changes.append(f"{path}: {stored_leaves[path]!r} -> {value!r}")
            settings[path] = value
        else:
            conflicts.append(f"{path}: checkpoint {stored_leaves[path]!r}, config {value!r}")
    if conflicts:
        raise ValueError(
            f"the config's backbone contradicts the architecture stored in {source}: {'; '.join(conflicts)}. "
            "Drop these settings from the config (the checkpoint's are used) or start from another checkpoint"
        )
    return _tree(settings), changes


def read_architecture(path: str | Path) -> dict[str, Any] | None:
    """The architecture stored with a checkpoint: a Lightning file, a DeepSpeed or FSDP2 checkpoint folder,
    or a `vlp export` file; None when it holds none (written before architectures were stored)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as stored:
            text = (stored.metadata() or {}).get(ARCHITECTURE_KEY)
        return json.loads(text) if text else None
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return stored.get(ARCHITECTURE_KEY) if isinstance(stored, dict) else None
    if path.is_dir():
        for name in (
            "meta.pt",
            "checkpoint/mp_rank_00_model_states.pt",
        ):  # FSDP2, DeepSpeed (Lightning's tag)
            if (path / name).is_file():
                stored = torch.load(path / name, map_location="cpu", weights_only=True, mmap=True)
                return stored.get(ARCHITECTURE_KEY) if isinstance(stored, dict) else None
    return None
