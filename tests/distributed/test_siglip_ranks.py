"""ITC with the sigmoid loss under 2 gloo ranks: per-rank batch b equals one process with batch 2b in loss
(mean over ranks) and, after DDP's gradient averaging, in every gradient, for the ring and the bidirectional
exchange. Each rank pads its captions to its own longest one; an image on both ranks and its identical
caption are positives across ranks."""

from pathlib import Path

import torch
import torch.distributed as dist
from gloo_ranks import run_on_ranks

from vlp.datamodules.shapes import ShapesSource
from vlp.platform.model.backbone import FeatureCache, FusionBackbone
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig
from vlp.tasks.itc import ITCObjective
from vlp.tasks.itm import positive_pairs

WORLD, LOCAL_B = 2, 6
ITEMS = [*range(11), 3]  # image 3 on both ranks
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def _losses_and_grads(rows: list[int], average_over_ranks: bool) -> dict[str, object]:
    source = ShapesSource(image_size=32, num_train=16, num_val=8, num_test=8, batch_size=LOCAL_B)
    dataset = source.dataset("train")
    batch = source.collate([dataset[i] for i in rows])
    out: dict[str, object] = {}
    for exchange in ("ring", "bidirectional"):
        torch.manual_seed(0)
        backbone = FusionBackbone(
            vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2),
            text=TextConfig(width=32, depth=1, heads=2, max_len=48),
            fusion=FusionConfig(depth=1, heads=2),
            embed_dim=16,
            init_temperature=0.1,
            init_logit_bias=-3.0,
            tokenizer=source.tokenizer,
        )
        itc = ITCObjective(backbone, loss="sigmoid", exchange=exchange, chunk_size=4)
        loss = itc.forward_loss(batch, FeatureCache(backbone, batch)).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in itc.named_parameters() if p.grad is not None}
        if average_over_ranks:  # what DDP does to replicated parameters
            for grad in grads.values():
                dist.all_reduce(grad)
                grad /= WORLD
        out[exchange] = (loss.detach(), grads)
    out["positives"] = int(
        positive_pairs(batch["image_id"], batch["input_ids"], batch["attention_mask"]).sum()
    )
    return out


def _worker(local_rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    rows = ITEMS[local_rank * LOCAL_B : (local_rank + 1) * LOCAL_B]
    torch.save(_losses_and_grads(rows, average_over_ranks=True), Path(out_dir) / f"rank{local_rank}.pt")


def test_two_ranks_of_batch_b_train_like_one_process_of_batch_2b(tmp_path: Path, one_thread):
    run_on_ranks(_worker, tmp_path, world=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _losses_and_grads(ITEMS, average_over_ranks=False)
    assert single["positives"] > len(ITEMS)  # duplicates across the two halves
    for exchange in ("ring", "bidirectional"):
        loss, grads = single[exchange]
        torch.testing.assert_close(
            torch.stack([rank[exchange][0] for rank in ranks]).mean(), loss, **TOLERANCE
        )
        assert "backbone.logit_bias" in grads and "backbone.log_logit_scale" in grads
        for rank in ranks:
            assert set(rank[exchange][1]) == set(grads)
            for key, grad in grads.items():
                torch.testing.assert_close(
                    rank[exchange][1][key], grad, **TOLERANCE, msg=f"{exchange}: {key}"
                )
