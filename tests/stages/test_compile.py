"""Regional compilation (``compile: true``): which blocks are compiled, a compiled stage computes the
eager loss and gradients (within 1e-4), and its parameter names and checkpoints are unchanged."""

import pytest
import torch
from stage_helpers import TINY, make_batch
from torch import nn

from iv2_lightning.models.compile import compile_blocks, repeated_blocks
from iv2_lightning.models.layers import DropPath
from iv2_lightning.stages.masked import MaskedVideoStage


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.parts = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Inner(), _Inner()])  # repeated: compiled, their lists with them
        self.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])  # two classes: left alone
        self.empty = nn.ModuleList()


def test_repeated_blocks_are_the_elements_of_uniform_lists_outermost_first():
    assert repeated_blocks(_Toy()) == ["blocks.0", "blocks.1"]
    model = MaskedVideoStage(encoder=dict(TINY, depth=2), decoder_depth=2, decoder_dim=32).model
    names = repeated_blocks(model)
    assert {"video_encoder.blocks.0", "video_encoder.blocks.1"} <= set(names)
    assert all(".blocks." in n for n in names)


def test_drop_path_rate_is_a_non_persistent_tensor():
    # blocks of a drop-path schedule differ only in a buffer, so one compiled graph serves them all;
    # the buffer stays out of checkpoints (official weights and old checkpoints load unchanged)
    d = DropPath(0.25)
    assert d.active and float(d.keep) == 0.75 and "keep" not in d.state_dict()
    assert not DropPath(0.0).active
    x = torch.ones(4000, 3)
    y = d.train()(x)
    kept = (y != 0).all(dim=1)
    assert 0.7 < kept.float().mean() < 0.8 and torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert torch.equal(d.eval()(x), x)


@pytest.mark.slow
def test_compiled_stage_matches_eager_loss_and_gradients():
    batch = make_batch(4)

    def loss_and_grads(compile: bool):
        torch.manual_seed(0)
        stage = MaskedVideoStage(
            encoder=dict(TINY, depth=2), mask_ratio=0.5, decoder_depth=1, decoder_dim=32, compile=compile
        )
        torch.manual_seed(1)  # the same masks for both
        loss = stage.compute_loss(batch)["loss"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
        return stage, loss.detach(), grads

    eager, eager_loss, eager_grads = loss_and_grads(False)
    compiled, compiled_loss, compiled_grads = loss_and_grads(True)
    assert eager.compiled_blocks == [] and len(compiled.compiled_blocks) >= 2
    assert torch.allclose(compiled_loss, eager_loss, atol=1e-4, rtol=1e-4)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, g in eager_grads.items():
        assert torch.allclose(compiled_grads[name], g, atol=1e-4, rtol=1e-3), name
    # the module tree and the checkpoint keys are those of eager mode
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_compile_blocks_leaves_parameters_and_outputs_alone():
    torch.manual_seed(0)
    toy = _Toy()
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    assert compile_blocks(toy) == ["blocks.0", "blocks.1"]
    assert toy.state_dict().keys() == before.keys()
