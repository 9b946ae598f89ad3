"""The frozen-trunk feature cache: exact rows for seen clips, pass-through whenever a fresh forward
could differ, and the stage option that refuses a trunk that trains."""

import pytest
import torch

from iv2_lightning.models.backbone import build_video_encoder
from iv2_lightning.models.feature_cache import FeatureCache, cache_video_trunk

TINY = dict(patch_size=16, tubelet_size=2, layerscale_init=None)


def frozen_encoder(**overrides):
    torch.manual_seed(0)
    enc = build_video_encoder("tiny", **{**TINY, **overrides}).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def test_cached_rows_match_a_fresh_forward_and_are_not_recomputed():
    enc = frozen_encoder()
    clips = torch.randn(6, 3, 8, 64, 64)
    want = enc(clips)
    cache = cache_video_trunk(enc)
    first = enc(clips[:4])  # all misses: computed as one batch
    assert (cache.hits, cache.misses) == (0, 4)
    calls = []
    enc.blocks[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    mixed = enc(clips[[5, 0, 3, 4]])  # rows 0 and 3 seen, 5 and 4 new: only those two are computed
    assert calls == [2]
    assert (cache.hits, cache.misses) == (2, 6)
    torch.testing.assert_close(first.tokens, want.tokens[:4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed.tokens, want.tokens[[5, 0, 3, 4]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed.pooled, want.pooled[[5, 0, 3, 4]], rtol=1e-5, atol=1e-5)
    again = enc(clips[:4])
    assert calls == [2] and cache.hits == 6  # every row from the cache, no block ran
    torch.testing.assert_close(again.tokens, first.tokens, rtol=0, atol=0)


def test_a_changed_clip_is_a_new_key():
    enc = frozen_encoder()
    cache = cache_video_trunk(enc)
    clip = torch.randn(1, 3, 8, 64, 64)
    a = enc(clip).tokens
    bumped = clip.clone()
    bumped[0, 1, 3, 10, 20] += 1e-3  # one value of one pixel
    b = enc(bumped).tokens
    assert cache.misses == 2 and cache.hits == 0
    assert not torch.equal(a, b)


def test_passes_through_when_a_fresh_forward_could_differ():
    enc = frozen_encoder()
    cache = cache_video_trunk(enc)
    clips = torch.randn(2, 3, 8, 64, 64)
    enc(clips)
    enc.blocks[1].attn.qkv.weight.requires_grad_(True)  # part of the trunk trains: gradients wanted
    out = enc(clips)
    assert cache.passed == 1 and out.tokens.requires_grad
    enc.blocks[1].attn.qkv.weight.requires_grad_(False)
    dropped = frozen_encoder(drop_path_rate=0.5)
    c2 = cache_video_trunk(dropped)
    dropped.train()  # drop-path active: every forward is a new draw
    dropped(clips)
    assert c2.passed == 1 and c2.misses == 0
    dropped.eval()
    dropped(clips)
    assert c2.misses == 2
    # masked and hidden-state calls never go through the cache
    enc2 = frozen_encoder()
    c3 = cache_video_trunk(enc2)
    mask = torch.zeros(2, enc2.num_patches, dtype=torch.bool)
    mask[:, :8] = True
    enc2(clips, mask=mask)
    enc2(clips, return_hidden=2)
    assert c3.hits + c3.misses + c3.passed == 0


def test_the_attention_pool_may_train_through_cached_tokens():
    enc = frozen_encoder()
    for p in enc.clip_projector.parameters():
        p.requires_grad_(True)
    cache = cache_video_trunk(enc)
    clips = torch.randn(3, 3, 8, 64, 64)
    enc(clips)
    out = enc(clips)
    assert cache.hits == 3
    out.pooled.sum().backward()
    assert all(p.grad is not None for p in enc.clip_projector.parameters())


def test_state_dict_and_lru_bound():
    enc = frozen_encoder()
    keys = list(enc.state_dict())
    cache = cache_video_trunk(enc)
    assert list(enc.state_dict()) == keys and cache_video_trunk(enc) is cache
    small = FeatureCache(lambda x: x * 2, [], [], max_items=2)
    x = torch.arange(3.0)[:, None]
    small(x)
    assert len(small.rows) == 2  # the oldest row dropped
    small(x[2:])
    assert small.hits == 1
    with pytest.raises(ValueError, match="max_items"):
        FeatureCache(lambda x: x, [], [], max_items=0)


def test_stage_option_refuses_a_trunk_that_trains():
    from iv2_lightning.stages import ActionStage

    with pytest.raises(
        ValueError, match=r"cache_frozen: the video trunk trains \(video_encoder\.cls_token and 99 more"
    ):
        ActionStage(num_classes=4, preset="tiny", encoder=TINY, cache_frozen=True)
    stage = ActionStage(num_classes=4, preset="tiny", encoder=TINY, freeze_backbone=True, cache_frozen=True)
    assert stage.feature_cache is stage.model.video_encoder._feature_cache
    assert isinstance(stage.model.video_encoder.embed_tokens, FeatureCache)


def test_new_weights_empty_the_cache():
    enc = frozen_encoder()
    cache = cache_video_trunk(enc)
    clips = torch.randn(2, 3, 8, 64, 64)
    before = enc(clips).tokens
    other = frozen_encoder()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    enc.load_state_dict(other.state_dict())  # copies in place: the parameters' versions move
    after = enc(clips).tokens
    assert cache.hits == 0 and cache.misses == 4
    torch.testing.assert_close(after, other(clips).tokens, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before)
