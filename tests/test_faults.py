"""Long runs survive faults: training killed (SIGKILL) at named points resumes to a complete,
loadable run; pretrained weights that cannot be had stop `train` before any work; a run folder
with a missing weights file is an error naming it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from spinegrade.util.atomic import CRASH_ENV, write_json
from stack_factory import write_world
from test_train import TINY

SRC = Path(__file__).resolve().parents[1] / "src"


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "SPINEGRADE_PROGRESS": "0"}
    env.pop(CRASH_ENV, None)
    env.update(extra)
    return env


def _train(data: Path, cache: Path, run: Path, *overrides: str, **env: str):
    # One process trains the folds (fold_workers=1): the kill stops the run, as on a GPU node.
    args = [sys.executable, "-m", "spinegrade.cli", "train", str(data), "--cache", str(cache),
            "--out", str(run), "--no-progress", *TINY, "train.fold_workers=1",
            *overrides]  # fmt: skip
    return subprocess.run(args, env=_env(**env), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("faults"), n_studies=4)


def _story(fold: Path) -> list[str]:
    """The fold's log.jsonl in short: "run" for each run that started the fold, "STAGE:EPOCH" for
    each epoch record (step lines left out)."""
    lines = [json.loads(x) for x in (fold / "log.jsonl").read_text().splitlines()]
    return ["run" if r.get("event") == "runtime" else f"{r['stage']}:{r['epoch']}"
            for r in lines if r.get("event") == "runtime" or "steps" in r]  # fmt: skip


def _optimizer_steps(ckpt: Path, meta: dict) -> set[int]:
    """The AdamW step counts stored in a checkpoint (one per parameter, all equal)."""
    tensors = load_file(str(ckpt / meta["tensors"]))
    return {int(v) for k, v in tensors.items() if k.startswith("optim.") and k.endswith(".step")}


def test_killed_training_resumes_to_a_complete_loadable_run(world, tmp_path: Path) -> None:
    from spinegrade.data.studies import load_studies
    from spinegrade.inference.ensemble import Predictor

    data, cache = world
    run = tmp_path / "run"
    fold0 = run / "fold_0"
    ckpt = fold0 / "checkpoints"
    # Two localiser epochs, so a stage has a checkpoint to resume from mid-way. Each kill lands
    # further on; every rerun resumes from what the previous one left.
    two = "localizer.epochs=2"

    # 1. After localizer_spinal's epoch-1 checkpoint, before its log line: the record is in the
    # checkpoint only (it is not logged again on resume).
    res = _train(data, cache, run, two, **{CRASH_ENV: "fit_epoch:localizer_spinal"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    first = json.loads((ckpt / "localizer_spinal.json").read_text())
    assert first["epoch"] == 1 and len(first["history"]) == 1
    assert first["history"][0]["stage"] == "localizer_spinal"
    steps = first["history"][0]["steps"]
    assert steps >= 1 and _optimizer_steps(ckpt, first) == {steps}
    assert first["average_steps"] == steps
    assert _story(fold0) == ["run"]

    # 2. Resumed at epoch 2 and killed writing its checkpoint: epoch 2's tensors lie beside epoch
    # 1's JSON, which is untouched and still names its own tensors.
    res = _train(data, cache, run, two, **{CRASH_ENV: "checkpoint_write:localizer_spinal"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert (ckpt / "localizer_spinal.e2.safetensors").is_file()
    assert json.loads((ckpt / "localizer_spinal.json").read_text()) == first
    assert _story(fold0) == ["run", "run"]  # epoch 1 was not trained again

    # 3. Resumed from epoch 1's checkpoint again; killed between grader_foraminal's final weights
    # and their sidecar.
    res = _train(data, cache, run, two, **{CRASH_ENV: "weights_write:grader_foraminal"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    done = json.loads((ckpt / "localizer_spinal.json").read_text())
    # Carried on from the checkpoint: epoch 1's record is the first run's, and the optimiser and
    # weight average counted on from its steps (a restarted stage would hold a new record; one
    # that reloaded only the weights would count half the steps).
    assert done["epoch"] == 2 and done["history"][0] == first["history"][0]
    assert _optimizer_steps(ckpt, done) == {2 * steps} and done["average_steps"] == 2 * steps
    assert not (ckpt / "localizer_spinal.e1.safetensors").exists()

    # 4. A fold's weights and OOF written, its metrics.json not.
    res = _train(data, cache, run, two, **{CRASH_ENV: "fold_metrics"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert (fold0 / "oof.csv").is_file() and not (fold0 / "metrics.json").exists()
    assert not (run / "cv.json").exists()

    res = _train(data, cache, run, two)
    assert res.returncode == 0, res.stderr[-3000:]
    cv = json.loads((run / "cv.json").read_text())
    assert cv["n_folds"] == 2 and np.isfinite(cv["oof"]["score"])
    assert cv["init"] == {"model": [{"source": "random"}], "localizer": [{"source": "random"}]}
    # Every epoch logged exactly once, by the run that trained it; each rerun appended to the
    # same log (a fold started over would hold only its last run).
    spinal = ["localizer_spinal:1", "localizer_spinal:2"]
    foraminal = ["localizer_foraminal:1", "localizer_foraminal:2"]
    graders = ["grader_spinal:1", "grader_foraminal:1", "grader_subarticular:1"]
    fold0_runs = [*["run"] * 3, spinal[1], *foraminal, *graders[:2], "run", graders[2], "run"]
    assert _story(fold0) == fold0_runs
    assert _story(run / "fold_1") == ["run", *spinal, *foraminal, *graders]
    for k in (0, 1):
        metrics = json.loads((run / f"fold_{k}" / "metrics.json").read_text())
        assert set(metrics["init"]) >= {"grader_spinal", "localizer_spinal"}
    # Fold 0's steps per epoch come from the resumed epoch's line (epoch 1 was never logged).
    fold0_steps = json.loads((fold0 / "metrics.json").read_text())["runtime"]["steps_per_epoch"]
    assert fold0_steps["localizer_spinal"] == steps
    assert not ckpt.exists()  # removed once the fold was complete
    predictor = Predictor.from_run_dir(run, device="cpu")
    assert predictor.folds == [0, 1]
    study = load_studies(cache, [1000], progress=False)[1000]
    import spinegrade.inference.fold_models as inference
    from spinegrade.localization.points import StudyPoints

    cut = []

    def counted(*args, **kwargs):
        cut.append(1)
        return crop_views(*args, **kwargs)

    crop_views = inference.crop_views
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference, "crop_views", counted)
        pred = predictor.predict(study.stacks)
    assert pred.probs.shape == (25, 3) and np.allclose(pred.probs.sum(axis=1), 1)
    assert pred.graded.any()
    # Both folds grade at the consensus points with the same crop settings: one cut, shared,
    # which is only right because cutting is deterministic (seeded jitters).
    assert len(cut) == 1
    at = StudyPoints(pred.points)
    first, again = (crop_views(study.stacks, at, predictor.crop_config) for _ in "ab")
    assert len(first) == len(again) > 1
    for a, b in zip(first, again, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert predictor.describe_init() == [
        "model backbone: random initialisation",
        "localizer backbone: random initialisation",
    ]
    # A fold with a weights file gone is an error that names it, not a silent prior.
    (fold0 / "grader_subarticular.safetensors").unlink()
    with pytest.raises(ValueError, match=r"grader_subarticular\.safetensors does not exist"):
        Predictor.from_run_dir(run, device="cpu")
    (run / "fold_1" / "localizer_spinal.json").unlink()
    with pytest.raises(ValueError, match=r"localizer_spinal\.json is missing"):
        Predictor.from_run_dir(run, folds=[1], device="cpu")


def test_checkpoint_killed_between_tensors_and_json_keeps_the_previous_epoch(tmp_path: Path):
    from spinegrade.training.checkpoints import CKPT_FORMAT, load_checkpoint

    # The state save_checkpoint leaves when killed at checkpoint_write: a new epoch's tensors
    # beside the previous epoch's committed JSON. The JSON names its own tensors.
    ckpt = tmp_path / "grader_spinal"
    (tmp_path / "grader_spinal.e2.safetensors").write_bytes(b"half-written")
    write_json(ckpt.with_suffix(".json"), {"format": CKPT_FORMAT, "tensors": "gone.safetensors"})
    with pytest.raises(ValueError, match=r"gone\.safetensors, which is missing"):
        load_checkpoint(ckpt, None, None)  # type: ignore[arg-type]
    ckpt.with_suffix(".json").unlink()
    assert load_checkpoint(ckpt, None, None) is None  # type: ignore[arg-type]


def test_train_stops_within_seconds_when_pretrained_weights_are_missing(tmp_path: Path) -> None:
    # No data is needed: the check runs before anything is read. The hub refuses connections
    # (an offline machine), the hub cache is empty, HF_HUB_OFFLINE is not set.
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    os_env = _env(**env)
    os_env.pop("HF_HUB_OFFLINE", None)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "spinegrade.cli", "train", str(tmp_path / "no-data"),
            "--cache", str(tmp_path / "no-cache"), "--out", str(run),
            "model.pretrained=true"]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(args, env=os_env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 2, res.stderr[-2000:]
    err = res.stderr
    assert "model.backbone 'test_efficientnet'" in err and "127.0.0.1 is not reachable" in err
    assert "internet" in err and "model.pretrained_path=FILE" in err
    assert "model.pretrained=false" in err and "Traceback" not in err
    assert not run.exists()  # stopped before the run folder was made
    assert elapsed < 60, f"{elapsed:.0f} s"  # python + torch import dominate; no network retries


def test_train_stops_when_the_pretrained_file_has_other_key_names(tmp_path: Path) -> None:
    # The silent failure this guards: timm loads a features_only backbone non-strictly, so a file
    # whose names did not match left the backbone random while the run recorded the file's sha256.
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("test_efficientnet", num_classes=1000).state_dict()
    file = tmp_path / "foreign.safetensors"
    save_file({f"_{k}": v.contiguous() for k, v in source.items()}, str(file))
    run = tmp_path / "run"
    args = [sys.executable, "-m", "spinegrade.cli", "train", str(tmp_path / "no-data"),
            "--cache", str(tmp_path / "no-cache"), "--out", str(run),
            "localizer.pretrained=true", f"localizer.pretrained_path={file}",
            "localizer.backbone_kwargs={}"]  # fmt: skip
    res = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert (
        "0 of 68 backbone tensors matched" in lines[0] and "localizer.pretrained=false" in lines[0]
    )
    assert not run.exists()  # stopped before the run folder was made
