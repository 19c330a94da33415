"""bench/gpu_rehearsal.py: without CUDA it says so and runs its CPU smoke pass, exit 0, JSON out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: run the real rehearsal")
def test_rehearsal_smoke_pass_on_cpu_writes_every_figure(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1",
               SPINEGRADE_PROGRESS="0")  # fmt: skip
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_rehearsal.py"), "--work", str(tmp_path / "w"),
           "--studies", "5", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CUDA is not available" in done.stdout
    r = json.loads(out.read_text())
    assert r["cuda"] is False and r["device"]["device"] == "cpu" and r["phantom_studies"] == 5
    assert r["grader_train"]["crops_per_s"] > 0 and r["localizer_train"]["stacks_per_s"] > 0
    assert 0 <= r["grader_train"]["stall_frac"] < 1 and r["inference"]["crops_per_s"] > 0
    proj = r["projection_rsna"]
    assert proj["studies"] == 1975 and proj["five_folds_min"] > 0 and proj["n_val"] == 395
    assert r["peak_gpu_mib"]["overall"] is None  # no GPU, no GPU memory figure
    # A second run reuses the phantom and cache instead of making them again.
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and json.loads(out.read_text())["phantom_prepare_s"] < 1.0
