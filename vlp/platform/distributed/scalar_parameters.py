"""0-d parameters stored as [1]: FSDP2 shards only tensors with a dimension, DeepSpeed broadcasts
parameters viewed as bytes. `vlp.platform.run.export_state.consolidated_state_dict` maps them back."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize


class ScalarAsVector(nn.Module):
    """Parametrization: a 0-d parameter stored as shape [1] (fully_shard shards only tensors with a dim)."""

    def forward(self, stored: Tensor) -> Tensor:
        return stored.reshape(())

    def right_inverse(self, value: Tensor) -> Tensor:
        return value.reshape(1)


def store_scalars_as_vectors(module: nn.Module) -> None:
    """Store every 0-d parameter (the CLIP temperature) as [1]; reading it still gives a 0-d tensor.

    Its state-dict key becomes `<owner>.parametrizations.<name>.original`; `consolidated_state_dict`
    maps it back, so exported weights load into the plain model.
    """
    for owner in list(module.modules()):
        for name, param in list(owner.named_parameters(recurse=False)):
            if param.ndim == 0:
                parametrize.register_parametrization(owner, name, ScalarAsVector())
