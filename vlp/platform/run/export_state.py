"""A trained module's state dict as the plain model's, for `vlp export` and for loading any checkpoint."""

from __future__ import annotations

from torch import Tensor


def consolidated_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's full `state_dict` as the plain model's: each tensor once, under its plain name.

    Objectives hold the shared backbone, so the module's state dict lists it again under
    `objectives.<name>.backbone.`; those copies are dropped. Scalars that FSDP2 / DeepSpeed stored as [1]
    (`<owner>.parametrizations.<name>.original`) get their own name and shape back. Tensors come back
    contiguous, on the CPU, and never sharing memory (safetensors refuses shared tensors).
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if ".parametrizations." in key and key.endswith(".original"):
            owner, name = key[: -len(".original")].split(".parametrizations.")
            key, value = f"{owner}.{name}", value.reshape(())
        out[key] = value
    shared = set()
    for key in out:
        parts = key.split(".", 2)  # objectives, <name>, backbone.<rest>
        if (
            parts[0] == "objectives"
            and len(parts) == 3
            and parts[2].startswith("backbone.")
            and parts[2] in out
        ):
            shared.add(key)
    return {key: value.detach().cpu().contiguous().clone() for key, value in out.items() if key not in shared}
