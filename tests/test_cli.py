"""The `iv2` entry points: console script, `python -m iv2_lightning`, --version, presets."""

import subprocess
import sys

import iv2_lightning
from iv2_lightning.cli import main


def test_version_via_python_m():
    out = subprocess.run(
        [sys.executable, "-m", "iv2_lightning", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"iv2-lightning {iv2_lightning.__version__}"


def test_help_lists_the_commands(capsys):
    assert main([]) == 0
    text = capsys.readouterr().out
    assert "usage: iv2" in text and "presets" in text


def test_presets_table_shows_official_counts(capsys):
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    for name, count in [("s14", "23.0M"), ("b14", "89.4M"), ("l14", "308.9M")]:
        assert any(name in line and line.count(count) == 2 for line in text.splitlines()), (name, text)


def test_models_package_never_imports_lightning():
    code = "import sys, iv2_lightning.models; print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
