"""BertTextEncoder: BERT in its own layout, with InternVideo2's fusion layers (``models/bert.py``).

Parity is checked against Hugging Face ``BertForMaskedLM`` built from a random config and saved to a
temporary folder (no download); the fusion layers against their defining properties; the aligner and
the stage with ``fusion: bert`` against the official wiring (matching on the fused ``[CLS]``, MLM
through BERT's own head) and by learning on a fixed batch.
"""

from __future__ import annotations

import pytest
import torch

from iv2_lightning.features.tokenizers import ByteTokenizer
from iv2_lightning.models.aligner import VideoTextAligner
from iv2_lightning.models.backbone import build_video_encoder
from iv2_lightning.models.bert import BertConfig, BertTextEncoder
from iv2_lightning.stages import ContrastiveStage

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=300, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(max_position_embeddings=40, **TINY)).eval()
    with torch.no_grad():  # HF starts LayerNorms at 1/0 and biases at 0: perturb so that they matter
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("bert")
    hf.save_pretrained(folder)
    return folder, hf


def _ids(b=3, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 5:] = False
    ids[~mask] = 0
    return ids, mask


def test_text_layers_and_mlm_head_match_hugging_face(hf_folder):
    folder, hf = hf_folder
    ours, _ = BertTextEncoder.from_pretrained(folder)
    ours.eval()
    ids, mask = _ids()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        got = ours(ids, mask)
        logits = ours.mlm_logits(got.tokens)
    torch.testing.assert_close(got.tokens[mask], want.hidden_states[-1][mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[mask], want.logits[mask], atol=1e-4, rtol=1e-5)
    assert torch.equal(got.cls, got.tokens[:, 0])


def test_fusion_layers_load_bert_and_report_the_new_cross_attention(hf_folder):
    folder, hf = hf_folder
    ours, report = BertTextEncoder.from_pretrained(folder, fusion_layer=2, encoder_width=48)
    ours.eval()
    assert ours.has_fusion and ours.encoder.layer[2].crossattention is not None
    assert ours.encoder.layer[1].crossattention is None
    assert report.missing and all(".crossattention." in k for k in report.missing)
    assert report.unused == []  # BertForMaskedLM has no pooler; every tensor it has is used
    ids, mask = _ids()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        text = ours(ids, mask)  # the layers below fusion_layer are BERT's own
    torch.testing.assert_close(text.tokens[mask], want.hidden_states[2][mask], atol=1e-5, rtol=1e-5)


def test_fusion_reads_the_memory_but_not_its_masked_tokens_nor_their_order():
    torch.manual_seed(0)
    bert = BertTextEncoder(BertConfig(**TINY), fusion_layer=1, encoder_width=24).eval()
    ids, mask = _ids()
    memory = torch.randn(3, 7, 24)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[:, 5:] = False
    with torch.no_grad():
        text = bert(ids, mask).tokens
        fused = bert.fuse(text, mask, memory, keep)
        garbage = memory.clone()
        garbage[:, 5:] = 1e3 * torch.randn(3, 2, 24)
        perm = torch.tensor([4, 2, 0, 3, 1, 5, 6])
        other = bert.fuse(text, mask, torch.randn(3, 7, 24), keep)
        torch.testing.assert_close(bert.fuse(text, mask, garbage, keep), fused)
        torch.testing.assert_close(
            bert.fuse(text, mask, memory[:, perm], keep[:, perm]), fused, atol=1e-5, rtol=1e-5
        )
    assert (other - fused).abs().max() > 1e-2  # it does read the memory
    with pytest.raises(ValueError, match="24"):
        bert.fuse(text, mask, torch.randn(3, 7, 16))
    with pytest.raises(ValueError, match="fusion_layer must be in"):
        BertTextEncoder(BertConfig(**TINY), fusion_layer=4)


def _aligner(seed=0, audio=False):
    torch.manual_seed(seed)
    video = build_video_encoder("tiny", num_frames=4, image_size=32, patch_size=16, tubelet_size=2)
    tok = ByteTokenizer(max_length=24)
    bert = BertTextEncoder(
        BertConfig(**{**TINY, "vocab_size": tok.vocab_size, "pad_token_id": tok.pad_id}),
        fusion_layer=2,
        encoder_width=video.embed_dim,
    )
    return VideoTextAligner(
        video,
        bert,
        tok,
        fusion="bert",
        vtc=1.0,
        atc=0,
        vac=0,
        vsc=0,
        avtc=0,
        vtm=1.0,
        mlm=1.0,
        text_pooling="cls",
        embed_dim=16,
    ), tok


def _batch(tok, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["red", "green", "blue", "white"]
    captions = [f"a {words[i % 4]} square moves {'left' if i % 2 else 'right'}" for i in range(n)]
    t = tok(captions, padding="longest")
    video = torch.randn(n, 3, 4, 32, 32, generator=g)
    for i in range(n):  # the colour of the caption is the colour of the clip
        video[i, i % 3] += 1.5
    return dict(video=video, sample_id=torch.arange(n), caption_ids=t.ids, caption_mask=t.mask)


def test_aligner_with_bert_fusion_matches_on_the_fused_cls_and_learns():
    model, tok = _aligner()
    assert model.fusion is None and model.mlm_head is None and model.fusion_kind == "bert"
    batch = _batch(tok)
    out = model(**batch)
    assert set(out.terms) == {"vtc", "vtm", "mlm"} and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["text_encoder.encoder.layer.2.crossattention.self.key.weight"].abs().sum() > 0
    assert grads["text_encoder.cls.predictions.transform.dense.weight"].abs().sum() > 0
    assert grads["itm_head.fc.weight"].abs().sum() > 0
    # match scores of (video i, caption j) pairs read the fused [CLS] of the caption
    model.eval()
    with torch.no_grad():
        f = model.features(batch["video"], batch["caption_ids"], batch["caption_mask"])
        tokens, masks = model.match_inputs(f)
        scores = model.match_scores(tokens, masks)
        fused = model.text_encoder.fuse(f.caption.tokens, f.caption.mask, f.video.tokens)
        torch.testing.assert_close(scores, model.itm_head(fused[:, 0])[:, 1], atol=1e-5, rtol=1e-5)
    # learning: 40 steps on the fixed batch; every term falls
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(40):
        torch.manual_seed(1)  # the same masks and hard negatives each step
        out = model(**batch)
        first = first or {k: float(v.detach()) for k, v in out.terms.items()}
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = {k: float(v.detach()) for k, v in out.terms.items()}
    assert all(last[k] < 0.7 * first[k] for k in ("vtc", "mlm")), (first, last)
    assert last["vtm"] < first["vtm"], (first, last)


def test_stage_builds_the_bert_fusion_and_names_bad_settings():
    text = {"preset": "bert-tiny", "num_hidden_layers": 3, "fusion_layer": 2}
    stage = ContrastiveStage(
        preset="tiny", num_frames=4, image_size=32, text_model="bert", text=text, fusion="bert", mlm=1.0
    )
    model = stage.model
    assert isinstance(model.text_encoder, BertTextEncoder) and model.text_encoder.fusion_layer == 2
    assert model.text_encoder.encoder_width == model.video_encoder.embed_dim
    assert model.fusion is None and model.text_pooling == "mean"  # a BERT from scratch: mean (auto)
    with pytest.raises(ValueError, match=r"unknown BERT setting\(s\) \['hiden_size'\]"):
        ContrastiveStage(preset="tiny", text_model="bert", text={"hiden_size": 64}, fusion="bert")
    with pytest.raises(ValueError, match="needs a BertTextEncoder with fusion layers"):
        ContrastiveStage(preset="tiny", fusion="bert")
    with pytest.raises(ValueError, match="fusion must be one of"):
        ContrastiveStage(preset="tiny", fusion="qformer")
