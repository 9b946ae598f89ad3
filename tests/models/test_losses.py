"""Losses: InfoNCE by hand (single and multi-positive, masked rows), temperature, gathering, distillation,
matching."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gloo_helpers import free_port

from iv2_lightning.models.distributed import gather_no_grad, gather_with_grad
from iv2_lightning.models.losses import CosineDistillLoss, InfoNCELoss, MatchingLoss


def nll(row: list[float], weights: list[float]) -> float:
    """-Σ w_j log softmax(row)_j, written out with math.exp/log."""
    lse = math.log(sum(math.exp(v) for v in row))
    return -sum(w * (v - lse) for v, w in zip(row, weights))


def test_infonce_2x2_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * 3.0  # scaled: the loss normalises its inputs
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]]) * 2.0
    loss = InfoNCELoss(temperature=0.5, learnable=False)(a, b)
    # logits a→b = a_n @ b_n.T / 0.5 and b→a = b_n @ a_n.T / 0.5
    ab = [[2.0, 1.2], [0.0, 1.6]]
    ba = [[2.0, 0.0], [1.2, 1.6]]
    expect_ab = (nll(ab[0], [1, 0]) + nll(ab[1], [0, 1])) / 2
    expect_ba = (nll(ba[0], [1, 0]) + nll(ba[1], [0, 1])) / 2
    assert loss.item() == pytest.approx((expect_ab + expect_ba) / 2, abs=1e-6)
    # identical to the cross-entropy form when there are no duplicate ids
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / 0.5
    ce = (F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.T, torch.arange(2))) / 2
    assert torch.allclose(loss, ce, atol=1e-6)


def test_infonce_3x3_multi_positive_by_hand():
    a = torch.eye(3)
    b = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    ids = torch.tensor([0, 0, 1])  # samples 0 and 1 share a video: both are positives of each other
    loss = InfoNCELoss(temperature=0.5, learnable=False)(a, b, sample_ids=ids)
    ab = [[2.0, 1.2, 0.0], [0.0, 1.6, 0.0], [0.0, 0.0, 2.0]]
    ba = [[2.0, 0.0, 0.0], [1.2, 1.6, 0.0], [0.0, 0.0, 2.0]]
    targets = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    expect_ab = sum(nll(r, w) for r, w in zip(ab, targets)) / 3
    expect_ba = sum(nll(r, w) for r, w in zip(ba, targets)) / 3
    assert loss.item() == pytest.approx((expect_ab + expect_ba) / 2, abs=1e-6)
    # distinct ids give back the single-positive loss
    distinct = InfoNCELoss(temperature=0.5, learnable=False)(a, b, sample_ids=torch.tensor([4, 7, 9]))
    plain = InfoNCELoss(temperature=0.5, learnable=False)(a, b)
    assert torch.allclose(distinct, plain, atol=1e-7)
    assert not math.isclose(loss.item(), plain.item(), abs_tol=1e-3)


def test_temperature_clamp_is_out_of_place():
    loss_fn = InfoNCELoss(temperature=1.0, temperature_range=(0.001, 0.5))
    assert loss_fn.temperature.item() == pytest.approx(0.5)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    with_clamp = loss_fn(a, b)
    assert loss_fn.temp.item() == 1.0  # the parameter itself is untouched
    at_half = InfoNCELoss(temperature=0.5, learnable=False)(a, b)
    assert torch.allclose(with_clamp, at_half, atol=1e-6)
    assert InfoNCELoss(temperature=1e-5).temperature.item() == pytest.approx(0.001)


def test_gradient_reaches_temperature_and_inputs():
    torch.manual_seed(0)
    loss_fn = InfoNCELoss(temperature=0.07)
    a = torch.randn(5, 8, requires_grad=True)
    b = torch.randn(5, 8, requires_grad=True)
    loss = loss_fn(a, b)
    loss.backward()
    assert loss_fn.temp.grad is not None and loss_fn.temp.grad.abs() > 0
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    # the gradient is the derivative: compare with a central finite difference
    h = 1e-4
    with torch.no_grad():
        up = InfoNCELoss(temperature=0.07 + h, learnable=False)(a, b)
        down = InfoNCELoss(temperature=0.07 - h, learnable=False)(a, b)
    assert loss_fn.temp.grad.item() == pytest.approx(((up - down) / (2 * h)).item(), rel=1e-2)
    fixed = InfoNCELoss(learnable=False)
    assert not any(p.requires_grad for p in fixed.parameters())


def test_infonce_errors():
    loss_fn = InfoNCELoss()
    with pytest.raises(ValueError, match=r"a and b must both be \[B, E\]; got \(4, 8\) and \(4, 6\)"):
        loss_fn(torch.randn(4, 8), torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"sample_ids must be \[B\] = \(4,\); got \(3,\)"):
        loss_fn(torch.randn(4, 8), torch.randn(4, 8), torch.arange(3))
    with pytest.raises(ValueError, match=r"temperature_range must satisfy 0 < low <= high; got \(0.5, 0.1\)"):
        InfoNCELoss(temperature_range=(0.5, 0.1))


def test_masked_infonce_equals_infonce_on_the_valid_rows():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    ids = torch.tensor([0, 1, 0, 2, 3, 1, 4])
    valid = torch.tensor([True, True, False, True, True, True, False])
    loss_fn = InfoNCELoss(temperature=0.1, learnable=False)
    ref = loss_fn(a[valid], b[valid], ids[valid])
    got = loss_fn(a, b, ids, valid)
    assert torch.allclose(got, ref, atol=1e-6)
    # rows that are not valid may hold anything, even NaN
    a2 = a.clone()
    a2[2] = float("nan")
    assert torch.allclose(loss_fn(a2, b, ids, valid), ref, atol=1e-6)
    assert loss_fn(a, b, ids, torch.tensor([True] + [False] * 6)) is None
    # without ids the pairs are the diagonal, with or without a mask
    assert torch.allclose(loss_fn(a, b, valid=valid), loss_fn(a[valid], b[valid]), atol=1e-6)
    with pytest.raises(ValueError, match=r"valid must be \[B\] = \(7,\); got \(3,\)"):
        loss_fn(a, b, ids, valid[:3])


def test_gather_is_identity_on_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x
    ids = torch.arange(3)
    assert gather_no_grad(ids) is ids
    # and the gathering loss equals the local loss
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.equal(InfoNCELoss(gather_distributed=True)(a, b), InfoNCELoss()(a, b))


def test_cosine_distill_loss():
    loss_fn = CosineDistillLoss()
    x = torch.randn(2, 3, 8)
    assert loss_fn(x, 5.0 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss_fn(x, -x).item() == pytest.approx(4.0, abs=1e-6)
    e0 = torch.tensor([[[1.0, 0.0]]])
    e1 = torch.tensor([[[0.0, 2.0]]])
    assert loss_fn(e0, e1).item() == pytest.approx(2.0, abs=1e-6)
    # with a mask only the counted tokens matter: token 0 equal (0), token 1 opposite (4), token 2 ignored
    pred = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[True, True, False]])
    assert loss_fn(pred, target, mask).item() == pytest.approx(2.0, abs=1e-6)
    assert loss_fn(pred, target).item() == pytest.approx(2.0, abs=1e-6)  # (0 + 4 + 2) / 3
    t = torch.randn(2, 3, 8, requires_grad=True)
    loss_fn(torch.randn(2, 3, 8, requires_grad=True), t).backward()
    assert t.grad is None  # the teacher side is detached
    with pytest.raises(ValueError, match=r"mask must be \(2, 3\); got \(2, 2\)"):
        loss_fn(x, x, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(x, x[:, :2])


def test_matching_loss_by_hand():
    pos = torch.tensor([[0.0, 1.0]])
    neg = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    loss = MatchingLoss()(pos, neg)
    expect = (nll([0.0, 1.0], [0, 1]) + nll([2.0, 0.0], [1, 0]) + nll([0.0, 0.0], [1, 0])) / 3
    assert loss.item() == pytest.approx(expect, abs=1e-6)
    with pytest.raises(ValueError, match=r"matching logits must be \[P, 2\] and \[N, 2\]"):
        MatchingLoss()(pos, torch.randn(2, 3))


# ---------------------------------------------------------------- two processes (gloo)


def _ddp_worker(rank: int, world: int, port: int, a, b, ids, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = a.shape[0] // world
        a_r = a[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        b_r = b[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        loss_fn = InfoNCELoss(temperature=0.1, gather_distributed=True)
        loss = loss_fn(a_r, b_r, None if ids is None else ids[rank * n : (rank + 1) * n])
        loss.backward()
        torch.save(
            {"loss": loss.detach(), "a": a_r.grad, "b": b_r.grad, "t": loss_fn.temp.grad},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("with_ids", [True, False])
def test_gather_with_grad_two_processes_matches_full_batch(tmp_path, with_ids):
    mp = pytest.importorskip("torch.multiprocessing")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    # duplicates across the two ranks' halves; without ids the positives sit at rank * B + i
    ids = torch.tensor([0, 1, 2, 2, 0, 5]) if with_ids else None
    world = 2
    mp.spawn(_ddp_worker, args=(world, free_port(), a, b, ids, str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    a_full, b_full = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss_fn = InfoNCELoss(temperature=0.1)
    full = loss_fn(a_full, b_full, ids)
    full.backward()
    # the mean of the ranks' losses is the full-batch loss (each rank owns half the rows)
    assert torch.allclose((res[0]["loss"] + res[1]["loss"]) / 2, full.detach(), atol=1e-5)
    # each rank's input gradient is the sum over ranks' losses: world x the full-batch gradient of the mean
    grad_a = torch.cat([r["a"] for r in res]) / world
    grad_b = torch.cat([r["b"] for r in res]) / world
    assert torch.allclose(grad_a, a_full.grad, atol=1e-5)
    assert torch.allclose(grad_b, b_full.grad, atol=1e-5)
    # the temperature gradient averaged over ranks (what DDP does) is the full-batch gradient
    assert torch.allclose((res[0]["t"] + res[1]["t"]) / 2, loss_fn.temp.grad, atol=1e-5)
