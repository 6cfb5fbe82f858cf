"""The captioner and the filter of `vlp data bootstrap` (BLIP's CapFilt), from any vlp checkpoint whose
backbone has a caption decoder and whose modules include an ITM head.

The backbone is rebuilt from the architecture the checkpoint stores and loaded strictly; the ITM head is the
`itm` objective's (`objectives.itm.head.*` of a multi-task run, `head.*` of an ITM run alone). The tokenizer
is not in a checkpoint (the data links it), so it comes from a tokenizer folder or a training config whose
`data` section builds it as `vlp fit` does; by default the `config.yaml` `vlp fit` saved in the run folder
above the checkpoint's `checkpoints/` folder.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from vlp.platform.model.architecture import backbone_class_path, read_architecture
from vlp.platform.model.backbone import FusionBackbone, ImageFeatures, first_token
from vlp.platform.model.pretrained import read_weights
from vlp.platform.model.sampling import nucleus_sampling

ITM_HEAD_PREFIXES = ("objectives.itm.head.", "head.")


@dataclass
class SamplingSettings:
    """BLIP's CapFilt captioner: nucleus sampling, top-p 0.9, repetition penalty 1.1, 5 to 20 tokens;
    transformers' default top-k 50 was active in BLIP's `generate` call as well."""

    top_p: float = 0.9
    top_k: int = 50
    temperature: float = 1.0
    repetition_penalty: float = 1.1
    min_length: int = 5
    max_length: int = 20


def tokenizer_source(checkpoint: Path, given: str | None) -> Path:
    """The folder or config the tokenizer comes from: `given`, else the run's saved `config.yaml`."""
    if given is not None:
        return Path(given)
    saved = checkpoint.resolve().parent.parent / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(
            f"--tokenizer not given and no config.yaml beside {checkpoint.parent} (vlp fit saves one in the run "
            "folder): give --tokenizer, a tokenizer folder or the training config"
        )
    return saved


def load_tokenizer_from(source: Path) -> PreTrainedTokenizerBase:
    """A tokenizer folder, or a YAML config whose `data` section is instantiated as `vlp fit` does."""
    if source.is_dir():
        from vlp.datamodules.tokenizer import load_tokenizer

        return load_tokenizer(str(source))
    if not source.is_file():
        raise FileNotFoundError(f"--tokenizer: no such folder or config: {source}")
    from jsonargparse import ArgumentParser

    from vlp.datamodules.multitask import MultiTaskDataModule

    config = yaml.safe_load(source.read_text()) or {}
    if "data" not in config:
        raise ValueError(f"--tokenizer: {source} has no data section to build the tokenizer from")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MultiTaskDataModule, "data", fail_untyped=False)
    parsed = parser.parse_object({"data": config["data"]}, defaults=True)
    return parser.instantiate_classes(parsed).data.tokenizer


def backbone_settings(architecture: dict[str, Any]) -> dict[str, Any]:
    """A stored architecture (plain data) as `FusionBackbone`'s arguments: its config sections as dataclasses."""
    from vlp.platform.model.encoders import TextConfig, VisionConfig
    from vlp.platform.model.fusion import FusionConfig
    from vlp.platform.model.momentum import MomentumConfig
    from vlp.platform.model.token_merging import TokenMergingConfig

    sections = {
        "vision": VisionConfig,
        "text": TextConfig,
        "fusion": FusionConfig,
        "merging": TokenMergingConfig,
        "momentum": MomentumConfig,
    }
    settings = dict(architecture)
    for name, config in sections.items():
        if isinstance(settings.get(name), dict):
            settings[name] = config(**settings[name])
    if settings.get("temperature_range") is not None:
        settings["temperature_range"] = tuple(settings["temperature_range"])
    return settings


class CapFiltModel(nn.Module):
    """Captions images with nucleus sampling and scores (image, caption) pairs with the ITM head."""

    def __init__(self, backbone: FusionBackbone, itm_head: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.itm_head = backbone, itm_head

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path, tokenizer: PreTrainedTokenizerBase, device: torch.device | str = "cpu"
    ) -> CapFiltModel:
        """The model of `checkpoint`; a checkpoint without a caption decoder or an ITM head is an error
        that names what is missing."""
        architecture = read_architecture(checkpoint)
        if architecture is None:
            raise ValueError(f"{checkpoint} stores no backbone architecture (written before vlp kept it)")
        missing = []
        if not architecture.get("caption_decoder"):
            missing.append("a caption decoder (its backbone was built without caption_decoder: true)")
        state = read_weights(checkpoint)
        head = next(
            (
                {key.removeprefix(p): v for key, v in state.items() if key.startswith(p)}
                for p in ITM_HEAD_PREFIXES
                if f"{p}weight" in state
            ),
            None,
        )
        if head is None:
            missing.append("an ITM head (no objectives.itm.head.weight: train with the itm objective)")
        if missing:
            raise ValueError(f"vlp data bootstrap needs {' and '.join(missing)}; {checkpoint} has neither"
                             if len(missing) == 2 else f"vlp data bootstrap needs {missing[0]}; {checkpoint} "
                             "lacks it")  # fmt: skip
        settings = backbone_settings(architecture)
        module, _, name = backbone_class_path(settings.pop("layout", None), str(checkpoint)).rpartition(".")
        backbone = getattr(importlib.import_module(module), name)(**settings, tokenizer=tokenizer)
        weights = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        expected = backbone.state_dict()
        differ = [k for k in weights if k in expected and weights[k].shape != expected[k].shape]
        vocabulary = [k for k in differ if k.endswith("word_embeddings.weight")]
        if vocabulary:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens, {checkpoint}'s text tower "
                f"{weights[vocabulary[0]].shape[0]}: give the tokenizer it was trained with (--tokenizer)"
            )
        if differ:
            raise ValueError(f"{checkpoint}'s weights do not fit its stored architecture: {differ[:5]}")
        result = backbone.load_state_dict(weights, strict=False)
        absent = [k for k in result.missing_keys if not k.startswith("momentum.")]
        if absent or result.unexpected_keys:
            raise ValueError(
                f"{checkpoint}'s backbone weights do not fit its architecture: missing {absent[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        itm_head = nn.Linear(backbone.width, 2)
        itm_head.load_state_dict(head)
        return cls(backbone, itm_head).to(device).eval()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.backbone.tokenizer

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> ImageFeatures:
        """Images [B, 3, S, S] -> features with the fusion keys and values computed once."""
        return self.backbone.with_fusion_keys(self.backbone.encode_image(images))

    @torch.no_grad()
    def sample_captions(
        self, image: ImageFeatures, per_image: int, settings: SamplingSettings, generator: torch.Generator
    ) -> list[str]:
        """`per_image` sampled captions of each image, image-major: [B * per_image] texts."""
        b = image.embedding.shape[0]
        device = image.embedding.device
        expanded = image.take(torch.arange(b, device=device).repeat_interleave(per_image))
        tokenizer = self.tokenizer
        ids = nucleus_sampling(
            self.backbone.start_decoding(expanded),
            b * per_image,
            tokenizer.cls_token_id,
            tokenizer.sep_token_id,
            tokenizer.pad_token_id,
            min(settings.max_length, self.backbone.text.max_len - 1),
            generator=generator,
            top_p=settings.top_p,
            top_k=settings.top_k,
            temperature=settings.temperature,
            repetition_penalty=settings.repetition_penalty,
            min_length=settings.min_length,
            device=device,
        )
        return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def match_probability(self, image: ImageFeatures, image_index: Tensor, captions: list[str]) -> Tensor:
        """P(match) [P] of images `image_index` [P] with `captions` [P], from the ITM head's softmax."""
        encoded = self.tokenizer(
            captions,
            padding="longest",
            truncation=True,
            max_length=self.backbone.text.max_len,
            return_tensors="pt",
        )
        device = image.embedding.device
        ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
        text = self.backbone.encode_text(ids, mask)
        fused = self.backbone.fuse(
            image.take(image_index.to(device)), text.tokens, mask, positions=first_token(len(ids), device)
        )
        return F.softmax(self.itm_head(fused[:, 0]).float(), dim=-1)[:, 1]
