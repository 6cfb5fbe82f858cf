"""Start a run from a pre-training checkpoint: the backbone strictly, heads where they fit, the rest fresh.

Fine-tuning (retrieval, captioning, grounding, ...) starts from pre-trained weights but a fresh optimizer and
schedule. The backbone must fit exactly: a missing key or a shape that differs is an error that lists them,
since a silently re-initialised tower would train from scratch. Heads are matched by name and shape: those
the checkpoint has are loaded, new ones start fresh, and both lists are reported, as are the checkpoint's
keys that nothing uses (heads of objectives this run does not have). Momentum copies are not read: as in
ALBEF, a fine-tuning run's momentum model starts equal to the loaded model (`MomentumModel.sync`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

STRICT_PREFIX = "backbone."
MOMENTUM_PREFIX = "backbone.momentum."


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """name -> tensor from a Lightning checkpoint (its `state_dict`), a `vlp export` file (.safetensors or
    torch.save of a plain dict); always with `weights_only` loading (the file may come from elsewhere)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    stored = torch.load(path, map_location="cpu", weights_only=True)
    state = stored.get("state_dict", stored) if isinstance(stored, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"init_from: {path} holds neither a Lightning checkpoint nor a name -> tensor dict")
    return state


def is_backbone_alias(key: str, state: dict[str, Tensor]) -> bool:
    """`objectives.x.backbone.rest` names the tensor `backbone.rest` already holds."""
    _, found, rest = key.partition(".backbone.")
    return bool(found) and not key.startswith(STRICT_PREFIX) and STRICT_PREFIX + rest in state


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(
        default_factory=list
    )  # this module's keys the checkpoint had no fitting value for
    unused: list[str] = field(default_factory=list)  # checkpoint keys this module has no use for

    def summary(self, path: str | Path) -> str:
        def short(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")

        lines = [f"init_from {path}: {len(self.loaded)} tensors loaded"]
        if self.fresh:
            lines.append(f"  fresh (not in the checkpoint or another shape): {short(self.fresh)}")
        if self.unused:
            lines.append(f"  unused from the checkpoint: {short(self.unused)}")
        return "\n".join(lines)


def load_pretrained(
    module: nn.Module, state: dict[str, Tensor], path: str | Path = "checkpoint"
) -> LoadReport:
    """Load `state` into `module`: every `backbone.*` key strictly (error listing what does not fit), the
    rest where name and shape match; momentum copies are left to the caller's `sync`."""
    everything = module.state_dict(keep_vars=True)
    strict_ids = {id(v) for k, v in everything.items() if k.startswith(STRICT_PREFIX)}
    # objectives hold the shared backbone too (`objectives.itm.backbone.*`): the same tensors, loaded once
    target = {
        k: v.detach()
        for k, v in everything.items()
        if not k.startswith(MOMENTUM_PREFIX) and (k.startswith(STRICT_PREFIX) or id(v) not in strict_ids)
    }
    strict = [k for k in target if k.startswith(STRICT_PREFIX)]
    missing = [k for k in strict if k not in state]
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(target[k].shape)}"
        for k in strict
        if k in state and state[k].shape != target[k].shape
    ]
    if missing or mismatched:
        raise ValueError(
            f"init_from {path}: the backbone does not fit this model. "
            f"Missing ({len(missing)}): {missing[:20]}; other shapes ({len(mismatched)}): {mismatched[:20]}"
        )
    report = LoadReport()
    loaded = {}
    for key, value in target.items():
        if key in state and state[key].shape == value.shape:
            loaded[key] = state[key].to(value.dtype)
            report.loaded.append(key)
        else:
            report.fresh.append(key)
    report.unused = sorted(
        k for k in state if k not in everything and ".momentum." not in k and not is_backbone_alias(k, state)
    )
    module.load_state_dict(loaded, strict=False)
    return report
