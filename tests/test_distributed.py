"""Two CPU processes on gloo, the way DDP runs them: the contrastive losses give the full-batch loss
and gradients, the evaluation metrics the full-set numbers, and the DataModules' loaders shard the
data without overlap.

All checks run in one ``torch.multiprocessing.spawn`` of two ranks (a start costs seconds of
imports); each rank writes what it saw and the tests compare it with one process on the full batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gloo_helpers import free_port, join_gloo
from torch import nn

from iv2_lightning.metrics import RetrievalMetric, ZeroShotAccuracy
from iv2_lightning.models.losses import InfoNCELoss

pytestmark = pytest.mark.slow  # one spawn of two ranks (~15 s on two cores), shared by the tests

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
ROWS = 4  # per rank for InfoNCELoss (all_gather needs equal shapes)
IDS = torch.tensor([0, 1, 2, 3, 2, 5, 0, 7])  # duplicates within and across the ranks' halves
UNEVEN = ((0, 4), (4, 7))  # masked InfoNCE: rank 0 has 4 rows, rank 1 has 3 (a dropped clip)
VALID = torch.tensor([True, False, True, True, True, True, False])
SYNTH_SIZE, SYNTH_BATCH, EPOCHS = 12, 2, 2


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"xa": torch.randn(WORLD * ROWS, 6, generator=g), "xb": torch.randn(WORLD * ROWS, 7, generator=g)}


class Towers(nn.Module):
    """Two linear encoders and the loss (its temperature is a parameter DDP averages too)."""

    def __init__(self, gather: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(7, 5)
        self.loss = InfoNCELoss(temperature=0.1, gather_distributed=gather)

    def forward(self, xa, xb, ids=None):
        return self.loss(self.a(xa), self.b(xb), ids)


class MaskedTowers(Towers):
    """The stage-2 loss, InfoNCE with a validity mask: rows may be invalid and ranks may hold
    different counts."""

    def forward(self, xa, xb, ids, valid):
        return self.loss(self.a(xa), self.b(xb), ids, valid)


def _match(tokens: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """A stand-in matching head that zero padding does not change (sums of the tokens)."""
    return tokens["video"].sum(dim=(1, 2)) * tokens["text"].sum(dim=(1, 2))


def _eval_batches() -> list[dict[str, torch.Tensor]]:
    """Two evaluation batches (one per rank, as UNEVEN): 4 and 3 clips, 2 and 3 tokens per clip, a
    clip without caption, labels beyond the 3 classes."""
    g = torch.Generator().manual_seed(1)
    video = torch.nn.functional.normalize(torch.randn(7, 4, generator=g), dim=-1)
    text = torch.nn.functional.normalize(video + torch.randn(7, 4, generator=g), dim=-1)
    present = torch.tensor([True, True, False, True, True, True, True])
    labels = torch.tensor([0, 1, 2, 5, 1, -100, 2])
    out = []
    for (lo, hi), width in zip(UNEVEN, (2, 3)):
        n = hi - lo
        tokens = {m: torch.randn(n, width, 3, generator=g) for m in ("video", "text")}
        out.append(
            {
                "args": (video[lo:hi], text[lo:hi], IDS[lo:hi], present[lo:hi]),
                "tokens": tokens,
                "masks": {m: torch.ones(n, width, dtype=torch.bool) for m in tokens},
                "labels": labels[lo:hi],
                "classes": torch.eye(3, 4),
            }
        )
    return out


def _evaluate(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    retrieval, zero_shot = RetrievalMetric(rerank_k=2, match=_match), ZeroShotAccuracy()
    for b in batches:
        retrieval.update(*b["args"], b["tokens"], b["masks"])
        zero_shot.update(b["args"][0], b["classes"], b["labels"])
    return {**retrieval.compute(), "zs_acc": zero_shot.compute()}


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n.removeprefix("module."): p.grad.detach().clone() for n, p in module.named_parameters()}


def _ddp_step(module: nn.Module, *inputs) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(module)
    loss = ddp(*inputs)
    loss.backward()  # DDP averages the gradients over the ranks
    return {"loss": loss.detach(), "grads": _grads(ddp)}


def _record_sharding(rank: int) -> list[tuple[int, list[int]]]:
    """Fit a do-nothing module with Lightning's DDP on the synthetic DataModule; return (epoch, clip
    indices) of every training batch this rank saw."""
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from iv2_lightning.data import SyntheticVideoDataModule
    from iv2_lightning.estimate import parse_config

    # the strategy of configs/strategy/ddp.yaml, as `iv2 fit --config ... --config` builds it
    strategy = parse_config([ROOT / "configs/stage2/tiny.yaml", ROOT / "configs/strategy/ddp.yaml"])[
        "trainer"
    ]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DDPStrategy"

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))
            self.seen: list[tuple[int, list[int]]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, [m["index"] for m in batch.meta]))
            return (self.w * batch.video.float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = SyntheticVideoDataModule(
        num_frames=8,
        image_size=32,
        batch_size=SYNTH_BATCH,
        train_size=SYNTH_SIZE,
        val_size=0,
        test_size=0,
        modalities=[],
    )
    model = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=DDPStrategy(**strategy["init_args"].as_dict()),  # gloo: Lightning's choice on the CPU
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, dm)
    return model.seen


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    join_gloo(rank, port, WORLD)
    try:
        d = _data()
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        out = {
            "infonce_ids": _ddp_step(Towers(gather=True), d["xa"][rows], d["xb"][rows], IDS[rows]),
            "infonce_diagonal": _ddp_step(Towers(gather=True), d["xa"][rows], d["xb"][rows]),
        }
        lo, hi = UNEVEN[rank]
        out["masked"] = _ddp_step(
            MaskedTowers(gather=True), d["xa"][lo:hi], d["xb"][lo:hi], IDS[lo:hi], VALID[lo:hi]
        )
        out["metrics"] = _evaluate([_eval_batches()[rank]])
        out["seen"] = _record_sharding(rank)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    mp = pytest.importorskip("torch.multiprocessing")
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _full_batch(module: nn.Module, *inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = module(*inputs)
    loss.backward()
    return loss.detach(), _grads(module)


@pytest.mark.parametrize("key", ["infonce_ids", "infonce_diagonal"])
def test_infonce_across_two_ranks_equals_one_process_on_the_full_batch(ranks, key):
    d = _data()
    ids = IDS if key == "infonce_ids" else None
    loss, grads = _full_batch(Towers(gather=False), d["xa"], d["xb"], ids)
    # every rank's loss covers its own rows against every rank's columns: their mean is the full loss
    assert torch.allclose(sum(r[key]["loss"] for r in ranks) / WORLD, loss, atol=1e-5)
    for r in ranks:  # DDP's averaged gradients: those of the full batch, on every rank
        assert r[key]["grads"].keys() == grads.keys()
        for name, g in grads.items():
            assert torch.allclose(r[key]["grads"][name], g, atol=1e-5), (key, name)
    assert grads["loss.temp"].abs().item() > 0 and grads["a.weight"].abs().sum() > 0


def test_masked_infonce_with_uneven_ranks_and_invalid_rows_equals_the_full_batch(ranks):
    d = _data()
    n = UNEVEN[-1][1]
    loss, grads = _full_batch(MaskedTowers(gather=False), d["xa"][:n], d["xb"][:n], IDS[:n], VALID)
    assert torch.allclose(sum(r["masked"]["loss"] for r in ranks) / WORLD, loss, atol=1e-5)
    for r in ranks:
        for name, g in grads.items():
            assert torch.allclose(r["masked"]["grads"][name], g, atol=1e-5), name


def test_metrics_across_two_ranks_equal_one_process_on_every_batch(ranks):
    """Ranks with different numbers of clips and of tokens per clip: every rank computes the numbers
    of the whole evaluation set (cosine, _dsl, _match and zero-shot)."""
    with pytest.warns(UserWarning, match="only 3 classes"):
        one = _evaluate(_eval_batches())
    assert {"t2v_r1", "v2t_meanr_dsl", "t2v_r1_match", "zs_acc"} <= set(one)
    for r in ranks:
        assert set(r["metrics"]) == set(one)
        for k, v in one.items():
            assert torch.allclose(r["metrics"][k].float(), v.float(), atol=1e-5), k


def test_ddp_shards_the_datamodule_without_overlap(ranks):
    """With the strategy of configs/strategy/ddp.yaml, Lightning puts a DistributedSampler under the
    DataModule's loader (the base class's loader, shared by the synthetic and annotation-file
    DataModules): per epoch the two ranks see disjoint halves of the data, and a new order each epoch."""
    per_rank = SYNTH_SIZE // WORLD
    for epoch in range(EPOCHS):
        seen = [[i for e, batch in r["seen"] if e == epoch for i in batch] for r in ranks]
        assert all(len(s) == per_rank == len(set(s)) for s in seen), seen
        assert not set(seen[0]) & set(seen[1])
        assert set(seen[0]) | set(seen[1]) == set(range(SYNTH_SIZE))
    orders = [[i for e, batch in ranks[0]["seen"] if e == epoch for i in batch] for epoch in range(EPOCHS)]
    assert orders[0] != orders[1]  # reshuffled per epoch (DistributedSampler.set_epoch)
