"""Start a run from a pre-training checkpoint: the backbone strictly, heads where they fit, the rest fresh.

Fine-tuning (retrieval, captioning, grounding, ...) starts from pre-trained weights but a fresh optimizer and
schedule. The backbone must fit exactly: a missing key or a shape that differs is an error that lists them,
since a silently re-initialised tower would train from scratch. Heads are matched by name and shape: those
the checkpoint has are loaded, new ones start fresh, and both lists are reported, as are the checkpoint's
keys that nothing uses (heads of objectives this run does not have). Momentum copies are not read: as in
ALBEF, a fine-tuning run's momentum model starts equal to the loaded model (`MomentumModel.sync`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from vlp.platform.run.export_state import consolidated_state_dict

STRICT_PREFIX = "backbone."
MOMENTUM_PREFIX = "backbone.momentum."


def checkpoint_state(path: str | Path, who: str, plain_ok: bool = False) -> dict[str, Tensor]:
    """The full model `state_dict` [name -> tensor] stored in a checkpoint file (Lightning) or folder (FSDP2
    torch distributed checkpoint, DeepSpeed); with `plain_ok` also a plain name -> tensor file (`vlp export`:
    .safetensors or torch.save). Files load with `weights_only` (they may come from elsewhere). `who` starts
    the error messages (the command or argument that read the path)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{who}: no such checkpoint: {path}")
    if path.is_file():
        if plain_ok and path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(stored, dict) and "state_dict" in stored:
            return stored["state_dict"]
        if (
            plain_ok
            and isinstance(stored, dict)
            and stored
            and all(isinstance(v, Tensor) for v in stored.values())
        ):
            return stored
        kind = (
            "holds neither a Lightning checkpoint nor a name -> tensor dict"
            if plain_ok
            else "is not a Lightning checkpoint"
        )
        raise ValueError(f"{who}: {path} {kind} (no 'state_dict' entry)")
    if (path / "latest").is_file():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path))
        return {key.removeprefix("_forward_module."): value for key, value in state.items()}
    if any(path.glob("*.distcp")):
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(path)["state_dict"]
    raise ValueError(
        f"{who}: {path} is a folder but neither a torch distributed checkpoint (*.distcp) "
        "nor a DeepSpeed checkpoint (a 'latest' file)"
    )


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The consolidated weights (each tensor once, under the plain model's names) of any vlp checkpoint or
    `vlp export` file, for `init_from`."""
    return consolidated_state_dict(checkpoint_state(path, "init_from", plain_ok=True))


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


def resample_position_embeddings(state: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ViT position table [1, P + g*g, D] of another image size resampled (bicubic, as timm does) to the
    target's grid, the P prefix ([CLS]) rows kept: fine-tuning at a higher resolution than pre-training."""
    from timm.layers import resample_abs_pos_embed

    out = dict(state)
    for key, value in state.items():
        want = target.get(key)
        if not key.endswith("pos_embed") or want is None or want.shape == value.shape or value.ndim != 3:
            continue
        for prefix in (1, 0, 2, 4):
            old, new = math.isqrt(value.shape[1] - prefix), math.isqrt(want.shape[1] - prefix)
            if old * old == value.shape[1] - prefix and new * new == want.shape[1] - prefix:
                out[key] = resample_abs_pos_embed(value, [new, new], [old, old], num_prefix_tokens=prefix)
                break
    return out


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
    state = resample_position_embeddings(state, target)
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
    report.unused = sorted(k for k in state if k not in everything and ".momentum." not in k)
    module.load_state_dict(loaded, strict=False)
    return report
