"""ContrastiveStage: every loss term, missing modalities, gradients, freezing, evaluation and learning."""

from __future__ import annotations

import math
from dataclasses import replace

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from gloo_helpers import free_port
from stage_helpers import TINY

from iv2_lightning.data.batch import VideoBatch, VideoCollate, VideoSample
from iv2_lightning.data.datamodules import SyntheticVideoDataModule
from iv2_lightning.data.synthetic import DIRECTIONS, SyntheticVideoDataset, direction_prompts
from iv2_lightning.metrics import retrieval_scores
from iv2_lightning.models.losses import InfoNCELoss
from iv2_lightning.stages.contrastive import ContrastiveStage

SMALL = dict(
    encoder=dict(TINY),
    text=dict(dim=64, depth=1, num_heads=2),
    audio=dict(dim=64, depth=1, num_heads=2),
    fusion=dict(dim=64, num_heads=2),
    embed_dim=32,
)
CONTRASTIVE_TERMS = ("vtc", "atc", "vac", "vsc", "avtc")
ALL_TERMS = (*CONTRASTIVE_TERMS, "vtm", "mlm")


def stage(**kw) -> ContrastiveStage:
    torch.manual_seed(0)
    return ContrastiveStage(**{**SMALL, **kw})


_SAMPLES: list[VideoSample] = []


def synthetic_samples(n: int = 8) -> list[VideoSample]:
    """Synthetic clips (rendered once per session); the first four share sample ids pairwise."""
    if len(_SAMPLES) < n:
        ds = SyntheticVideoDataset(split="test", size=64, num_frames=8, image_size=32, seed=3)
        _SAMPLES[:] = [ds[i] for i in range(max(n, 8))]
    out = [replace(s, meta=dict(s.meta)) for s in _SAMPLES[:n]]
    for i in range(min(n, 4)):
        out[i] = replace(out[i], sample_id=100 + i // 2)  # 100, 100, 101, 101: multi-positive rows
    return out


def batch_of(samples: list[VideoSample]) -> VideoBatch:
    return VideoCollate(max_text_length=48)(samples)


def full_batch(n: int = 8) -> VideoBatch:
    return batch_of(synthetic_samples(n))


def finite_terms(out: dict[str, torch.Tensor]) -> None:
    for k, v in out.items():
        assert torch.isfinite(v).all(), (k, v)


# ----------------------------------------------------------------------------- losses


def test_full_batch_every_term_is_finite_and_summed():
    s = stage(mlm=0.5).train()
    out = s.compute_loss(full_batch())
    finite_terms(out)
    assert set(ALL_TERMS) <= set(out)
    expect = sum(s.model.loss_weights[k] * out[k] for k in ALL_TERMS)
    assert torch.allclose(out["loss"], expect)
    assert out["temperature"].item() == pytest.approx(0.07)
    assert "gate_video_text" in out and "gate_text_audio" in out
    assert all(0 < out[k].item() < 1 for k in out if k.startswith("gate_"))


def test_missing_modalities_for_some_rows():
    samples = synthetic_samples(8)
    samples[1] = replace(samples[1], audio=None, speech=None)
    samples[4] = replace(samples[4], audio=None)
    samples[5] = replace(samples[5], caption=None)
    samples[6] = replace(samples[6], speech=None)
    s = stage(mlm=0.5).train()
    out = s.compute_loss(batch_of(samples))
    finite_terms(out)
    assert set(ALL_TERMS) <= set(out)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in s.parameters() if p.grad is not None)


def test_absent_rows_do_not_change_the_result():
    samples = synthetic_samples(6)
    samples[2] = replace(samples[2], audio=None, speech=None)
    s = stage().eval()
    b1 = batch_of(samples)
    b2 = batch_of(samples)
    # whatever the padding of absent rows holds, nothing changes
    b2.audio[2] = float("nan")
    b2.speech_ids[2] = 77
    torch.manual_seed(1)
    out1 = s.compute_loss(b1)
    torch.manual_seed(1)
    out2 = s.compute_loss(b2)
    for k in out1:
        assert torch.allclose(out1[k], out2[k], atol=1e-6), k


def test_terms_skipped_when_a_modality_is_missing_everywhere():
    samples = [replace(x, audio=None, speech=None) for x in synthetic_samples(6)]
    s = stage().train()
    out = s.compute_loss(batch_of(samples))
    finite_terms(out)
    assert {"vtc", "vtm"} <= set(out)
    assert not {"atc", "vac", "avtc", "vsc"} & set(out)
    out["loss"].backward()


def test_terms_skipped_with_fewer_than_two_rows():
    samples = synthetic_samples(5)
    samples = [replace(x, audio=None) if i else x for i, x in enumerate(samples)]  # audio in row 0 only
    samples = [replace(x, speech=None) if i != 3 else x for i, x in enumerate(samples)]  # speech in row 3
    s = stage().train()
    out = s.compute_loss(batch_of(samples))
    finite_terms(out)
    assert not {"atc", "vac", "avtc", "vsc"} & set(out)
    assert "vtc" in out


def test_batch_without_any_pair_still_backpropagates():
    samples = [replace(x, audio=None, speech=None, caption=None) for x in synthetic_samples(3)]
    s = stage().train()
    out = s.compute_loss(batch_of(samples))
    assert out["loss"].item() == 0.0 and out["loss"].requires_grad
    assert not set(ALL_TERMS) & set(out)
    out["loss"].backward()


def test_vtm_skipped_when_every_row_shares_one_id():
    samples = [replace(x, sample_id=7) for x in synthetic_samples(4)]
    out = stage().train().compute_loss(batch_of(samples))
    finite_terms(out)
    assert "vtm" not in out and "vtc" in out


def test_gradients_reach_every_module():
    s = stage(mlm=0.5).train()
    s.compute_loss(full_batch())["loss"].backward()
    missing = [n for n, p in s.named_parameters() if p.grad is None]
    assert not missing  # every parameter takes part (DDP without find_unused_parameters)
    for name in (
        "video_encoder",
        "text_encoder",
        "audio_encoder",
        "fusion",
        "video_proj",
        "text_proj",
        "audio_proj",
        "av_fusion",
        "itm_head",
        "mlm_head",
        "contrastive",
    ):
        total = sum(float(p.grad.abs().sum()) for p in getattr(s.model, name).parameters())
        assert total > 0, name


def _ddp_worker(rank, world, port, cases, stage_samples, out_dir):
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),  # a mismatched collective fails instead of hanging
    )
    try:
        results = []
        for a, b, ids, valid, split in cases:
            rows = slice(sum(split[:rank]), sum(split[: rank + 1]))
            a_r = a[rows].clone().requires_grad_(True)
            b_r = b[rows].clone().requires_grad_(True)
            loss_fn = InfoNCELoss(temperature=0.1, learnable=False, gather_distributed=True)
            loss = loss_fn(a_r, b_r, ids[rows], valid[rows])
            loss.backward()
            results.append({"loss": loss.detach(), "a": a_r.grad, "b": b_r.grad})
        # the whole stage, with a rank whose batch is shorter and has no audio or speech at all
        s = stage().eval()
        with torch.no_grad():
            out = s.compute_loss(batch_of(stage_samples[rank]))
        results.append({k: v for k, v in out.items() if not k.startswith("gate_")})
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_masked_infonce_two_processes_matches_one(tmp_path):
    """Two ranks with different numbers of valid rows, different batch sizes, or no valid row at
    all on one rank: after DDP's gradient averaging (a mean over ranks) the gradients are those of
    the mean loss over every valid row of the global batch."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    ids = torch.tensor([0, 1, 2, 3, 0, 5, 6, 1])
    t, f = True, False
    cases = [
        (a, b, ids, torch.tensor([t, t, t, f, t, f, f, t]), (4, 4)),  # 3 valid rows on rank 0, 2 on rank 1
        (a, b, ids, torch.tensor([t, t, f, t, t, f, f, t]), (5, 3)),  # batches of 5 and 3
        (a, b, ids, torch.tensor([t, t, f, t, f, f, f, f]), (4, 4)),  # nothing valid on rank 1
    ]
    samples = synthetic_samples(7)
    stage_samples = (samples[:4], [replace(x, audio=None, speech=None) for x in samples[4:]])
    world = 2
    mp.spawn(
        _ddp_worker, args=(world, free_port(), cases, stage_samples, str(tmp_path)), nprocs=world, join=True
    )
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for i, (a, b, ids, valid, _) in enumerate(cases):
        a_full, b_full = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        loss = InfoNCELoss(temperature=0.1, learnable=False)(a_full, b_full, ids, valid)
        loss.backward()
        assert torch.allclose((res[0][i]["loss"] + res[1][i]["loss"]) / world, loss, atol=1e-6), i
        for key, full in (("a", a_full.grad), ("b", b_full.grad)):
            got = torch.cat([res[r][i][key] for r in range(world)]) / world
            assert torch.allclose(got, full, atol=1e-6), (i, key)
    # the stage: both ranks joined every contrastive term (no hang) and report the same terms;
    # averaged over ranks they equal the terms of the concatenated batch in one process
    per_rank = [res[r][-1] for r in range(world)]
    assert set(per_rank[0]) == set(per_rank[1]) >= {"vtc", "atc", "avtc", "vac", "vsc"}
    with torch.no_grad():
        one = stage().eval().compute_loss(batch_of(stage_samples[0] + stage_samples[1]))
    for k in ("vtc", "atc", "avtc", "vac", "vsc"):
        assert torch.allclose((per_rank[0][k] + per_rank[1][k]) / world, one[k], atol=1e-4), k


# ----------------------------------------------------------------------------- construction


def test_modules_follow_the_weights():
    s = stage(atc=0, vac=0, avtc=0, vtm=0)
    m = s.model
    assert m.audio_encoder is None and m.audio_proj is None and m.av_fusion is None
    assert m.fusion is None and m.itm_head is None and m.mlm_head is None
    out = s.train().compute_loss(full_batch(4))
    assert set(out) & set(ALL_TERMS) == {"vtc", "vsc"}
    s = stage(mlm=1.0)
    m = s.model
    assert m.fusion is not None and "audio" in m.fusion.input_dims and m.mlm_head is not None
    assert s.hparams["mlm"] == 1.0 and s.hparams["text"]["dim"] == 64
    assert s.stage_name == "stage2"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(vtc=-1.0), "loss weights"),
        (dict(vtc=0, atc=0, vac=0, vsc=0, avtc=0, vtm=0), "at least one"),
        (dict(video_mask_ratio=1.0), "video_mask_ratio"),
        (dict(zeroshot_prompts={"a": ["x"]}, label_names=["a", "b"]), "label_names"),
        (dict(text_pooling="max"), "text_pooling"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        stage(**kw)


def test_freeze_text_encoder_keeps_its_weights():
    s = stage(freeze=["text_encoder"]).train()
    before_text = {n: p.detach().clone() for n, p in s.model.text_encoder.named_parameters()}
    before_video = {n: p.detach().clone() for n, p in s.model.video_encoder.named_parameters()}
    opt = s.configure_optimizers()["optimizer"]
    for _ in range(2):
        opt.zero_grad()
        s.compute_loss(full_batch())["loss"].backward()
        opt.step()
    assert all(torch.equal(p, before_text[n]) for n, p in s.model.text_encoder.named_parameters())
    assert any(not torch.equal(p, before_video[n]) for n, p in s.model.video_encoder.named_parameters())


def test_loss_weights_default_to_what_the_data_provides():
    s = stage(data_fields=["caption", "label"])
    assert {k for k, w in s.model.loss_weights.items() if w > 0} == {"vtc", "vtm"}
    assert s.model.audio_encoder is None and s.hparams["atc"] is None
    assert s.batch_contract() == {"vtc": ("video", "caption"), "vtm": ("video", "caption")}
    every = stage(data_fields=["audio", "caption", "speech"])
    assert every.model.loss_weights == stage().model.loss_weights  # unknown data: every term, as before
    assert set(every.batch_contract()) == {"vtc", "atc", "vac", "vsc", "avtc", "vtm"}


def test_the_batch_contract_names_the_term_and_the_field():
    s = stage(atc=0.5, data_fields=["caption"])  # an explicit weight stays on whatever the data has
    with pytest.raises(ValueError, match=r"term 'atc' needs audio.*data_fields"):
        s.setup("fit")
    s = stage(vsc=0.0)  # the data's fields unknown: the first training batch is checked
    no_audio = batch_of([replace(x, audio=None) for x in synthetic_samples(4)])
    with pytest.raises(ValueError, match=r"term 'vac' needs audio.*first training batch"):
        s.on_train_batch_start(no_audio, 0)


def test_pictures_come_from_a_callback_that_encodes_the_first_batch():
    from iv2_lightning.callbacks.pictures import ContrastivePictures
    from iv2_lightning.visualize import contrastive_pictures

    assert stage(visual_clips=0).configure_callbacks() == []
    s = stage(visual_clips=3).eval()
    (callback,) = s.configure_callbacks()
    assert isinstance(callback, ContrastivePictures) and callback.clips == 3
    samples = [replace(x, video=x.video[:, :4]) for x in synthetic_samples(4)]  # the encoder's frames
    samples[1] = replace(samples[1], caption=None)
    b = batch_of(samples)
    with torch.no_grad():
        outputs = s.compute_loss(b)  # what the evaluation step returns too
        record = callback.record(s.model, b, outputs)
        video_emb = s.model.encode_video(b.video[:3])
    assert torch.allclose(record["video_emb"], video_emb, atol=1e-6)
    assert record["text_present"].tolist() == [True, False, True] and not record["text_emb"][1].any()
    assert record["attention"].shape[0] == 3 and set(record["gates"]) >= {"video_text", "text_video"}
    images, _ = contrastive_pictures(record)
    assert {"similarity", "retrieval_topk", "pool_attention", "fusion_gates"} <= set(images)


# ----------------------------------------------------------------------------- encoders, evaluation


def test_encoders_return_normalised_embeddings():
    s = stage().eval()
    b = full_batch(4)
    with torch.no_grad():
        v = s.model.encode_video(b.video)
        t_ids = s.model.encode_text(b.caption_ids, b.caption_mask)
        t_str = s.model.encode_text(b.captions)
        a = s.model.encode_audio(b.audio, b.audio_frame_mask)
    assert s.class_prompts() is None  # no prompts of its own, no trainer and DataModule to ask
    s = stage(zeroshot_prompts=direction_prompts()).eval()
    with torch.no_grad():
        classes = s.model.encode_prompts(s.class_prompts())
    for x in (v, t_ids, a):
        assert x.shape == (4, 32) and torch.allclose(x.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(t_ids, t_str, atol=1e-5)  # padding does not change a caption's embedding
    assert classes.shape == (len(DIRECTIONS), 32)
    assert s.label_names == list(DIRECTIONS)


def test_custom_prompts_and_label_order():
    prompts = {"cat": ["a cat", "a photo of a cat"], "dog": ["a dog"]}
    s = stage(zeroshot_prompts=prompts, label_names=["dog", "cat"]).eval()
    with torch.no_grad():
        classes = s.model.encode_prompts(s.class_prompts())
        dog = s.model.encode_text(["a dog"])[0]
    assert s.label_names == ["dog", "cat"]
    assert torch.allclose(classes[0], dog, atol=1e-5)


def test_retrieval_scores_with_perfect_embeddings():
    ids = torch.tensor([0, 1, 2, 3, 0])
    emb = torch.nn.functional.one_hot(ids, 8).float()
    m = retrieval_scores(emb, emb, ids)
    keys = [
        f"{d}_{k}{s}"
        for d in ("t2v", "v2t")
        for k in ("r1", "r5", "r10", "medr", "meanr")
        for s in ("", "_dsl")
    ]
    assert set(m) == set(keys)
    assert m["t2v_r1"] == 100.0 and m["v2t_r1"] == 100.0 and m["t2v_medr"] == 1.0
    assert m["t2v_r1_dsl"] == 100.0
    # only present texts are queries
    present = torch.tensor([True, False, True, True, True])
    assert retrieval_scores(emb, emb, ids, present)["v2t_r1"] == 100.0


def test_trainer_fit_validate_test_log_the_metrics(tmp_path):
    dm = SyntheticVideoDataModule(
        num_frames=8, image_size=32, batch_size=4, train_size=8, val_size=8, test_size=8, max_text_length=48
    )
    s = stage(mlm=0.5)
    trainer = L.Trainer(
        fast_dev_run=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(s, dm)
    assert trainer.global_step == 2
    trainer.validate(s, dm, verbose=False)
    metrics = trainer.callback_metrics
    for key in (
        "val/loss",
        "val/vtc",
        "val/t2v_r1",
        "val/t2v_r5",
        "val/t2v_r10",
        "val/t2v_medr",
        "val/v2t_r1",
        "val/v2t_r5",
        "val/v2t_r10",
        "val/t2v_r5_dsl",
        "val/v2t_r1_dsl",
        "val/zs_acc",
        "val/av_t2v_r1",  # caption -> clip with the sound (the AVTC embedding)
        "val/av_v2t_r1",
        "val/gate_video_text",
        "val/gate_text_video",
    ):
        assert key in metrics, key
        assert math.isfinite(float(metrics[key])), key
    assert 0 <= float(metrics["val/zs_acc"]) <= 100
    trainer.test(s, dm, verbose=False)
    assert "test/t2v_r1" in trainer.callback_metrics and "test/zs_acc" in trainer.callback_metrics
    # a checkpoint rebuilds the same stage from its saved hyperparameters
    trainer.save_checkpoint(tmp_path / "stage2.ckpt")
    loaded = ContrastiveStage.load_from_checkpoint(tmp_path / "stage2.ckpt").eval()
    video = full_batch(2).video
    with torch.no_grad():
        assert torch.allclose(loaded.model.encode_video(video), s.eval().model.encode_video(video), atol=1e-6)
    assert loaded.hparams["mlm"] == 0.5 and loaded.model.mlm_head is not None


def test_zero_shot_skips_labels_beyond_the_prompted_classes(tmp_path):
    """Two prompted classes, data labelled with four directions: the test loop neither crashes nor
    counts the clips whose label has no prompt (one warning says so)."""
    dm = SyntheticVideoDataModule(
        num_frames=8, image_size=32, batch_size=4, train_size=0, val_size=0, test_size=8, max_text_length=48
    )
    s = stage(zeroshot_prompts={"left": ["moving left"], "right": ["moving right"]}, visual_clips=0)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    with pytest.warns(UserWarning, match="only 2 classes have prompts"):
        trainer.test(s, dm, verbose=False)
    assert 0 <= float(trainer.callback_metrics["test/zs_acc"]) <= 100
    assert "test/t2v_r1" in trainer.callback_metrics
    # without prompts of its own or of the data there is no zero-shot metric, and no error
    s = stage(visual_clips=0)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.test(s, dataloaders=torch.utils.data.DataLoader([full_batch(4)], batch_size=None), verbose=False)
    assert "test/zs_acc" not in trainer.callback_metrics and "test/t2v_r1" in trainer.callback_metrics


# ----------------------------------------------------------------------------- learning


def _chance_r5(ids: torch.Tensor) -> float:
    """Expected T2V R@5 (percent) of random scores: 1 - C(N-p, 5) / C(N, 5) per query."""
    n = len(ids)
    hits = [1 - math.comb(n - int((ids == i).sum()), 5) / math.comb(n, 5) for i in ids]
    return 100 * sum(hits) / n


@pytest.mark.slow
def test_learns_on_synthetic_data():
    """All terms on, the stage's own AdamW and warmup-cosine schedule, 100 steps of 16 clips: VTC
    leaves its plateau at ln(16) (both towers start nearly constant, so it sits there for ~40
    steps) and falls by more than 30 %; held-out text-to-video R@5 is well above chance."""
    torch.manual_seed(SEED)
    steps, bs = 100, 16
    dm = SyntheticVideoDataModule(
        num_frames=8,
        image_size=32,
        batch_size=bs,
        train_size=320,
        val_size=128,
        test_size=0,
        max_text_length=48,
    )
    dm.setup()
    train, val = list(dm.train_dataloader()), list(dm.val_dataloader())
    s = stage(embed_dim=64, lr=1e-3, warmup=20)
    cfg = s.configure_optimizers()  # no trainer: the cosine spans 1000 steps, barely decaying here
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    s.train()
    losses = []
    for i in range(steps):
        out = s.compute_loss(train[i % len(train)])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sched.step()
        losses.append(out["vtc"].item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    s.eval()
    with torch.no_grad():
        v = torch.cat([s.model.encode_video(b.video) for b in val])
        t = torch.cat([s.model.encode_text(b.caption_ids, b.caption_mask) for b in val])
    ids = torch.cat([b.sample_id for b in val])
    m = retrieval_scores(v, t, ids)
    chance = _chance_r5(ids)
    print(f"vtc {first:.3f} -> {last:.3f}; val t2v R@5 {m['t2v_r5']:.1f} (chance {chance:.1f})")
    assert last < 0.7 * first
    assert m["t2v_r5"] > 2 * chance


SEED = 0
