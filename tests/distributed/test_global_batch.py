"""Global-batch objectives under 2 gloo ranks: per-rank batch b equals one process with batch 2b.

ITC (gathered columns, local loss) and ITM (hard negatives mined from every rank's rows, positives and
duplicate captions excluded across ranks) give the same loss and, after DDP's gradient averaging, the same
gradients as one process on the whole batch, also with token merging (captions merged at the fusion's entry
travel with their sizes). ITC without the gather does not.
"""

from pathlib import Path

import torch
import torch.distributed as dist
from gloo_ranks import run_on_ranks

from vlp.datamodules.shapes import ShapesSource
from vlp.platform.kernels import contrastive_loss
from vlp.platform.model.backbone import FeatureCache, FusionBackbone
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig
from vlp.platform.model.momentum import MomentumConfig
from vlp.platform.model.token_merging import TokenMergingConfig
from vlp.tasks.itc import ITCObjective
from vlp.tasks.itm import ITMObjective

WORLD, LOCAL_B = 2, 8
# image 3 appears on both ranks: its pair across ranks is a positive, never a negative
ITEMS = [*range(15), 3]
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def _source() -> ShapesSource:
    return ShapesSource(image_size=32, num_train=32, num_val=8, num_test=8, batch_size=LOCAL_B)


def _models(
    source: ShapesSource, alpha: float = 0.0, merging: TokenMergingConfig | None = None
) -> tuple[FusionBackbone, ITCObjective, ITMObjective]:
    """`alpha` > 0: a momentum model and ITC's distilled loss (soft targets from it); `merging`: token
    merging (ITM's captions then travel merged, with their sizes)."""
    torch.manual_seed(0)
    backbone = FusionBackbone(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2),
        text=TextConfig(width=32, depth=1, heads=2, max_len=48),
        fusion=FusionConfig(depth=1, heads=2),
        embed_dim=16,
        tokenizer=source.tokenizer,
        momentum=MomentumConfig() if alpha else None,
        merging=merging,
    )
    return backbone, ITCObjective(backbone, chunk_size=3, alpha=alpha), ITMObjective(backbone)


def _losses_and_grads(rows: list[int], average_over_ranks: bool) -> dict[str, object]:
    """Loss of each objective on the batch `rows` and the gradients of every parameter it reaches."""
    source = _source()
    dataset = source.dataset("train")
    batch = source.collate([dataset[i] for i in rows])
    backbone, itc, itm = _models(source)
    _, distilled_itc, distilled_itm = _models(source, alpha=0.4)
    _, merged_itc, merged_itm = _models(source, merging=TokenMergingConfig(vision_r=2, text_entry_r=4))
    scale = backbone.logit_scale

    def no_gather(features: FeatureCache) -> torch.Tensor:
        return contrastive_loss(features.image.embedding, features.text.embedding, scale(), gather=False)

    def joint(itc: ITCObjective, itm: ITMObjective):
        return lambda f: itc.forward_loss(batch, f).loss + itm.forward_loss(batch, f).loss

    # (loss, its ITM module, whether ITC reads ITM's gather); one process's reference of a joint step
    # gathers nothing
    runs = {
        "itc": (lambda f: itc.forward_loss(batch, f).loss, itm, False),
        "itm": (lambda f: itm.forward_loss(batch, f).loss, itm, False),
        "joint": (joint(itc, itm), itm, average_over_ranks),
        "joint_distilled": (joint(distilled_itc, distilled_itm), distilled_itm, average_over_ranks),
        "joint_merged": (joint(merged_itc, merged_itm), merged_itm, average_over_ranks),
        "itc_no_gather": (no_gather, itm, False),
    }
    out: dict[str, object] = {}
    for name, (loss_of, module, share) in runs.items():
        torch.manual_seed(7)  # the hard-negative draws
        module.zero_grad()
        loss = loss_of(FeatureCache(module.backbone, batch, share_global_rows=share))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        if average_over_ranks:  # what DDP does to replicated parameters
            for grad in grads.values():
                dist.all_reduce(grad)
                grad /= WORLD
        out[name] = (loss.detach(), grads)
    return out


def _worker(local_rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    rows = ITEMS[local_rank * LOCAL_B : (local_rank + 1) * LOCAL_B]
    torch.save(_losses_and_grads(rows, average_over_ranks=True), Path(out_dir) / f"rank{local_rank}.pt")


def test_two_ranks_of_batch_b_train_like_one_process_of_batch_2b(tmp_path: Path, one_thread):
    run_on_ranks(_worker, tmp_path, world=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _losses_and_grads(ITEMS, average_over_ranks=False)

    for name in ("itc", "itm", "joint", "joint_distilled", "joint_merged"):
        loss, grads = single[name]
        mean_rank_loss = torch.stack([rank[name][0] for rank in ranks]).mean()
        torch.testing.assert_close(mean_rank_loss, loss, **TOLERANCE)
        assert grads and set(ranks[0][name][1]) == set(grads), name
        for rank in ranks:
            for key, grad in grads.items():
                torch.testing.assert_close(rank[name][1][key], grad, **TOLERANCE, msg=f"{name}: {key}")
    # fusion and the ITM head learn only from ITM; the towers from both
    assert any(key.startswith("head.") for key in single["itm"][1])
    assert not any("fusion" in key for key in single["itc"][1])

    # scoring each rank's rows against its own columns only is a different (easier) objective
    loss, grads = single["itc"]
    no_gather = ranks[0]["itc_no_gather"]
    assert (torch.stack([rank["itc_no_gather"][0] for rank in ranks]).mean() - loss).abs() > 1e-2
    worst = max((no_gather[1][key] - grad).abs().max().item() for key, grad in grads.items())
    assert worst > 100 * TOLERANCE["atol"]


COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter_tensor", "scatter", "broadcast", "all_to_all")


def _count_collectives(local_rank: int, out_dir: str) -> None:
    """How many collectives a step of ITM, of ITC, and of both (sharing one gather) and their backward
    passes call, by kind."""
    torch.set_num_threads(1)
    source = _source()
    dataset = source.dataset("train")
    rows = ITEMS[local_rank * LOCAL_B : (local_rank + 1) * LOCAL_B]
    batch = source.collate([dataset[i] for i in rows])
    _, itc, itm = _models(source)
    steps = {"itm": ([itm], False), "itc": ([itc], False), "itc+itm": ([itc, itm], True)}
    calls = {name: _calls(batch, objectives, share) for name, (objectives, share) in steps.items()}
    torch.save(calls, Path(out_dir) / f"calls{local_rank}.pt")


def _calls(batch: dict, objectives: list, share: bool) -> dict[str, list[str]]:
    features = FeatureCache(objectives[0].backbone, batch, share_global_rows=share)
    calls: dict[str, list[str]] = {"forward": [], "backward": []}
    phase = "forward"
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counted(name: str):
        def call(*args, **kwargs):
            calls[phase].append(name)
            return originals[name](*args, **kwargs)

        return call

    for name in COLLECTIVES:
        setattr(dist, name, counted(name))
    try:
        torch.manual_seed(7)
        loss = sum(objective.forward_loss(batch, features).loss for objective in objectives)
        phase = "backward"
        loss.backward()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return calls


def test_itm_and_itc_wait_on_the_other_ranks_twice_forward_and_once_backward(tmp_path: Path, one_thread):
    """ITM: the integers (ids, caption ids, masks, padded to the text tower's length limit, so no
    collective agrees on a width), the features (captions, every fusion layer's image keys and values, the
    ITC embeddings); the backward sums the feature gradients once. ITC alone gathers its embeddings once
    each way; with ITM in the step it reads them from ITM's gather and adds no collective."""
    run_on_ranks(_count_collectives, tmp_path, world=WORLD)
    for r in range(WORLD):
        calls = torch.load(tmp_path / f"calls{r}.pt")
        for step in ("itm", "itc+itm"):
            assert calls[step]["forward"] == ["all_gather", "all_gather"], calls
            assert calls[step]["backward"] == ["all_reduce"], calls
        assert calls["itc"] == {"forward": ["all_gather"], "backward": ["all_reduce"]}, calls
