"""Fine-tuning from a pre-training checkpoint: the backbone loads bit-exactly and strictly, heads where they
fit, new heads fresh and listed; a backbone that does not fit is a clear error; optimizer and schedule start
fresh; a resumed fine-tuning run restores its own checkpoint, not the pre-training one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from vlp.cli import run as main
from vlp.platform.model.encoders import TextConfig
from vlp.platform.model.momentum import MomentumConfig
from vlp.platform.model.pretrained import load_pretrained, read_weights
from vlp.tasks.grounding import GroundingObjective
from vlp.tasks.itc import ITCObjective
from vlp.tasks.itm import ITMObjective
from vlp.tasks.mlm import MLMObjective
from vlp.tasks.multitask import MultiTaskModule

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


def in_folder(folder: Path) -> list[str]:
    """CLI arguments that keep a run's checkpoints and TensorBoard files under `folder`."""
    return [
        "--trainer.default_root_dir", str(folder),
        "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir", str(folder),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A 6-step pre-training run of the tiny config (itc, itm, mlm): its last checkpoint."""
    folder = tmp_path_factory.mktemp("pretrain")
    cli = main(["fit", "--config", TINY, *in_folder(folder)])
    return Path(cli.trainer.checkpoint_callback.last_model_path)


def finetuner(make_backbone, checkpoint: Path, **backbone_args) -> MultiTaskModule:
    torch.manual_seed(123)  # fresh heads differ from anything the checkpoint holds
    return MultiTaskModule(
        make_backbone(**backbone_args),
        {"itm": ITMObjective, "grounding": GroundingObjective},
        init_from=str(checkpoint),
    )


def test_backbone_loads_bit_exactly_heads_where_they_fit(make_backbone, pretrained):
    module = finetuner(make_backbone, pretrained)
    fresh_grounding = {
        k: v.clone() for k, v in module.objectives["grounding"].state_dict().items() if "head" in k
    }
    module.setup("fit")
    stored = read_weights(pretrained)
    state = module.state_dict()
    backbone_keys = [k for k in state if k.startswith("backbone.")]
    assert len(backbone_keys) > 30
    for key in backbone_keys:
        assert torch.equal(state[key], stored[key]), key
    assert torch.equal(state["objectives.itm.head.weight"], stored["objectives.itm.head.weight"])
    for key, value in module.objectives["grounding"].state_dict().items():
        if "head" in key:
            assert torch.equal(value, fresh_grounding[key]), key  # new head: fresh
    report = module.init_report
    assert any(k.startswith("objectives.grounding.head") for k in report.fresh)  # new head, listed
    assert any(k.startswith("objectives.mlm.head") for k in report.unused)  # a head this run has not
    assert not any(k.startswith("backbone.") for k in report.fresh)
    assert "objectives.grounding.head" in report.summary(pretrained)


def test_a_backbone_that_does_not_fit_names_the_keys(make_backbone, pretrained):
    module = finetuner(make_backbone, pretrained, text=TextConfig(width=48, depth=1, heads=2, max_len=48))
    with pytest.raises(ValueError, match=r"backbone does not fit.*backbone\.text"):
        module.setup("fit")


def test_momentum_model_starts_equal_to_the_loaded_backbone(make_backbone, pretrained):
    module = MultiTaskModule(
        make_backbone(momentum=MomentumConfig()),
        {"itc": lambda b: ITCObjective(b, queue_size=8), "mlm": MLMObjective},
        init_from=str(pretrained),
    )
    module.setup("fit")
    online = {k: v for k, v in module.backbone.named_parameters() if not k.startswith("momentum.")}
    for name, param in module.backbone.momentum.backbone.named_parameters():
        assert torch.equal(param, online[name]), name


def test_missing_or_foreign_files_are_clear_errors(tmp_path, make_backbone):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        read_weights(tmp_path / "nothing.ckpt")
    odd = tmp_path / "odd.pt"
    torch.save({"epoch": 3}, odd)
    with pytest.raises(ValueError, match="neither a Lightning checkpoint"):
        read_weights(odd)
    plain = tmp_path / "plain.pt"  # a plain name -> tensor file, as `vlp export` writes
    module = MultiTaskModule(make_backbone(), {"itm": ITMObjective})
    torch.save(module.state_dict(), plain)
    report = load_pretrained(MultiTaskModule(make_backbone(), {"itm": ITMObjective}), read_weights(plain))
    assert not report.fresh and not report.unused


def test_finetuning_through_the_cli_starts_a_fresh_schedule_and_resumes_its_own(pretrained, tmp_path):
    args = [
        "fit", "--config", TINY, *in_folder(tmp_path),
        "--model.init_args.init_from", str(pretrained), "--trainer.max_steps", "2",
        "--model.init_args.objectives", '{"itm": "vlp.tasks.itm.ITMObjective"}',
    ]  # fmt: skip
    first = main(args)
    assert first.trainer.global_step == 2
    scheduler = first.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 2  # counted from this run's start, not the pre-training's
    ckpt = first.trainer.checkpoint_callback.last_model_path
    weights = torch.load(ckpt, weights_only=True)["state_dict"]  # before the resumed run rewrites last.ckpt
    objectives = ["--model.init_args.objectives", args[-1]]
    resumed = main([*args[:-4], "--trainer.max_steps", "3", *objectives, "--ckpt_path", ckpt])
    assert resumed.trainer.global_step == 3
    key = "backbone.fusion.layers.0.mlp.0.weight"
    assert not torch.equal(resumed.model.state_dict()[key], weights[key])  # it trained on from there


# The architecture a checkpoint carries: a config that names only objectives and data builds the model from it.
OBJECTIVES_ONLY = [
    "--model", "vlp.tasks.multitask.MultiTaskModule",
    "--model.init_args.objectives", '{"itm": {"class_path": "vlp.tasks.itm.ITMObjective"}}',
]  # fmt: skip


def without_backbone(config: str, folder: Path) -> list[str]:
    """`config` (tiny.yaml) with its model replaced by objectives alone (no backbone)."""
    text = Path(config).read_text()
    model = text.index("model:\n")
    data = text.index("data:\n")
    plain = folder / "no-backbone.yaml"
    plain.write_text(text[:model] + text[data:])
    return ["--config", str(plain), *OBJECTIVES_ONLY]


def test_evaluation_builds_the_backbone_from_the_checkpoint(pretrained, tmp_path):
    args = [*without_backbone(TINY, tmp_path), *in_folder(tmp_path)]
    cli = main(["validate", *args, "--model.init_args.init_from", str(pretrained)])
    stored = read_weights(pretrained)
    torch.testing.assert_close(
        cli.model.backbone.text.word_embeddings.weight,
        stored["backbone.text.bert.embeddings.word_embeddings.weight"],
    )
    assert cli.model.backbone.architecture == torch.load(pretrained, weights_only=True)["vlp_architecture"]
    # evaluation with --ckpt_path alone (the checkpoint's objectives): the config does not describe the model
    every = '{"itc": "vlp.tasks.itc.ITCObjective", "itm": "vlp.tasks.itm.ITMObjective", "mlm": "vlp.tasks.mlm.MLMObjective"}'
    cli = main(["validate", *args, "--model.init_args.objectives", every, "--ckpt_path", str(pretrained)])
    assert cli.model.backbone.fusion.layers[0].mlp[0].weight.shape[1] == 32


def test_a_config_value_that_contradicts_the_checkpoint_is_an_error_naming_both(pretrained, tmp_path):
    args = [
        *without_backbone(TINY, tmp_path),
        *in_folder(tmp_path),
        "--model.init_args.init_from",
        str(pretrained),
    ]
    backbone = "--model.init_args.backbone=vlp.platform.model.backbone.FusionBackbone"
    with pytest.raises(
        ValueError, match=r"text\.width: checkpoint 32, config 64.*text\.depth: checkpoint 1, config 3"
    ):
        main(["validate", *args, backbone, "--model.init_args.backbone.init_args.text.width=64",
              "--model.init_args.backbone.init_args.text.depth=3"])  # fmt: skip


def test_settings_that_may_differ_are_applied_and_listed(pretrained, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    args = [
        *without_backbone(TINY, tmp_path),
        *in_folder(tmp_path),
        "--model.init_args.init_from",
        str(pretrained),
    ]
    cli = main(["validate", *args, "--model.init_args.backbone=vlp.platform.model.backbone.FusionBackbone",
                "--model.init_args.backbone.init_args.text.dropout=0.1"])  # fmt: skip
    assert cli.model.backbone.architecture["text"]["dropout"] == 0.1
    assert cli.model.backbone.architecture["text"]["width"] == 32  # the rest from the checkpoint
    assert "text.dropout: 0.0 -> 0.1" in caplog.text


def test_an_exported_file_carries_the_architecture(pretrained, tmp_path):
    from vlp.cli.export import export

    for name in ("model.safetensors", "model.pt"):
        exported = tmp_path / name
        export(pretrained, exported)
        cli = main(["validate", *without_backbone(TINY, tmp_path), *in_folder(tmp_path),
                    "--model.init_args.init_from", str(exported)])  # fmt: skip
        assert cli.model.backbone.architecture["vision"]["width"] == 32


def test_sharded_checkpoint_folders_give_their_architecture(tmp_path):
    from vlp.platform.model.architecture import ARCHITECTURE_KEY, read_architecture

    architecture = {"vision": {"width": 32}}
    for name in ("meta.pt", "checkpoint/mp_rank_00_model_states.pt"):  # FSDP2, DeepSpeed
        folder = tmp_path / name.replace("/", "_")
        (folder / name).parent.mkdir(parents=True)
        torch.save({ARCHITECTURE_KEY: architecture, "module": {"w": torch.ones(4)}}, folder / name)
        assert read_architecture(folder) == architecture


def test_without_a_backbone_or_checkpoint_the_error_says_what_to_give(tmp_path):
    with pytest.raises(ValueError, match=r"backbone is not set: give --model.init_args.init_from CKPT"):
        main(["validate", *without_backbone(TINY, tmp_path), *in_folder(tmp_path)])


def test_another_image_size_resamples_the_position_embeddings(make_backbone, pretrained):
    from vlp.platform.model.encoders import VisionConfig

    module = finetuner(
        make_backbone,
        pretrained,
        vision=VisionConfig(image_size=48, patch_size=8, width=32, depth=1, heads=2),
    )
    module.setup("fit")
    stored = read_weights(pretrained)["backbone.vision.vit.pos_embed"]  # [1, 1 + 4 * 4, 32]
    loaded = module.backbone.vision.vit.pos_embed  # [1, 1 + 6 * 6, 32]
    assert loaded.shape == (1, 37, 32)
    torch.testing.assert_close(loaded[:, 0], stored[:, 0])  # [CLS] row kept
    grid = stored[0, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(
        grid, size=(6, 6), mode="bicubic", antialias=True, align_corners=False
    )
    torch.testing.assert_close(loaded[0, 1:], expected.permute(0, 2, 3, 1).reshape(36, 32))


def test_the_architecture_holds_every_backbone_setting(make_backbone):
    """A new FusionBackbone argument must reach the stored architecture, or models built from checkpoints
    would silently lose it."""
    import inspect

    from vlp.platform.model.backbone import FusionBackbone

    settings = set(inspect.signature(FusionBackbone.__init__).parameters) - {"self", "tokenizer"}
    assert set(make_backbone().architecture) == settings


def test_zero_shot_of_a_sigmoid_trained_checkpoint_reads_its_trained_pair_bias(tmp_path):
    """SigLIP's bias lives in the backbone, so an evaluation built from the checkpoint scores with the
    trained b (one sigmoid per class) without being told it."""
    sigmoid = '{"itc": {"class_path": "vlp.tasks.itc.ITCObjective", "init_args": {"loss": "sigmoid"}}}'
    cli = main(["fit", "--config", TINY, *in_folder(tmp_path / "pretrain"), "--trainer.max_steps", "3",
                "--model.init_args.objectives", sigmoid,
                "--model.init_args.backbone.init_args.init_logit_bias", "-10.0"])  # fmt: skip
    trained = cli.model.backbone.logit_bias.detach().clone()
    assert trained.item() != -10.0
    checkpoint = cli.trainer.checkpoint_callback.last_model_path
    zeroshot = '{"zeroshot": {"class_path": "vlp.tasks.zeroshot.ZeroShotObjective"}}'
    classes = ["--data.sources", '{"classes": {"class_path": "vlp.datamodules.shapes.ShapeClassesSource", '
               '"init_args": {"image_size": 32, "num_val": 24, "batch_size": 12}}}']  # fmt: skip
    cli = main(["validate", *without_backbone(TINY, tmp_path), *in_folder(tmp_path / "zeroshot"),
                "--model.init_args.objectives", zeroshot, *classes, "--model.init_args.init_from", checkpoint])  # fmt: skip
    torch.testing.assert_close(cli.model.backbone.logit_bias.detach(), trained)
