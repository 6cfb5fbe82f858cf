"""The shared MLP head keeps the parameter names the task heads had, so earlier checkpoints still load."""

import torch
from torch import nn

from vlp.platform.model.heads import MLPHead
from vlp.tasks.grounding import BoxHead

KEYS = {f"mlp.{i}.{name}" for i in (0, 1, 3) for name in ("weight", "bias")}


def test_answer_and_box_heads_keep_their_state_dict_keys_and_load_a_plain_mlps_weights():
    torch.manual_seed(0)
    width, answers = 8, 5
    for head, out in ((MLPHead(width, answers), answers), (BoxHead(width), 4)):
        assert set(head.state_dict()) == KEYS
        earlier = nn.Sequential(
            nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, out)
        )
        head.load_state_dict(
            {f"mlp.{key}": value for key, value in earlier.state_dict().items()}, strict=True
        )
        x = torch.randn(3, width)
        if isinstance(head, BoxHead):
            position, size = earlier(x).sigmoid().split(2, dim=-1)
            torch.testing.assert_close(head(x), torch.cat([size / 2 + (1 - size) * position, size], dim=-1))
        else:
            torch.testing.assert_close(head(x), earlier(x))
