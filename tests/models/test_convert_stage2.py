"""Whole official stage-2 checkpoints (``iv2 convert SRC DST.ckpt``): vision + BERT with fusion layers +
heads → a ContrastiveStage checkpoint, verified against the official equations
(``models/official/reference_text.py``) and loaded by the commands that read stage-2 checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from iv2_lightning.convert import convert_main, convert_stage2
from iv2_lightning.models.official.stage2 import verify_stage2
from iv2_lightning.stages import ContrastiveStage
from iv2_lightning.use.checkpoints import load_model

pytest.importorskip("transformers")

from official_stage2 import EMBED, FUSION, LAYERS, make_stage2, write_tokenizer

SMALL = dict(num_heads=4, attn_pool_heads=4)
CLI_SMALL = ["--num-frames", "4", "--image-size", "56", "--num-heads", "4", "--attn-pool-heads", "4"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def _convert(sd, tokenizer):
    return convert_stage2({"module": sd}, tokenizer, 4, 56, text_heads=2, overrides=SMALL)


def test_every_tensor_is_accounted_for_and_the_equations_match(tokenizer):
    from test_beats import CFG, official_state

    from iv2_lightning.models.beats import BEATsConfig, BEATsEncoder

    beats = {"audio_encoder." + k: v for k, v in official_state(CFG).items()}  # the 6B file's BEATs
    sd = {**make_stage2(with_audio=True), **beats}
    stage, loaded, report = _convert(sd, tokenizer)
    bert = report.bert
    assert bert["fusion_layer"] == FUSION and bert["config"]["num_hidden_layers"] == LAYERS
    assert bert["encoder_width"] == stage.model.video_encoder.embed_dim and bert["mlm_head"]
    vision = {f"vision_encoder.{k}" for k in loaded.sub}
    # every tensor of the file is mapped or reported with a reason
    assert set(sd) == vision | set(report.mapped) | set(report.unmapped)
    assert report.mapped["text_encoder.cls.predictions.decoder.weight"].startswith("tied: ")
    assert "audio-visual head of the 6B model" in report.unmapped["audio_proj.weight"]
    assert all(report.unmapped[k].startswith("BEATs: load with BEATsEncoder.load_beats_state") for k in beats)
    audio = BEATsEncoder(BEATsConfig.from_official(CFG, num_mel_bins=64))
    assert audio.load_beats_state({k: sd[k] for k in beats}).missing == []
    assert stage.model.fusion_kind == "bert" and stage.model.loss_weights["vtm"] == 1.0
    assert float(stage.model.contrastive.temp) == pytest.approx(0.0523)
    result = verify_stage2(stage.model, loaded, report)
    assert result.ok, result.summary()
    assert len(result.checked) == 2


@pytest.mark.parametrize(
    "broken, what",
    [
        ("model.text_proj.proj.weight", "similarity"),
        ("model.text_encoder.encoder.layer.2.crossattention.self.value.weight", "ITM"),
        ("model.text_encoder.embeddings.position_embeddings.weight", "similarity"),
    ],
)
def test_verification_fails_on_a_wrong_tensor(tokenizer, broken, what):
    stage, loaded, report = _convert(make_stage2(), tokenizer)
    with torch.no_grad():
        stage.state_dict()[broken].mul_(1.05)
    result = verify_stage2(stage.model, loaded, report)
    assert not result.ok and any(what in p for p in result.problems), result.summary()


def test_cli_writes_a_checkpoint_the_commands_load(tokenizer, tmp_path, capsys):
    sd = make_stage2(seed=3)
    src = tmp_path / "stage2_1b.pt"
    torch.save({"module": sd}, src)
    dst = tmp_path / "converted" / "iv2_stage2.ckpt"
    argv = [str(src), str(dst), "--tokenizer", tokenizer, "--text-heads", "2", "--verify", *CLI_SMALL]
    assert convert_main(argv) == 0
    out = capsys.readouterr().out
    assert "verification: PASSED" in out and "fusion layers 2..2" in out and dst.is_file()
    assert dst.with_name(dst.name + ".sha256.json").is_file()  # verified when the commands read it
    loaded = load_model(dst, ContrastiveStage)  # what iv2 embed / search / test do
    model = loaded.model
    assert loaded.stage == "ContrastiveStage" and model.embed_dim == EMBED
    # a caption through the tokenizer folder and the BERT: official text_proj of the [CLS] state
    emb = model.encode_text(["a red circle moves left"])
    tok = model.tokenizer(["a red circle moves left"], padding="longest")
    ids = tok.ids
    cls = model.text_encoder(ids, tok.mask).tokens[:, 0]
    want = F.normalize(cls @ sd["text_proj.weight"].T + sd["text_proj.bias"], dim=-1)
    torch.testing.assert_close(emb, want, atol=1e-5, rtol=1e-5)
    assert model.encode_video(torch.randn(2, 3, 4, 56, 56)).shape == (2, EMBED)


def test_cli_errors_name_what_is_wrong(tokenizer, tmp_path, capsys):
    sd = make_stage2()
    src = tmp_path / "s2.pt"
    torch.save(sd, src)
    assert convert_main([str(src), str(tmp_path / "x.ckpt"), *CLI_SMALL]) == 2
    assert "needs --tokenizer" in capsys.readouterr().err
    small = write_tokenizer(tmp_path / "other_tok", vocab=40)
    assert convert_main([str(src), str(tmp_path / "x.ckpt"), "--tokenizer", small, *CLI_SMALL]) == 2
    assert "has 40 tokens but the BERT" in capsys.readouterr().err
    vision_only = {k: v for k, v in sd.items() if k.startswith("vision_encoder.")} | {"temp": sd["temp"]}
    torch.save(vision_only, src)
    assert convert_main([str(src), str(tmp_path / "x.ckpt"), "--tokenizer", tokenizer, *CLI_SMALL]) == 2
    assert "not an official stage-2 checkpoint with its text encoder" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()
