"""The scripts under examples/ run as a user runs them (a subprocess), on real mp4 clips with sound."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from iv2_lightning.data import write_annotations

ROOT = Path(__file__).resolve().parents[1]
OWN_DATA = ROOT / "examples" / "own_data.py"


def test_own_data_example_stays_short():
    assert len(OWN_DATA.read_text().splitlines()) <= 40


def test_own_data_example_trains_and_scores_zero_shot_and_retrieval(sound_clips, tmp_path):
    # the user's own labels, by name; the class list puts them in an order of its own
    rows = [
        {"video": str(path), "caption": f"a {name} clip with its sound", "label": name}
        for name, path in sound_clips.items()
    ]
    annotations = write_annotations(tmp_path / "mine.jsonl", rows)
    classes = sorted(sound_clips, reverse=True)
    env = {**os.environ, "IV2_STEPS": "3", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(OWN_DATA), str(annotations), *classes],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=170,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    found = re.search(r"zero-shot accuracy ([\d.]+)%, text-to-video R@1 ([\d.]+)%", done.stdout)
    assert found is not None, done.stdout[-2000:]
    accuracy, r1 = float(found[1]), float(found[2])
    assert 0.0 <= accuracy <= 100.0 and 0.0 <= r1 <= 100.0
