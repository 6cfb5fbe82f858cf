"""The published BLIP checkpoints mapped onto `BlipBackbone`'s names: backbone, heads, momentum model, queues.

BLIP's release files (`model_base.pth`, `model_base_capfilt_large.pth`: pre-training; `model_base_caption_*`:
COCO captioning; `model_base_retrieval_{coco,flickr}.pth`: retrieval; each {"model": state_dict}) and LAVIS's
BLIP checkpoints share one key layout (LAVIS loads the release files directly), in three models:
- pre-training (`BlipPretrain`): `visual_encoder`, `text_encoder` (a BertModel whose layers carry
  cross-attention), `text_decoder` (`bert.*` tied to the encoder but for each layer's `attention.*`, and the
  LM head `cls.predictions.*`), `vision_proj`, `text_proj`, `itm_head`, `temp`, momentum copies `*_m`
  (vision, text encoder, projections), `image_queue`, `text_queue`, `queue_ptr`;
- captioning (`BlipCaption`): `visual_encoder` and `text_decoder` only;
- retrieval (`BlipRetrieval`): pre-training's without the decoder, plus `idx_queue` (`ptr_queue` in the
  BLIP repository's files).

Mapping (prefix `backbone.`): `visual_encoder.*` -> `vision.vit.*` (positions resampled to `image_size`);
the embeddings -> `text.bert.embeddings.*` (positions cut to `max_len`, a zero token-type table); encoder
layer i -> `fusion.layers.i.*` (key and value stacked into `key_value`, `convert_albef`'s rule); the
decoder's layer-i `attention.self.*` / `attention.output.dense` -> `decoder.self_attns.i.*`, its
`attention.output.LayerNorm` -> `decoder.self_norms.i`; `cls.predictions.transform.{dense, LayerNorm}` ->
`decoder.transform.{0, 2}`, `cls.predictions.bias` -> `decoder.bias` (its decoder must be the word
embeddings); the decoder's other tensors must equal the encoder's (BLIP ties them) or the conversion fails;
`itm_head` -> `objectives.itm.head`; `*_m` -> `backbone.momentum.backbone.*` (the momentum decoder's own
tensors: copies of the online decoder's, BLIP keeps no momentum decoder); queues -> `objectives.itc.queue.*`.

A captioning file has one self-attention per layer (the decoder's) and no projections or temperature: the
encoder's self-attention starts as a copy of the decoder's and the projections and temperature start fresh
(seeded), and `convert_blip` names them in its second result. Keys that fit nothing are an error listing them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from vlp.platform.model.architecture import as_plain_data
from vlp.platform.model.blip import LAYOUT
from vlp.platform.model.convert_albef import (
    FUSION_LAYER_KEY,
    _count,
    _Reader,
    attention_heads,
    bert_embedding_tensors,
    official_state,
    vision_config_of,
    vit_tensors,
)
from vlp.platform.model.encoders import TextConfig
from vlp.platform.model.fusion import FusionConfig, fusion_state_of_bert_layer
from vlp.platform.model.momentum import MomentumConfig

DECODER_OWN = re.compile(r"attention\.(self\.(query|key|value)|output\.(dense|LayerNorm))\.(weight|bias)")


def _layers(reader: _Reader, prefix: str) -> list[int]:
    pattern = rf"{re.escape(prefix)}encoder\.layer\.(\d+)\."
    return sorted({int(m.group(1)) for k in reader.state if (m := re.match(pattern, k))})


def _encoder(reader: _Reader, prefix: str, out: str, image_size: int | None, max_len: int | None,
             vision: str, skip_self_attention: bool = False) -> dict[str, Tensor]:  # fmt: skip
    """ViT `vision` and the BERT under `prefix` (embeddings + layers with cross-attention) -> `out`."""
    mapped = vit_tensors(reader, vision, out, image_size)
    mapped |= bert_embedding_tensors(reader, f"{prefix}embeddings.", f"{out}text.bert.embeddings.", max_len)
    layers = _layers(reader, prefix)
    if not layers:
        raise ValueError(f"BLIP checkpoint: no {prefix}encoder.layer.* keys")
    for i in layers:
        source = f"{prefix}encoder.layer.{i}."
        names = [k[len(source) :] for k in reader.with_prefix(source)]
        if skip_self_attention:
            names = [n for n in names if not DECODER_OWN.fullmatch(n)]
        layer = {n: reader(source + n) for n in names if FUSION_LAYER_KEY.fullmatch(n)}
        state = fusion_state_of_bert_layer(layer)
        if len(state) != (14 if skip_self_attention else 22):
            raise ValueError(f"BLIP checkpoint: layer {source} is incomplete ({sorted(layer)})")
        for name, value in state.items():
            mapped[f"{out}fusion.layers.{i}.{name}"] = value
    return mapped


def _decoder(reader: _Reader, out: str, encoder: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """The decoder's own tensors (causal self-attention + its LayerNorm, LM head) under `out`decoder.*;
    its shared tensors are checked against the encoder's (`encoder`: the mapped online tensors)."""
    prefix = "text_decoder.bert."
    mapped: dict[str, Tensor] = {}
    for i in _layers(reader, prefix):
        source = f"{prefix}encoder.layer.{i}."
        own = {n: reader(source + n) for n in (k[len(source) :] for k in reader.with_prefix(source))
               if DECODER_OWN.fullmatch(n)}  # fmt: skip
        for name, value in fusion_state_of_bert_layer(own).items():
            name = name.replace("self_attn.", f"self_attns.{i}.").replace("self_norm.", f"self_norms.{i}.")
            mapped[f"{out}decoder.{name}"] = value
    head = "text_decoder.cls.predictions."
    mapped[f"{out}decoder.bias"] = reader(f"{head}bias")
    for name, new in (("transform.dense", "transform.0"), ("transform.LayerNorm", "transform.2")):
        for kind in ("weight", "bias"):
            mapped[f"{out}decoder.{new}.{kind}"] = reader(f"{head}{name}.{kind}")
    word = reader(f"{prefix}embeddings.word_embeddings.weight")
    for name, shared in ((f"{head}decoder.weight", word), (f"{head}decoder.bias", reader(f"{head}bias"))):
        if reader.has(name) and not torch.equal(reader(name), shared):
            raise ValueError(f"{name} is not tied as BLIP ties it (vlp's LM head reads the shared tensor)")
    if encoder is not None:  # BLIP ties the decoder's shared tensors to the encoder's
        shared = _encoder(reader, prefix, "backbone.", None, None, "-", skip_self_attention=True)
        untied = [
            k
            for k, v in shared.items()
            if k in encoder and encoder[k].shape == v.shape and not torch.equal(encoder[k], v)
        ]
        if untied:
            raise ValueError(f"BLIP checkpoint: text_decoder.bert differs from text_encoder in {untied[:10]}")
    return mapped


def _fresh_heads(
    out: str, vision_width: int, width: int, embed_dim: int, temperature: str
) -> dict[str, Tensor]:
    """Projections (nn.Linear's init, seed 0) and the temperature 0.07 for a file that has none."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    vision, text = nn.Linear(vision_width, embed_dim), nn.Linear(width, embed_dim)
    torch.random.set_rng_state(generator_state)
    state = {f"{out}vision_proj.{k}": v.detach() for k, v in vision.state_dict().items()}
    state |= {f"{out}text_proj.{k}": v.detach() for k, v in text.state_dict().items()}
    temp = torch.tensor(0.07)
    state[f"{out}temp" if temperature == "clamped" else f"{out}log_logit_scale"] = (
        temp if temperature == "clamped" else (1 / temp).log()
    )
    return state


def convert_blip(
    official: Mapping,
    image_size: int | None = None,
    max_len: int | None = None,
    vocab_size: int | None = None,
    temperature: str = "clamped",
    momentum: bool = True,
    embed_dim: int = 256,
    decoder: bool = True,
) -> tuple[dict[str, Tensor], list[str]]:
    """A BLIP release / LAVIS state dict (or file dict with `model`) -> (`MultiTaskModule` names, the keys
    that started fresh because the file has none: a captioning file's projections and temperature).

    `image_size`: resample the positions to it (384 for COCO fine-tuning); `max_len`: text positions to
    keep; `vocab_size`: the tokenizer's length (BLIP's: 30,524), checked; `temperature`: the backbone's
    parametrisation; `momentum`: map the `*_m` copies and queues; `embed_dim`: a captioning file's fresh
    projections' size (others carry theirs); `decoder`: map the caption decoder (False: a backbone without
    one, e.g. to fine-tune a pre-training file for retrieval; a captioning file needs it)."""
    reader = _Reader(official_state(official))
    has_encoder, has_decoder = (
        bool(reader.with_prefix("text_encoder.")),
        bool(reader.with_prefix("text_decoder.")),
    )
    if not has_encoder and not has_decoder:
        raise ValueError("not a BLIP checkpoint: neither text_encoder.* nor text_decoder.* keys")
    encoder_prefix = "text_encoder." if has_encoder else "text_decoder.bert."
    if has_encoder and reader.with_prefix("text_encoder.bert."):
        encoder_prefix = "text_encoder.bert."
    mapped = _encoder(reader, encoder_prefix, "backbone.", image_size, max_len, "visual_encoder.")
    fresh: list[str] = []
    if not has_encoder:  # captioning file: the encoder's self-attention starts as the decoder's
        for key in [k for k in mapped if re.search(r"\.(self_attn|self_norm)\.", k)]:
            mapped[key] = mapped[key].clone()
    word = mapped["backbone.text.bert.embeddings.word_embeddings.weight"]
    if vocab_size is not None and len(word) != vocab_size:
        raise ValueError(
            f"the checkpoint's vocabulary has {len(word)} rows, the tokenizer {vocab_size} tokens: use BLIP's "
            "tokenizer (bert-base-uncased + [DEC] + [ENC], 30524)"
        )
    if has_decoder and not (decoder or has_encoder):
        raise ValueError("a captioning checkpoint is its decoder: convert it with the decoder")
    if has_decoder and decoder:
        mapped |= _decoder(reader, "backbone.", mapped if has_encoder else None)
    if has_encoder:
        for name in ("vision_proj", "text_proj"):
            for kind in ("weight", "bias"):
                mapped[f"backbone.{name}.{kind}"] = reader(f"{name}.{kind}")
        temp = reader("temp").reshape(())
        if temperature == "clamped":
            mapped["backbone.temp"] = temp.clone()
        else:
            mapped["backbone.log_logit_scale"] = (1.0 / temp).log()
        if reader.has("itm_head.weight"):
            for kind in ("weight", "bias"):
                mapped[f"objectives.itm.head.{kind}"] = reader(f"itm_head.{kind}")
    else:
        vision_width = mapped["backbone.vision.vit.cls_token"].shape[-1]
        heads = _fresh_heads("backbone.", vision_width, word.shape[1], embed_dim, temperature)
        mapped |= heads
        fresh = sorted(heads)
    if momentum and reader.with_prefix("visual_encoder_m."):
        out = "backbone.momentum.backbone."
        prefix = "text_encoder_m.bert." if reader.with_prefix("text_encoder_m.bert.") else "text_encoder_m."
        mapped |= _encoder(reader, prefix, out, image_size, max_len, "visual_encoder_m.")
        for name in ("vision_proj", "text_proj"):
            for kind in ("weight", "bias"):
                mapped[f"{out}{name}.{kind}"] = reader(f"{name}_m.{kind}")
        temp_key = "temp" if temperature == "clamped" else "log_logit_scale"
        mapped[f"{out}{temp_key}"] = mapped[f"backbone.{temp_key}"].clone()
        for key in [k for k in mapped if k.startswith("backbone.decoder.")]:
            mapped[out + key[len("backbone.") :]] = mapped[key].clone()
    if momentum and reader.has("image_queue"):
        image_queue, text_queue = reader("image_queue").T.contiguous(), reader("text_queue").T.contiguous()
        ids = reader("idx_queue").reshape(-1).long() if reader.has("idx_queue") else None
        if ids is None:
            ids = torch.full((len(image_queue),), -1, dtype=torch.long)
        pointer = next((name for name in ("queue_ptr", "ptr_queue") if reader.has(name)), "queue_ptr")
        mapped |= {
            "objectives.itc.queue.image": image_queue,
            "objectives.itc.queue.text": text_queue,
            "objectives.itc.queue.ids": ids,
            "objectives.itc.queue.pointer": reader(pointer).reshape(()).long(),
            "objectives.itc.queue.filled": torch.tensor(len(image_queue)),
        }
    left = sorted(k for k in reader.state if k not in reader.read)
    if not momentum:
        queues = r"(\w+_m\.|image_queue|text_queue|queue_ptr|ptr_queue|idx_queue)"
        left = [k for k in left if not re.match(queues, k)]
    if not decoder:
        left = [k for k in left if not k.startswith("text_decoder.")]
    if left:
        raise ValueError(f"BLIP checkpoint keys that fit nothing in vlp ({len(left)}): {left[:40]}")
    return mapped, fresh


def blip_architecture(converted: Mapping[str, Tensor], vision_heads: int | None = None,
                      text_heads: int | None = None, temperature: str = "clamped") -> dict:  # fmt: skip
    """The `BlipBackbone` settings (`vlp_architecture`, with `layout: blip`) of a `convert_blip` state:
    sizes read off the tensors; BLIP's: post-norm layers (eps 1e-12), no token types, [CLS] pooling,
    dropout 0.1 (`med_config.json`; the ViT's drop path 0), momentum 0.995 when the copies are there,
    temperature 0.07 clamped to [0.001, 0.5]. Heads default to width / 64 (ViT-B/16, BERT-base)."""

    width = converted["backbone.text.bert.embeddings.word_embeddings.weight"].shape[1]
    text_heads = attention_heads(text_heads, width, "--text-heads")
    architecture = as_plain_data(
        {
            "vision": vision_config_of(converted, vision_heads),
            "text": TextConfig(
                width=width,
                depth=0,
                heads=text_heads,
                max_len=converted["backbone.text.bert.embeddings.position_embeddings.weight"].shape[0],
                dropout=0.1,
                pool="cls",
                token_types=False,
            ),
            "fusion": FusionConfig(
                depth=_count(converted, r"backbone\.fusion\.layers\.(\d+)\..*"),
                heads=text_heads,
                mlp_ratio=converted["backbone.fusion.layers.0.mlp.0.weight"].shape[0] / width,
                dropout=0.1,
                norm="post",
                layer_norm_eps=1e-12,
            ),
            "embed_dim": converted["backbone.vision_proj.weight"].shape[0],
            "init_temperature": 0.07,
            "max_logit_scale": 100.0,
            "caption_decoder": "backbone.decoder.bias" in converted,
            "merging": None,
            "momentum": MomentumConfig(0.995)
            if "backbone.momentum.backbone.vision_proj.weight" in converted
            else None,
            "temperature": temperature,
            "temperature_range": (0.001, 0.5),
            "init_logit_bias": None,
        }
    )
    return architecture | {"layout": LAYOUT}
