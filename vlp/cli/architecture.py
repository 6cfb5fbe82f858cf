"""Build the backbone a run starts from or evaluates out of that checkpoint's stored architecture.

`--model.init_args.init_from CKPT` (fine-tuning, zero-shot) and `vlp validate | test | predict --ckpt_path
CKPT` read the architecture the checkpoint carries (`vlp.platform.model.architecture`), so a config names
only objectives, data and schedule. A backbone the config gives is merged over it: values left at their
defaults come from the checkpoint, values that may change (image size, dropout, merging, ...) are applied
and printed, contradictions are an error naming both values.
"""

from __future__ import annotations

import inspect
from typing import Any

from jsonargparse import Namespace, dict_to_namespace
from lightning.pytorch.utilities import rank_zero_info

from vlp.platform.model.architecture import (
    as_plain_data,
    backbone_class_path,
    read_architecture,
    resolve_architecture,
)
from vlp.platform.model.backbone import FusionBackbone


def default_architecture() -> dict[str, Any]:
    """FusionBackbone's settings when a config gives none (its signature's defaults, configs expanded)."""
    from vlp.platform.model.encoders import TextConfig, VisionConfig
    from vlp.platform.model.fusion import FusionConfig

    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(FusionBackbone.__init__).parameters.items()
        if name not in ("self", "tokenizer")
    }
    defaults.update(vision=VisionConfig(), text=TextConfig(), fusion=FusionConfig())
    return as_plain_data(defaults)


def backbone_from_checkpoint(config: Namespace, subcommand: str | None) -> None:
    """Set `model.init_args.backbone` in the parsed `config` from the checkpoint the run starts from:
    `init_from`, or for validate / test / predict `ckpt_path` (a resumed `fit` keeps its config's model)."""
    model = config.get("model")
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    if init_args is None or "backbone" not in init_args:
        return
    source = init_args.get("init_from")
    if source is None and subcommand in ("validate", "test", "predict"):
        source = config.get("ckpt_path") if config.get("ckpt_path") not in (None, "last") else None
    if source is None:
        if init_args.get("backbone") is None:
            raise ValueError(
                "model.init_args.backbone is not set: give --model.init_args.init_from CKPT (or, for validate, "
                "test and predict, --ckpt_path CKPT) to build it from a checkpoint's architecture, or a backbone"
            )
        return
    stored = read_architecture(source)
    configured = init_args.get("backbone")
    if stored is None:
        if configured is None:
            raise ValueError(
                f"{source} stores no architecture (written before vlp kept it): give the backbone in the config"
            )
        return
    given = None
    if configured is not None:
        given = as_plain_data(configured.get("init_args"))
        given.pop("tokenizer", None)
    defaults = default_architecture()
    if given is not None:  # a section left out (None) is the default section, not a setting
        given = {key: defaults[key] if value is None and isinstance(defaults.get(key), dict) else value
                 for key, value in given.items()}  # fmt: skip
    settings, changes = resolve_architecture(stored, given, defaults, str(source))
    if changes:
        rank_zero_info(f"backbone of {source}, with this config's changes: {'; '.join(changes)}")
    class_path = backbone_class_path(settings.pop("layout", None), str(source))
    settings = dict_to_namespace({**settings, "tokenizer": None})  # the tokenizer: linked from the data
    init_args.backbone = Namespace(class_path=class_path, init_args=settings)
