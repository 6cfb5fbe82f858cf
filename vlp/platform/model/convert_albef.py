"""The published ALBEF checkpoints mapped onto vlp's names: backbone, heads, momentum model and queues.

ALBEF (Li et al. 2021) = a ViT-B/16 (timm's names) + BERT-base whose layers 0..k-1 are the text tower and
k..n-1 the fusion layers (post-norm BERT layers with cross-attention), ITC projections, an ITM head, BERT's
MLM head tied to the word embeddings, a clamped temperature `temp`, momentum copies (`*_m`) and feature
queues. The release files (`ALBEF.pth`, `ALBEF_4M.pth`: {"model": state_dict}) and LAVIS's (pre-trained and
fine-tuned retrieval: `text_encoder.*` without `bert.`, plus `idx_queue`) hold those keys; `convert_albef`
renames them into a vlp `MultiTaskModule` state dict for a backbone built with `fusion.norm: post`,
`fusion.layer_norm_eps: 1e-12`, `fusion.depth: n - k`, `text.depth: k` and objectives named `itc`, `itm`,
`mlm`:

- `visual_encoder.*` -> `backbone.vision.vit.*` (same names); `pos_embed` resampled to `image_size` as
  ALBEF does for fine-tuning (bicubic over the patch grid, [CLS] row kept);
- text layers -> `backbone.text.bert.*`; position rows cut to `max_len`; the token-type row vlp's BERT has
  and ALBEF's has not is zero (adds nothing);
- fusion layers -> `backbone.fusion.layers.{i - k}.*`: separate key and value projections become the
  one `key_value` projection ([keys; values] rows, the same product);
- `vision_proj`, `text_proj`; `temp` -> `backbone.temp` (`temperature: clamped`) or `log_logit_scale`;
- `itm_head` -> `objectives.itm.head`; `text_encoder.cls.predictions` -> `objectives.mlm.head` (its decoder
  must be the word embeddings, as vlp ties them);
- `*_m` -> `backbone.momentum.backbone.*` and `backbone.momentum.heads.mlm.*`;
- `image_queue`, `text_queue` [E, Q], `queue_ptr` (`idx_queue`) -> `objectives.itc.queue.*` [Q, E] (ids
  -1 where ALBEF keeps none: never a batch's image id).

A key that fits none of these, or a vocabulary other than `vocab_size`, is an error listing them.

To continue pre-training exactly, load the whole converted state (momentum copies and queue included) and
call `backbone.momentum.update()` once: ALBEF moves its momentum model at the start of each forward, vlp
after each optimizer step, so a checkpoint saved between two ALBEF steps still owes that one update. vlp's
BERT has a token-type table ALBEF has not (its row 0, zero here, is added to every token): build the text
tower with `token_types: false` to keep it zero and frozen.

`albef_architecture` reads the backbone's settings off the converted tensors (sizes, depths, the 6 + 6
split, image size, text positions), so the converted file carries them as every vlp checkpoint does
(`vlp.platform.model.architecture`) and `init_from` builds the backbone without a config describing it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.platform.model.architecture import as_plain_data
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig, fusion_state_of_bert_layer
from vlp.platform.model.momentum import MomentumConfig

# the parameters of a ViT (timm's and ALBEF's names) and of a BERT text layer: anything else fits nothing
VIT_KEY = re.compile(
    r"(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias))"
)
TEXT_LAYER_KEY = re.compile(
    r"(attention\.self\.(query|key|value)|attention\.output\.(dense|LayerNorm)|intermediate\.dense"
    r"|output\.(dense|LayerNorm))\.(weight|bias)"
)
FUSION_LAYER_KEY = re.compile(
    r"crossattention\.(self\.(query|key|value)|output\.(dense|LayerNorm))\.(weight|bias)|"
    + TEXT_LAYER_KEY.pattern
)
MLM_NAMES = {"transform.dense": "transform.0", "transform.LayerNorm": "transform.2"}


def official_state(stored: Mapping) -> dict[str, Tensor]:
    """The state dict inside a release file: its `model` entry, else the file itself."""
    state = stored.get("model", stored) if isinstance(stored, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError("not an ALBEF checkpoint: expected a name -> tensor dict (or one under 'model')")
    return dict(state)


def resample_positions(pos_embed: Tensor, image_size: int, patch_size: int) -> Tensor:
    """ViT position table [1, 1 + G*G, D] -> [1, 1 + g*g, D] for g = image_size / patch_size: the [CLS] row
    kept, the grid resized bicubically (ALBEF's / LAVIS's `interpolate_pos_embed`)."""
    grid = int(math.isqrt(pos_embed.shape[1] - 1))
    new = image_size // patch_size
    if grid * grid != pos_embed.shape[1] - 1:
        raise ValueError(
            f"visual_encoder.pos_embed has {pos_embed.shape[1] - 1} patch rows, not a square grid"
        )
    if new == grid:
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    patches = patches.reshape(1, grid, grid, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(new, new), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([cls, patches], dim=1)


class _Reader:
    """The official state with the keys read so far, so the leftovers can be listed."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        self.state, self.read = state, set()

    def __call__(self, key: str) -> Tensor:
        if key not in self.state:
            raise ValueError(f"ALBEF checkpoint lacks {key}")
        self.read.add(key)
        return self.state[key]

    def has(self, key: str) -> bool:
        return key in self.state

    def with_prefix(self, prefix: str) -> list[str]:
        return sorted(k for k in self.state if k.startswith(prefix))


def _text_prefix(reader: _Reader, encoder: str) -> str:
    """`text_encoder.bert.` (pre-training, BertForMaskedLM) or `text_encoder.` (fine-tuned, BertModel)."""
    return f"{encoder}.bert." if reader.with_prefix(f"{encoder}.bert.") else f"{encoder}."


def vit_tensors(reader: _Reader, vision: str, out: str, image_size: int | None) -> dict[str, Tensor]:
    """The ViT under `vision` (LAVIS's / the releases' names are timm's) as `{out}vision.vit.*`, its position
    table resampled to `image_size` when given; keys that are not the ViT's are left unread."""
    mapped = {
        f"{out}vision.vit.{key[len(vision) :]}": reader(key)
        for key in reader.with_prefix(vision)
        if VIT_KEY.fullmatch(key[len(vision) :])
    }
    if image_size is not None:
        patch = reader(f"{vision}patch_embed.proj.weight").shape[-1]
        key = f"{out}vision.vit.pos_embed"
        mapped[key] = resample_positions(mapped[key], image_size, patch)
    return mapped


def bert_embedding_tensors(
    reader: _Reader, embeddings: str, out: str, max_len: int | None
) -> dict[str, Tensor]:
    """BERT's embeddings under `embeddings` as vlp's under `out`: the first `max_len` positions, and a zero
    token-type table (ALBEF and BLIP use no token types); the stored `position_ids` buffer is read and dropped."""
    mapped = {out + name: reader(embeddings + name)
              for name in ("word_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")}  # fmt: skip
    positions = reader(f"{embeddings}position_embeddings.weight")
    if max_len is not None:
        if max_len > len(positions):
            raise ValueError(f"max_len={max_len} exceeds the checkpoint's {len(positions)} text positions")
        positions = positions[:max_len]
    mapped[f"{out}position_embeddings.weight"] = positions
    word = mapped[f"{out}word_embeddings.weight"]
    mapped[f"{out}token_type_embeddings.weight"] = word.new_zeros(2, word.shape[1])
    if reader.has(f"{embeddings}position_ids"):
        reader(f"{embeddings}position_ids")  # a buffer of 0..P-1, rebuilt by vlp's BERT
    return mapped


def _towers(
    reader: _Reader, suffix: str, out: str, image_size: int | None, max_len: int | None, temperature: str
) -> dict[str, Tensor]:
    """One model's (online: suffix "", momentum: "_m") backbone tensors under the vlp prefix `out`."""
    mapped = vit_tensors(reader, f"visual_encoder{suffix}.", out, image_size)

    text = _text_prefix(reader, f"text_encoder{suffix}")
    layers = sorted(
        {
            int(m.group(1))
            for k in reader.state
            if (m := re.match(rf"{re.escape(text)}encoder\.layer\.(\d+)\.", k))
        }
    )
    fusion_start = min(
        (i for i in layers if reader.has(f"{text}encoder.layer.{i}.crossattention.self.query.weight")),
        default=None,
    )
    if fusion_start is None:
        raise ValueError(f"ALBEF checkpoint: no {text}encoder.layer.*.crossattention (no fusion layers)")
    bert = f"{out}text.bert."
    mapped |= bert_embedding_tensors(reader, f"{text}embeddings.", f"{bert}embeddings.", max_len)
    for i in layers:
        source = f"{text}encoder.layer.{i}."
        if i < fusion_start:
            for key in reader.with_prefix(source):
                if not TEXT_LAYER_KEY.fullmatch(key[len(source) :]):
                    continue  # left unread: listed in the error
                mapped[f"{bert}encoder.layer.{i}.{key[len(source) :]}"] = reader(key)
            continue
        target = f"{out}fusion.layers.{i - fusion_start}."
        names = [k[len(source) :] for k in reader.with_prefix(source)]
        bert_layer = {name: reader(source + name) for name in names if FUSION_LAYER_KEY.fullmatch(name)}
        fusion_layer = fusion_state_of_bert_layer(bert_layer)
        if len(fusion_layer) != 22:  # 9 weight + bias pairs, 2 stacked key-value pairs
            raise ValueError(f"ALBEF checkpoint: fusion layer {source} is incomplete ({sorted(bert_layer)})")
        for name, value in fusion_layer.items():
            mapped[target + name] = value
    for proj in ("vision_proj", "text_proj"):
        for kind in ("weight", "bias"):
            mapped[f"{out}{proj}.{kind}"] = reader(f"{proj}{suffix}.{kind}")
    temp = reader("temp").reshape(())
    if temperature == "clamped":
        mapped[f"{out}temp"] = temp.clone()
    else:
        mapped[f"{out}log_logit_scale"] = (1.0 / temp).log()
    return mapped


def _mlm_head(reader: _Reader, encoder: str, out: str, word_embeddings: Tensor) -> dict[str, Tensor]:
    prefix = f"{encoder}.cls.predictions."
    if not reader.with_prefix(prefix):
        return {}
    mapped = {f"{out}bias": reader(f"{prefix}bias")}
    for name, new in MLM_NAMES.items():
        for kind in ("weight", "bias"):
            mapped[f"{out}{new}.{kind}"] = reader(f"{prefix}{name}.{kind}")
    if reader.has(f"{prefix}decoder.weight") and not torch.equal(
        reader(f"{prefix}decoder.weight"), word_embeddings
    ):
        raise ValueError(f"{prefix}decoder.weight differs from the word embeddings: vlp ties them")
    if reader.has(f"{prefix}decoder.bias") and not torch.equal(
        reader(f"{prefix}decoder.bias"), mapped[f"{out}bias"]
    ):
        raise ValueError(f"{prefix}decoder.bias differs from {prefix}bias: BERT shares them")
    return mapped


def convert_albef(
    official: Mapping,
    image_size: int | None = None,
    max_len: int | None = None,
    vocab_size: int | None = None,
    temperature: str = "clamped",
    momentum: bool = True,
) -> dict[str, Tensor]:
    """An ALBEF release / LAVIS state dict (or file dict with `model`) -> vlp `MultiTaskModule` names.

    `image_size`: resample the position table to it (e.g. 384 for fine-tuning; None keeps the
    checkpoint's); `max_len`: the text positions to keep (`text.max_len`); `vocab_size`: the tokenizer's
    length, checked against the word-embedding rows; `temperature`: the backbone's parametrisation;
    `momentum`: also map the `*_m` copies and the queues (None of them in the checkpoint maps nothing).
    """
    reader = _Reader(official_state(official))
    mapped = _towers(reader, "", "backbone.", image_size, max_len, temperature)
    word = mapped["backbone.text.bert.embeddings.word_embeddings.weight"]
    if vocab_size is not None and len(word) != vocab_size:
        raise ValueError(
            f"the checkpoint's vocabulary has {len(word)} rows, the tokenizer {vocab_size} tokens: "
            "use the tokenizer ALBEF was trained with (bert-base-uncased, 30522)"
        )
    for kind in ("weight", "bias"):
        mapped[f"objectives.itm.head.{kind}"] = reader(f"itm_head.{kind}")
    mapped.update(_mlm_head(reader, "text_encoder", "objectives.mlm.head.", word))
    if momentum and reader.with_prefix("visual_encoder_m."):
        mapped.update(_towers(reader, "_m", "backbone.momentum.backbone.", image_size, max_len, temperature))
        word_m = mapped["backbone.momentum.backbone.text.bert.embeddings.word_embeddings.weight"]
        mapped.update(_mlm_head(reader, "text_encoder_m", "backbone.momentum.heads.mlm.", word_m))
    if momentum and reader.has("image_queue"):
        image_queue, text_queue = reader("image_queue").T.contiguous(), reader("text_queue").T.contiguous()
        size = len(image_queue)
        ids = reader("idx_queue").reshape(-1).long() if reader.has("idx_queue") else None
        if ids is None:
            ids = torch.full((size,), -1, dtype=torch.long)
        mapped.update(
            {
                "objectives.itc.queue.image": image_queue,
                "objectives.itc.queue.text": text_queue,
                "objectives.itc.queue.ids": ids,
                "objectives.itc.queue.pointer": reader("queue_ptr").reshape(()).long(),
                "objectives.itc.queue.filled": torch.tensor(size),
            }
        )
    left = sorted(k for k in reader.state if k not in reader.read)
    if not momentum:
        left = [
            k for k in left if not re.match(r"(\w+_m\.|\w+_m$|image_queue|text_queue|queue_ptr|idx_queue)", k)
        ]
    if left:
        raise ValueError(f"ALBEF checkpoint keys that fit nothing in vlp ({len(left)}): {left[:40]}")
    return mapped


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    """How many distinct indices `(\\d+)` in `pattern` the keys of `state` hold."""
    return len({m.group(1) for k in state if (m := re.fullmatch(pattern, k))})


def attention_heads(given: int | None, width: int, flag: str) -> int:
    """Attention heads, which weights do not show: `given`, else width / 64 (ViT-B/16's and BERT-base's)."""
    if given is not None:
        return given
    if width % 64:
        raise ValueError(f"width {width} is not a multiple of 64: give the attention heads ({flag})")
    return width // 64


def vision_config_of(converted: Mapping[str, Tensor], vision_heads: int | None = None) -> VisionConfig:
    """The ViT of a converted state (`backbone.vision.vit.*`): width, patch, image size (patch x the position
    grid), depth and MLP ratio read off the tensors, [CLS] pooling; a ViT-B/16 is named as timm names it
    (`vit_base_patch16_224`), as ALBEF's and BLIP's configs do."""
    patch = converted["backbone.vision.vit.patch_embed.proj.weight"]  # [D, 3, P, P]
    width, patch_size = patch.shape[0], patch.shape[-1]
    grid = math.isqrt(converted["backbone.vision.vit.pos_embed"].shape[1] - 1)
    depth = _count(converted, r"backbone\.vision\.vit\.blocks\.(\d+)\..*")
    heads = attention_heads(vision_heads, width, "--vision-heads")
    mlp_ratio = converted["backbone.vision.vit.blocks.0.mlp.fc1.weight"].shape[0] / width
    vit_b16 = (patch_size, width, depth, heads, mlp_ratio) == (16, 768, 12, 12, 4.0)
    return VisionConfig(
        model="vit_base_patch16_224" if vit_b16 else None,
        image_size=grid * patch_size,
        patch_size=patch_size,
        width=width,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
        pool="cls",
    )


def albef_architecture(
    converted: Mapping[str, Tensor],
    vision_heads: int | None = None,
    text_heads: int | None = None,
    temperature: str = "clamped",
) -> dict:
    """The `FusionBackbone` settings (`vlp_architecture`) of a `convert_albef` state: widths, depths, MLP
    ratios, image size (patch size x the position grid), text positions and embedding size read off the
    tensors; what tensors do not show is ALBEF's: post-norm BERT fusion layers (eps 1e-12) without
    token types, [CLS] pooling, BERT's dropout 0.1 (`config_bert.json`), momentum decay 0.995 when the
    momentum copies are there, the temperature's start 0.07 and clamp range [0.001, 0.5]. Attention heads
    are not in the weights: `vision_heads` / `text_heads` (the text tower's and the fusion layers'), by
    default width / 64 as in ViT-B/16 and BERT-base. A ViT-B/16 is named as timm names it
    (`vit_base_patch16_224`, at the checkpoint's image size), as ALBEF's configs do."""

    word = converted["backbone.text.bert.embeddings.word_embeddings.weight"]  # [V, W]
    width = word.shape[1]
    text_heads = attention_heads(text_heads, width, "--text-heads")
    intermediate = converted["backbone.text.bert.encoder.layer.0.intermediate.dense.weight"].shape[0]
    fusion_mlp = converted["backbone.fusion.layers.0.mlp.0.weight"].shape[0]
    momentum = "backbone.momentum.backbone.vision_proj.weight" in converted
    return as_plain_data(
        {
            "vision": vision_config_of(converted, vision_heads),
            "text": TextConfig(
                width=width,
                depth=_count(converted, r"backbone\.text\.bert\.encoder\.layer\.(\d+)\..*"),
                heads=text_heads,
                max_len=converted["backbone.text.bert.embeddings.position_embeddings.weight"].shape[0],
                mlp_ratio=intermediate / width,
                dropout=0.1,
                pool="cls",
                token_types=False,
            ),
            "fusion": FusionConfig(
                depth=_count(converted, r"backbone\.fusion\.layers\.(\d+)\..*"),
                heads=text_heads,
                mlp_ratio=fusion_mlp / width,
                dropout=0.1,
                norm="post",
                layer_norm_eps=1e-12,
            ),
            "embed_dim": converted["backbone.vision_proj.weight"].shape[0],
            "init_temperature": 0.07,
            "max_logit_scale": 100.0,
            "caption_decoder": False,
            "merging": None,
            "momentum": MomentumConfig(0.995) if momentum else None,
            "temperature": temperature,
            "temperature_range": (0.001, 0.5),
            "init_logit_bias": None,  # ALBEF scores pairs by InfoNCE: no SigLIP bias
        }
    )
