"""The Python examples in README.md run as written.

```python blocks run; ```py blocks need files a reader downloads (official checkpoints), so they
are only compiled."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    ran: dict = {}
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)
        ran.update(namespace)  # names of later blocks win; the examples use distinct ones
    assert ran["out"].tokens.shape == (2, 1 + 51, 128)  # 512 - round(0.9 * 512) = 51 visible
    assert sum(p.numel() for p in ran["big"].parameters()) == 308_929_280
    # the plain-PyTorch stage 2: it learns, and its embeddings are normalised
    losses = ran["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert ran["clip_emb"].shape == (16, 128) and torch.allclose(ran["clip_emb"].norm(dim=-1), torch.ones(16))
    # the stage of one's own: built by the base, its hooks called, its contract declared
    stage = ran["stage"]
    assert isinstance(stage.model.head, torch.nn.Linear) and stage.batch_contract() == {
        "regression": ["video", "label"]
    }
    groups = stage.configure_optimizers()["optimizer"].param_groups
    assert sorted({g["initial_lr"] for g in groups}) == [pytest.approx(1e-4), pytest.approx(1e-3)]  # lr_mult


def test_readme_download_blocks_compile():
    blocks = re.findall(r"```py\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no ```py block"
    for code in blocks:
        compile(code, str(README), "exec")
