"""Short data-path overrides: `--data.image_root X` sets `image_root` of every data source that takes it.

Data sources sit in a dict (`data.sources.<name>.init_args.<key>`), which makes their paths long to type;
the keys below are the ones a user changes per machine, so the CLI accepts them one level up.
"""

from __future__ import annotations

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

SOURCE_PATH_KEYS = (
    "train_annotations",
    "val_annotations",
    "test_annotations",
    "annotations",
    "image_root",
    "input_dir",
    "val_input_dir",
    "cache_dir",
    "train_questions",
    "val_questions",
    "test_questions",
    "answer_list",
)


def add_source_overrides(parser: LightningArgumentParser) -> None:
    for key in SOURCE_PATH_KEYS:
        parser.add_argument(
            f"--data.{key}",
            type=str | None,
            default=None,
            help=f"sets {key} of every data source that has it",
        )


def apply_source_overrides(config: Namespace) -> None:
    """Move each given `data.<key>` into the sources whose arguments have that key; one no source takes
    is an error naming the sources, so a typo never goes unnoticed."""
    data = config.data
    for key in SOURCE_PATH_KEYS:
        value = data.pop(key, None) if key in data else None
        if value is None:
            continue
        targets = [
            name
            for name, source in (data.sources or {}).items()
            if isinstance(source, Namespace) and key in (source.get("init_args") or Namespace())
        ]
        if not targets:
            raise ValueError(
                f"--data.{key}: no data source takes {key!r} (sources: {list(data.sources or {})})"
            )
        for name in targets:
            data.sources[name].init_args[key] = value
