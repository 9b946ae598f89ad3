"""The benchmark scripts' own logic on the CPU: the GPU check's shell syntax, its step on the tiny
preset (eager; the compiled path is tested in tests/stages/test_compile.py), its table and peak
lookup; the stage benchmark's clip count and the docs writer that keeps other scripts' sections."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import gpu, gpu_check, report, stages

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


def test_card_peaks_by_name():
    assert gpu_check.card_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.card_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.card_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.card_peak_tflops("Some Future Card") is None


def test_gpu_check_step_runs_on_the_tiny_preset_and_fills_the_table():
    v = gpu.run_variant(False, "sdpa", dry_run=True, steps=1, batch_size=2)
    assert v["batch"] == 2 and v["step_s"] > 0 and v["step_tflop"] > 0 and v["blocks_compiled"] == 0
    res = {
        "device": "cpu (dry run)",
        "torch": "x",
        "flash_attn_installed": False,
        "matmul_bf16_tflops_measured": 1.0,
        "dense_bf16_tflops_data_sheet": None,
        "variants": [{**v, "mfu_vs_measured_matmul": 0.5, "mfu_vs_data_sheet": None}],
    }
    table = gpu_check.markdown(res)
    assert "| sdpa | no | 2 |" in table and "50.0%" in table
    json.dumps(res)  # what the script writes


def test_stage_clip_count_follows_the_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data: {init_args: {train_size: 100, batch_size: 32}}\ntrainer: {max_epochs: 3, limit_train_batches: 2}\n"
    )
    assert stages.training_clips(cfg, None) == (3 * 2 * 32, 3)
    cfg.write_text("data: {init_args: {train_size: 100, batch_size: 32}}\ntrainer: {max_epochs: 3}\n")
    assert stages.training_clips(cfg, 2) == (2 * 4 * 32, 2)
    # each stage as the main job configures it: stage 2 with the BERT-fusion overlay
    root = Path(stages.ROOT)
    assert stages.stage_configs(root, "stage2") == [
        (root / "configs/stage2/tiny.yaml").resolve(),
        (root / "configs/stage2/fusion/bert_tiny.yaml").resolve(),
    ]
    assert stages.stage_configs(tmp_path, "stage1") == [
        tmp_path / "configs/stage1/tiny.yaml"
    ]  # no curriculum


def test_docs_rewrite_keeps_the_sections_other_scripts_wrote(tmp_path, monkeypatch):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(
        "# old body\n<!-- stages:start -->\nSTAGES\n<!-- stages:end -->\n"
        "<!-- gpu_check:start -->\nGPU\n<!-- gpu_check:end -->\n"
    )
    monkeypatch.setattr(report, "DOCS", docs)
    kept = report.data_section()
    assert "STAGES" in kept and "GPU" in kept and "old body" not in kept
    monkeypatch.setattr(stages, "DOCS", docs)
    stages.write_docs("<!-- stages:start -->\nNEW\n<!-- stages:end -->")
    text = docs.read_text()
    assert "NEW" in text and "STAGES" not in text and "GPU" in text


def test_fusion_section_replaces_only_its_own_part_of_the_docs(tmp_path, monkeypatch):
    from benchmarks import fusion

    docs = tmp_path / "benchmarks.md"
    docs.write_text(
        "head\n<!-- stages:start -->\nSTAGES\n<!-- stages:end -->\n<!-- fusion:start -->\nOLD\n<!-- fusion:end -->\ntail\n"
    )
    monkeypatch.setattr(stages, "DOCS", docs)
    variant = {"batch": 32, "params": 2.5e6, "gflop": 30.0, "times": [0.4, 0.5], "step_s": 0.45, "mfu": 0.44}
    res = {
        "date": "d",
        "cpu": "c",
        "threads": 2,
        "matmul_gflops_fp32": 150.0,
        "speedup": 1.5,
        "variants": {"cmfm": {**variant, "step_s": 0.675}, "bert": variant},
    }
    stages.write_docs(fusion.markdown(res), fusion.START, fusion.END)
    text = docs.read_text()
    assert "OLD" not in text and "STAGES" in text and text.startswith("head") and text.endswith("tail\n")
    assert "**1.50x**" in text and "| bert | 32 | 2.50M | 30.0 | 0.450 (0.400–0.500) | 44% |" in text


def test_loader_memory_measures_an_epoch_and_writes_its_table():
    from benchmarks import loader_memory

    run = loader_memory.one_epoch(clips=96, workers=0, cache=False)
    assert run["clips"] == 96 and run["end_mb"] > 0 and len(run["samples"]) >= 2
    table = loader_memory.markdown({"date": "d", "cpu": "c", "runs": [run]})
    assert table.startswith(loader_memory.START) and table.endswith(loader_memory.END)
    assert f"| off | {run['clips_per_s']:.0f} |" in table


def test_synthetic_cache_with_workers_warns_about_memory():
    from iv2_lightning.data import SyntheticVideoDataModule

    with pytest.warns(UserWarning, match="memory grows through the first epoch"):
        SyntheticVideoDataModule(num_frames=8, image_size=32, num_workers=2, cache=True)
