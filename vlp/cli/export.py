"""`vlp export CKPT OUT`: one consolidated weights file from any vlp checkpoint, for evaluation and
fine-tuning elsewhere.

CKPT is a Lightning checkpoint file (single device, DDP, FSDP2 with `save_distributed_checkpoint: false`),
an FSDP2 sharded checkpoint folder (torch distributed checkpoint) or a DeepSpeed checkpoint folder. OUT
ending in `.safetensors` is written with safetensors (the backbone's architecture in its metadata), anything
else with `torch.save` of `{"state_dict": name -> tensor, "vlp_architecture": ...}`; both load with
`weights_only` (`safetensors.torch.load_file`, `torch.load(..., weights_only=True)["state_dict"]`) into the
plain LightningModule (`load_state_dict`, strict, shared backbone copies filled in by the module itself), and
`init_from` rebuilds the backbone from the architecture they carry. Runs on one CPU process; no process group needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from vlp.platform.model.architecture import ARCHITECTURE_KEY, read_architecture
from vlp.platform.model.pretrained import checkpoint_state
from vlp.platform.run.export_state import consolidated_state_dict


def export(checkpoint: Path, out: Path) -> dict[str, Tensor]:
    """Write the consolidated weights of `checkpoint` and its architecture to `out`; returns the weights."""
    state = consolidated_state_dict(checkpoint_state(checkpoint, "vlp export"))
    architecture = read_architecture(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"format": "pt", "source": str(checkpoint)}
        if architecture is not None:
            metadata[ARCHITECTURE_KEY] = json.dumps(architecture)
        save_file(state, str(out), metadata=metadata)
    elif architecture is not None:
        torch.save({"state_dict": state, ARCHITECTURE_KEY: architecture}, out)
    else:
        torch.save(state, out)
    return state


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlp export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint file or folder (FSDP2, DeepSpeed)")
    parser.add_argument("out", type=Path, help="output file: .safetensors, else torch.save format")
    args = parser.parse_args(argv)
    state = export(args.checkpoint, args.out)
    numel = sum(t.numel() for t in state.values())
    print(f"{args.out}: {len(state)} tensors, {numel / 1e6:.2f} M values")
    return 0
