from itertools import islice

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from vlp.platform.model.backbone import FeatureCache, FusionBackbone, first_rows
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig
from vlp.platform.model.token_merging import TokenMergingConfig
from vlp.platform.run.perf import FlopsMonitor, training_step_flops
from vlp.tasks.grounding import GroundingObjective

TOKENS = 1 + (32 // 8) ** 2


class FusedScore(LightningModule):
    """A minimal runner on the backbone: the fused [CLS] of each pair, trained toward zero; logs its loss."""

    def __init__(self, backbone: FusionBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image = self.backbone.encode_image(batch["image"])
        text = self.backbone.encode_text(batch["input_ids"], batch["attention_mask"])
        loss = self.backbone.fuse(image, text.tokens, text.attention_mask)[:, 0].pow(2).mean()
        loss = loss + torch.rand(()) * 0  # draws from the RNG, as MLM masking and ITM negatives do
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def build(tokenizer, merging: TokenMergingConfig | None = None) -> FusedScore:
    torch.manual_seed(0)
    return FusedScore(
        FusionBackbone(
            vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
            text=TextConfig(width=32, depth=1, heads=2, max_len=48),
            fusion=FusionConfig(depth=1, heads=2),
            embed_dim=16,
            tokenizer=tokenizer,
            merging=merging,
        )
    )


def test_flops_monitor_logs_gflops_per_sample_and_tokens_kept(shapes):
    module = build(shapes.tokenizer, TokenMergingConfig(vision_r=3))
    trainer = Trainer(
        max_steps=3,
        log_every_n_steps=1,  # the monitor logs on the steps the loggers write
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FlopsMonitor(every_n_steps=2, batch_size=2)],
    )
    trainer.fit(module, train_dataloaders=shapes.dataloader("train"))
    metrics = trainer.callback_metrics
    assert metrics["perf/tokens_kept"].item() == pytest.approx((TOKENS - 6) / TOKENS)
    # attention on the tokens that enter each block, its MLP on those left: 17 and 14, then 14 and 11
    blocks = ((TOKENS + TOKENS - 3) / 2 + (TOKENS - 3 + TOKENS - 6) / 2) / (2 * TOKENS)
    assert metrics["perf/token_blocks_kept"].item() == pytest.approx(blocks)
    third_batch = first_rows(list(islice(shapes.dataloader("train"), 3))[2], 2)  # measured at 0 and 2
    expected = training_step_flops(module, third_batch) / 2 / 1e9
    assert metrics["perf/gflops_per_sample"].item() == pytest.approx(expected, rel=1e-6)
    assert metrics["train/loss"].item() > 0


@pytest.mark.parametrize("merging", [None, TokenMergingConfig()])
def test_without_merging_every_block_runs_on_the_tokens_the_tower_keeps(shapes, batch, merging):
    """No merging (none set, or every r 0): 1.0 of the tokens and the token-blocks; under patch dropout alone
    both are the kept share ([CLS] + 8 of 16 patches)."""
    backbone = build(shapes.tokenizer, merging).backbone
    assert backbone.tokens_kept == backbone.token_blocks_kept == 1.0  # before any forward
    backbone.encode_image(batch["image"])
    assert backbone.tokens_kept == backbone.token_blocks_kept == 1.0
    backbone.vision.set_patch_dropout(0.5)
    backbone.encode_image(batch["image"])
    assert backbone.tokens_kept == backbone.token_blocks_kept == pytest.approx(9 / TOKENS)


def test_counting_a_step_leaves_gradients_rng_and_logging_alone(shapes, batch):
    module = build(shapes.tokenizer)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    logged = []
    module.log = lambda *args, **kwargs: logged.append(args)
    state = torch.get_rng_state()
    flops = training_step_flops(module, first_rows(batch, 2))
    assert flops > 0 and logged == []
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in module.parameters())
    module.training_step(batch, 0)
    assert len(logged) == 1  # the module's own logging is back


def test_backward_counts_on_top_of_forward_and_merging_lowers_both(shapes, batch):
    small = first_rows(batch, 2)
    module = build(shapes.tokenizer)
    forward, train = training_step_flops(module, small, backward=False), training_step_flops(module, small)
    assert 2.5 * forward < train < 3.5 * forward  # backward ~ 2x forward
    module.backbone.set_merging(vision_r=4, fusion_r=2)
    assert training_step_flops(module, small, backward=False) < forward
    assert training_step_flops(module, small) < train


def test_the_flops_sample_cuts_every_per_sample_field(batch):
    small = first_rows({**batch, "objective": "itc"}, 3)
    assert small["image"].shape[0] == 3 and small["input_ids"].shape == (3, batch["input_ids"].shape[1])
    assert len(small["captions"]) == 3 and small["objective"] == "itc"


def test_flops_monitor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        FlopsMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        FlopsMonitor(batch_size=0)


def test_event_files_hold_tokens_kept_and_gflops_per_sample_with_merging_and_patch_dropout(shapes, tmp_path):
    """Read back from the TensorBoard event files: tokens_kept counts what merging and patch dropout left
    of the 17 input tokens ([CLS] + 8 of 16 patches, then 3 and 2 merged, the cap at 9 - 3 = 6 tokens: 4),
    and the FLOPs are logged, below those of the step without patch dropout."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = build(shapes.tokenizer, TokenMergingConfig(vision_r=3))
    module.backbone.vision.set_patch_dropout(0.5)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = Trainer(
        max_steps=2,
        log_every_n_steps=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FlopsMonitor(every_n_steps=1, batch_size=2)],
    )
    trainer.fit(module, train_dataloaders=shapes.dataloader("train"))
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    kept = [e.value for e in events.Scalars("perf/tokens_kept")]
    blocks = [e.value for e in events.Scalars("perf/token_blocks_kept")]
    gflops = [e.value for e in events.Scalars("perf/gflops_per_sample")]
    assert kept == pytest.approx([4 / TOKENS] * 2)
    # the blocks ran on 9 then 6 tokens (attention) and 6 then 4 (MLP), of 17 through 2 blocks
    assert blocks == pytest.approx([(9 + 6 + 6 + 4) / 2 / (2 * TOKENS)] * 2)
    assert len(gflops) == 2 and all(g > 0 for g in gflops)
    module.backbone.vision.set_patch_dropout(0.0)
    assert (
        training_step_flops(module, first_rows(next(iter(shapes.dataloader("train"))), 2)) / 2e9 > gflops[0]
    )


class Grounding(LightningModule):
    """Grounding alone on the backbone: with vision merging its box head reads the image's patch grid."""

    def __init__(self, backbone: FusionBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.grounding = GroundingObjective(backbone)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.grounding.forward_loss(batch, FeatureCache(self.backbone, batch)).loss


def test_counting_a_merged_grounding_step_with_its_patch_grid(shapes, batch):
    """The grid's position keys come from the position embedding fed to the fusion's projections: as a leaf
    input it broke FlopCounterMode's module hooks under `autograd.grad` (the monitor's replay)."""
    module = Grounding(build(shapes.tokenizer, TokenMergingConfig(vision_r=3)).backbone)
    small = first_rows(batch, 2)
    merged = training_step_flops(module, small)
    module.backbone.set_merging(vision_r=0)
    assert 0 < merged < training_step_flops(module, small)
