"""The one-command demo end to end on a tiny phantom: every stage, the table, and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from spinegrade.demo import VENDORED_REAL, print_summary, run_demo, summary_rows
from spinegrade.task import submission_row_ids
from test_spider_import import write_spider
from tiny_config import TINY_RUN

TINY = TINY_RUN  # 2 folds, one epoch, tiny models: the plumbing is checked


def test_demo_runs_every_stage_and_resumes(tmp_path: Path, capsys) -> None:
    from rich.console import Console

    from spinegrade.inference.ensemble import grader_caution

    out = tmp_path / "demo"
    lines: list[str] = []
    # The localiser also learns from real spines: a tiny SPIDER look-alike stands in for the
    # vendored set (3 patients), imported, cached and trained on beside the phantom.
    real = write_spider(tmp_path / "spider")
    demo = run_demo(
        out, n_studies=4, n_test=2, seed=1, overrides=TINY, workers=1, progress=False,
        echo=lines.append, real=real,
    )  # fmt: skip
    stage_lines = [line for line in lines if line.startswith("[")]
    assert [line[:5] for line in stage_lines] == [f"[{k}/7]" for k in range(1, 8)]
    assert (out / "real" / "import.json").is_file()
    sources = demo.cv["sources"]
    assert sources["phantom"]["studies"] == 4 and sources["phantom"]["graded"] == 4
    assert sources["spider-t2space"] | {"data_dir": ""} == {
        "kind": "real", "data_dir": "", "studies": 3, "graded": 0,
        "per_fold": sources["spider-t2space"]["per_fold"],
    }  # fmt: skip
    assert min(sources["spider-t2space"]["per_fold"]) >= 1  # every fold validates on real spines
    # Level naming on the real spines, out of fold: every level of the three cases.
    assert demo.real is not None and demo.real["n"] == 3 * 5
    assert demo.n_train == 4  # the graded (phantom) studies
    # SPIDER's disc grades, learned out of fold on the first run's folds of the real spines,
    # each fold starting from that fold's localiser as it is, scored beside the constants.
    discs = out / "run_discs"
    assert demo.real_grades["task"] == "spider_discs"
    assert set(demo.real_grades["oof"]["conditions"]) >= {"pfirrmann", "disc_bulging"}
    assert set(demo.real_grades["baselines"]) == {"uniform", "prior", "best_constant"}
    run_folds = pd.read_csv(out / "run" / "folds.csv").set_index("study_id")["fold"]
    disc_folds = pd.read_csv(discs / "folds.csv").set_index("study_id")["fold"]
    assert len(disc_folds) == 3 and (run_folds.loc[disc_folds.index] == disc_folds).all()
    from safetensors.torch import load_file

    for k in range(2):
        mine = load_file(discs / f"fold_{k}" / "localizer_spinal.safetensors")
        theirs = load_file(out / "run" / f"fold_{k}" / "localizer_spinal.safetensors")
        assert mine.keys() == theirs.keys()
        assert all(bool((mine[n] == theirs[n]).all()) for n in mine)
    grades = json.loads(next((out / "report").glob("*/grades.json")).read_text())
    assert grades["model"]["notes"] == [grader_caution(["phantom", "real"], ["Sagittal T1"])]
    # Held-out predictions: the competition's rows for the test studies, scored against truth.
    test_ids = sorted(pd.read_csv(out / "data" / "truth" / "test_labels.csv")["study_id"])
    assert pd.read_csv(demo.submission)["row_id"].tolist() == submission_row_ids(test_ids)
    assert {"model", "uniform", "prior", "best_constant", "true_probs", "bayes_limit"} <= set(
        demo.test
    )
    # The truth beats a constant on the same rows; the Bayes limit reweights it by 1/2/4.
    assert demo.test["true_probs"]["score"] < demo.test["uniform"]["score"]
    assert demo.test["bayes_limit"] != demo.test["true_probs"]
    assert set(demo.train_truth) == {"true_probs", "bayes_limit"}
    # The demo, not training, puts the phantom's truth into cv.json, right after the baselines.
    cv_keys = list(json.loads((out / "run" / "cv.json").read_text()))
    at = cv_keys.index("baselines") + 1
    assert cv_keys[at : at + 2] == ["bayes_limit", "true_probs"]
    assert demo.cv["bayes_limit"] == demo.train_truth["bayes_limit"]
    assert demo.cv["oof"]["score"] > 0
    assert demo.index_html.is_file() and len(list((out / "report").glob("*/figure.png"))) == 2
    saved = json.loads((out / "demo.json").read_text())
    assert saved["test"]["model"]["score"] == pytest.approx(demo.test["model"]["score"])
    assert saved["real_levels_oof"] == demo.real
    assert saved["real_grades_oof"]["oof"] == demo.real_grades["oof"]
    assert set(saved["stage_seconds"]) == {
        "synthesise_s",
        "import_s",
        "preprocess_s",
        "train_s",
        "real_grades_s",
        "predict_s",
        "score_s",
    }
    # The closing table lists the model beside every reference.
    whats = [what for _, what, m in summary_rows(demo) if m]
    assert whats.count("model") == 2 and whats.count("Bayes limit") == 2
    console = Console(record=True, width=160)
    print_summary(demo, console)
    text = console.export_text()
    assert "Bayes limit" in text and str(demo.index_html.resolve()) in text
    assert f"real spines (SPIDER, out of fold): {demo.real['within_5mm']:.0%} of 15 levels" in text
    assert "real disc grades" in text and "pfirrmann" in text and "best_constant" in text

    # Resuming: data, cache and folds are reused, so the rerun skips straight to prediction.
    stamp = (out / "data" / "truth" / "phantom.json").stat().st_mtime_ns
    fold_stamp = (out / "run" / "fold_0" / "metrics.json").stat().st_mtime_ns
    disc_stamp = (discs / "fold_0" / "metrics.json").stat().st_mtime_ns
    again = run_demo(
        out, n_studies=4, n_test=2, seed=1, overrides=TINY, workers=1, progress=False,
        echo=lambda _: None, real=real,
    )  # fmt: skip
    assert (out / "data" / "truth" / "phantom.json").stat().st_mtime_ns == stamp
    assert (out / "run" / "fold_0" / "metrics.json").stat().st_mtime_ns == fold_stamp
    assert (discs / "fold_0" / "metrics.json").stat().st_mtime_ns == disc_stamp
    assert again.real_grades["oof"] == demo.real_grades["oof"]
    assert again.cv["oof"] == demo.cv["oof"]
    assert again.test["model"]["score"] == pytest.approx(demo.test["model"]["score"])
    # Another size in the same folder is refused instead of silently mixing datasets.
    with pytest.raises(ValueError, match="another --out folder"):
        run_demo(out, n_studies=5, n_test=2, seed=1, overrides=TINY, progress=False)


def test_the_demo_names_a_missing_real_set_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--real none"):
        run_demo(tmp_path / "demo", n_studies=4, n_test=2, overrides=TINY, progress=False,
                 real=tmp_path / "nowhere.tar.xz")  # fmt: skip
    assert not (tmp_path / "demo").exists()
    # In a source checkout the default is the vendored set.
    assert VENDORED_REAL.is_file() and VENDORED_REAL.parent.name == "spider-t2space"
