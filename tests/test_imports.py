"""Where each job lives: the training and prediction path never loads the phantom generator.

This one imports at run time in a fresh interpreter; ``test_layout`` reads every import statement
(lazy ones inside functions too) against the floors of the pipeline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import spinegrade

TRAIN_AND_PREDICT = (
    "spinegrade.training.cv",
    "spinegrade.inference.predict",
    "spinegrade.inference.fold_models",
    "spinegrade.preprocessing.build",
    "spinegrade.training.stages",
    "spinegrade.inference.run_folder",
    "spinegrade.cli",
)


def test_training_and_prediction_do_not_import_the_phantom() -> None:
    # A fresh interpreter: in this one the tests have imported the phantom already.
    code = (
        "import importlib, sys\n"
        f"for name in {TRAIN_AND_PREDICT!r}:\n"
        "    importlib.import_module(name)\n"
        "print(' '.join(m for m in sys.modules if m.startswith('spinegrade')))\n"
    )
    env = dict(os.environ)
    src = str(Path(spinegrade.__file__).resolve().parents[1])  # this checkout's package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert run.returncode == 0, run.stderr
    loaded = set(run.stdout.split())
    assert set(TRAIN_AND_PREDICT) <= loaded  # the imports really ran
    phantom = sorted(m for m in loaded if m.split(".")[:2] == ["spinegrade", "phantom"])
    assert not phantom, f"the training/prediction path imports {phantom}"
