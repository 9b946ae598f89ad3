"""CrossModalFusion: shapes, invariance to padded/absent tokens, gating, gradients, errors."""

from __future__ import annotations

import pytest
import torch

from iv2_lightning.models.fusion import CrossModalFusion, FusionOutput

DIMS = {"video": 24, "text": 16, "audio": 12, "speech": 16}
LENS = {"video": 6, "text": 5, "audio": 4, "speech": 3}
B = 3


def make_model(**kw) -> CrossModalFusion:
    torch.manual_seed(0)
    kw.setdefault("dim", 32)
    kw.setdefault("depth", 2)
    kw.setdefault("num_heads", 4)
    kw.setdefault("backend", "math")
    return CrossModalFusion(DIMS, **kw).eval()


def make_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = {m: torch.randn(B, LENS[m], d, generator=g) for m, d in DIMS.items()}
    masks = {m: torch.ones(B, LENS[m], dtype=torch.bool) for m in DIMS}
    masks["text"][0, 3:] = False  # sample 0 has 3 real text tokens
    masks["video"][2, 4:] = False
    present = {m: torch.ones(B, dtype=torch.bool) for m in DIMS}
    present["audio"][1] = False  # sample 1 has no audio
    present["speech"][0] = False
    return tokens, masks, present


def outputs_close(o1: FusionOutput, o2: FusionOutput, names, atol=1e-6):
    for m in names:
        real = o1.masks[m]
        assert torch.equal(real, o2.masks[m])
        assert torch.allclose(o1.tokens[m][real], o2.tokens[m][real], atol=atol), m
    assert torch.allclose(o1.pooled, o2.pooled, atol=atol)
    for q in o1.gates:
        for s in o1.gates[q]:
            assert torch.allclose(o1.gates[q][s], o2.gates[q][s], atol=atol), (q, s)


def test_shapes_and_fused_mask():
    model = make_model()
    tokens, masks, present = make_inputs()
    out = model(tokens, masks, present)
    total = sum(LENS.values())
    assert out.fused.shape == (B, total, 32)
    assert out.fused_mask.shape == (B, total)
    assert out.pooled.shape == (B, 32)
    for m in DIMS:
        assert out.tokens[m].shape == (B, LENS[m], 32)
        assert set(out.gates[m]) == set(DIMS) - {m}
        for g in out.gates[m].values():
            assert g.shape == (B,)
    # fused mask is False for padding and for absent modalities, in the input_dims order
    audio_start = LENS["video"] + LENS["text"]
    assert not out.fused_mask[1, audio_start : audio_start + LENS["audio"]].any()
    assert not out.fused_mask[0, LENS["video"] + 3 : LENS["video"] + LENS["text"]].any()
    assert out.fused_mask[0, :audio_start].sum() == LENS["video"] + 3
    assert len(out.layer_gates) == 2
    assert model.last_gates is not None and not model.last_gates["video"]["text"].requires_grad


def test_absent_modality_values_do_not_matter():
    model = make_model()
    tokens, masks, present = make_inputs()
    ref = model(tokens, masks, present)
    changed = {m: t.clone() for m, t in tokens.items()}
    changed["audio"][1] = 1e4 * torch.randn_like(changed["audio"][1])
    changed["speech"][0] = float("nan")
    out = model(changed, masks, present)
    outputs_close(ref, out, DIMS)
    assert torch.isfinite(out.fused).all()
    # the output of the present samples is fully defined and the absent rows are zeros
    assert torch.equal(out.tokens["audio"][1], torch.zeros_like(out.tokens["audio"][1]))


def test_padded_positions_do_not_matter():
    model = make_model()
    tokens, masks, present = make_inputs()
    ref = model(tokens, masks, present)
    changed = {m: t.clone() for m, t in tokens.items()}
    changed["text"][0, 3:] = 50.0
    changed["video"][2, 4:] = -7.0
    out = model(changed, masks, present)
    outputs_close(ref, out, DIMS)
    assert torch.allclose(ref.fused, out.fused, atol=1e-6)


def test_padding_actually_excluded_and_sources_matter():
    """Guards against the invariance tests passing trivially: real tokens do change the outputs."""
    model = make_model()
    tokens, masks, present = make_inputs()
    ref = model(tokens, masks, present)
    changed = {m: t.clone() for m, t in tokens.items()}
    changed["audio"][0] += 1.0  # a real audio sample: video tokens of sample 0 must move
    out = model(changed, masks, present)
    assert not torch.allclose(ref.tokens["video"][0], out.tokens["video"][0], atol=1e-4)
    # other samples are untouched
    assert torch.allclose(ref.tokens["video"][1:], out.tokens["video"][1:], atol=1e-6)


def test_missing_modality_equals_absent():
    model = make_model()
    tokens, masks, present = make_inputs()
    present["audio"][:] = False
    marked = model(tokens, masks, present)
    del tokens["audio"], masks["audio"], present["audio"]
    missing = model(tokens, masks, present)
    assert "audio" not in missing.tokens
    assert missing.fused.shape[1] == sum(LENS.values()) - LENS["audio"]
    outputs_close(marked, missing, [m for m in DIMS if m != "audio"])
    for q in DIMS:
        for s in missing.gates[q]:
            assert torch.equal(marked.gates[q][s], missing.gates[q][s]), (q, s)


@pytest.mark.parametrize("gate", ["sigmoid", "tanh"])
def test_gate_ranges_and_zero_for_absent(gate):
    model = make_model(gate=gate)
    if gate == "tanh":
        # zero-initialised (Flamingo): the fusion starts as a no-op; move it off zero to test the range
        for layer in model.layers:
            for lin in layer.gate.values():
                torch.nn.init.normal_(lin.weight, std=0.5)
                torch.nn.init.normal_(lin.bias, std=0.5)
    tokens, masks, present = make_inputs()
    out = model(tokens, masks, present)
    both = {m: present[m] for m in DIMS}
    lo = 0.0 if gate == "sigmoid" else -1.0
    for q in DIMS:
        for s, g in out.gates[q].items():
            active = both[q] & both[s]
            assert (g[~active] == 0).all(), (q, s)
            assert ((g[active] > lo) & (g[active] < 1)).all(), (q, s)
            assert active.any()
    assert (out.gates["video"]["audio"][1] == 0).all() and (out.gates["audio"]["video"][1] == 0).all()


def test_tanh_gate_starts_as_identity():
    model = make_model(gate="tanh")
    tokens, masks, present = make_inputs()
    out = model(tokens, masks, present)
    for q in DIMS:
        for g in out.gates[q].values():
            assert torch.equal(g, torch.zeros_like(g))
    # with zero gates, a modality's output does not depend on the others
    changed = {m: t.clone() for m, t in tokens.items()}
    changed["audio"] += 1.0
    out2 = model(changed, masks, present)
    assert torch.allclose(out.tokens["video"], out2.tokens["video"], atol=1e-6)


def test_gradients_reach_every_parameter():
    model = make_model()
    model.train()
    tokens, masks, present = make_inputs()
    out = model(tokens, masks, present)
    g = torch.Generator().manual_seed(5)
    # random projections: the sum of a LayerNorm output has no gradient by itself
    loss = (out.pooled * torch.randn(out.pooled.shape, generator=g)).sum()
    loss = loss + (out.fused * torch.randn(out.fused.shape, generator=g)).sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_single_modality_and_no_masks():
    model = make_model(depth=1)
    out = model({"video": torch.randn(2, 4, 24)})
    assert out.fused.shape == (2, 4, 32)
    assert out.fused_mask.all()
    assert (out.gates["video"]["text"] == 0).all()


def test_errors():
    model = make_model()
    tokens, masks, _ = make_inputs()
    with pytest.raises(ValueError, match=r"unknown modality 'depth' in tokens; expected one of \['video'"):
        model({**tokens, "depth": torch.randn(B, 2, 8)})
    with pytest.raises(ValueError, match=r"tokens\['text'\] must be \[B, L, 16\]; got \(3, 5, 17\)"):
        model({**tokens, "text": torch.randn(B, 5, 17)})
    with pytest.raises(ValueError, match=r"masks\['audio'\] must be \[B, L\] = \(3, 4\); got \(3, 5\)"):
        model(tokens, {**masks, "audio": torch.ones(B, 5, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"present\['video'\] must be \[B\] = \(3,\); got \(2,\)"):
        model(tokens, masks, {"video": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"tokens\['audio'\] has batch size 2; expected 3"):
        model({**tokens, "audio": torch.randn(2, 4, 12)})
    with pytest.raises(ValueError, match="no modality"):
        model({})
