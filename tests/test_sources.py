"""Several data folders in one run: sources recorded, folds by source and patient, a
localisation-only source, out-of-fold points, and what the caution says (tiny, CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinegrade.config import load_config
from spinegrade.evaluation.metrics import score_frames
from spinegrade.rsna import load_train, make_folds
from spinegrade.training.cv import cross_validate
from stack_factory import write_world
from test_train import TINY

REAL_IDS = 5000


def _as_real_without_grades(data: Path) -> None:
    """Turn a world into what `spinegrade import spider` writes: no grades, canal points only,
    disc centres apart, and a cases.csv in which studies 0 and 1 are one patient."""
    train = pd.read_csv(data / "train.csv")
    train.iloc[:, 1:] = np.nan
    train.to_csv(data / "train.csv", index=False)
    coords = pd.read_csv(data / "train_label_coordinates.csv")
    canal = coords[coords["condition"] == "Spinal Canal Stenosis"]
    canal.to_csv(data / "train_label_coordinates.csv", index=False)
    # The disc centre: 6 pixels (15 mm) in front of the canal point, on the same slice.
    disc = canal.drop(columns="condition").assign(x=canal["x"] - 6.0)
    disc.to_csv(data / "train_disc_coordinates.csv", index=False)
    ids = train["study_id"].tolist()
    patients = ["P0", "P0", *(f"P{k}" for k in range(2, len(ids)))]
    pd.DataFrame(
        {"study_id": ids, "case_id": [f"case_{s}" for s in ids], "patient_id": patients,
         "source": "fake-real"}
    ).to_csv(data / "cases.csv", index=False)  # fmt: skip


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    from spinegrade.phantom.generate import PHANTOM_GENERATOR

    root = tmp_path_factory.mktemp("sources")
    phantom = write_world(root / "phantom", n_studies=6)
    (phantom[0] / "truth").mkdir()  # mark the first world as phantom data (rsna.is_phantom)
    (phantom[0] / "truth" / "phantom.json").write_text(json.dumps({"generator": PHANTOM_GENERATOR}))
    real = write_world(root / "real", n_studies=6, seed=1, first_id=REAL_IDS)
    _as_real_without_grades(real[0])
    return phantom, real


def test_a_run_learns_from_two_sources_and_records_them(two_sources, tmp_path, monkeypatch):
    from spinegrade.inference.ensemble import Predictor, grader_caution
    from spinegrade.inference.fold_models import load_fold_models
    from spinegrade.localization.localizer import Localizer

    monkeypatch.setenv("SPINEGRADE_PROGRESS", "0")
    (pdata, pcache), (rdata, rcache) = two_sources
    run = tmp_path / "run"
    cfg = load_config(
        "quick", [*TINY, "data.n_folds=3", "train.fold_workers=1",
                  f"data.sources=[{{data_dir: {rdata}, cache_dir: {rcache}}}]"]
    )  # fmt: skip
    cv = cross_validate(pdata, pcache, run, cfg, progress=False)
    folds = pd.read_csv(run / "folds.csv")
    assert list(folds.columns) == ["study_id", "fold", "source", "patient_id"]
    # Every fold validates on both sources; one patient's two studies share a fold.
    assert (folds.groupby("fold")["source"].nunique() == 2).all()
    assert folds.set_index("study_id").loc[[REAL_IDS, REAL_IDS + 1], "fold"].nunique() == 1
    assert folds.loc[folds["study_id"] == REAL_IDS, "patient_id"].item() == "fake-real:P0"
    assert cv["sources"]["phantom"] | {"data_dir": ""} == {
        "kind": "phantom", "data_dir": "", "studies": 6, "graded": 6,
        "per_fold": folds[folds["source"] == "phantom"]["fold"].value_counts().sort_index()
        .tolist(),
    }  # fmt: skip
    assert cv["sources"]["fake-real"]["kind"] == "real"
    assert cv["sources"]["fake-real"]["graded"] == 0
    # The grading score covers the graded (phantom) studies only, exactly.
    oof = pd.read_csv(run / "oof.csv")
    phantom_rows = oof[oof["row_id"].str.partition("_")[0].astype(int) < REAL_IDS]
    assert cv["oof"] == score_frames(load_train(pdata / "train.csv"), phantom_rows)
    assert len(oof) == 25 * 12  # every study predicted, graded or not
    # The localiser is scored per source; the real source has canal labels only.
    assert set(cv["localizer_by_source"]["fake-real"]) == {"spinal"}
    assert set(cv["localizer_by_source"]["phantom"]) == {"spinal", "foraminal", "subarticular"}
    # Level naming is scored where true disc centres exist: every real level, out of fold.
    assert list(cv["levels_by_source"]) == ["fake-real"]
    levels = cv["levels_by_source"]["fake-real"]
    errors = pd.read_csv(run / "localizer_errors.csv")
    real_canal = errors[(errors["source"] == "fake-real")]
    assert levels["n"] == len(real_canal) == 6 * 5
    plane = real_canal["plane_mm"].abs()
    assert levels["within_5mm"] == pytest.approx(float((plane <= 5).mean()))
    assert levels["misnamed"] == int((real_canal["named_as"] != real_canal["level"]).sum())
    assert errors.loc[errors["source"] == "phantom", "plane_mm"].isna().all()
    for k in range(3):
        metrics = json.loads((run / f"fold_{k}" / "metrics.json").read_text())
        val = folds[folds["fold"] == k]
        n_real_train = int(((folds["fold"] != k) & (folds["source"] == "fake-real")).sum())
        taught = metrics["training_data"]
        assert taught["localizer_spinal"]["fake-real"] == n_real_train
        assert "fake-real" not in taught["localizer_foraminal"]  # it has no sagittal T1 labels
        assert set(taught["grader_spinal"]) == {"phantom"}  # no grades came from the real set
        assert metrics["sources"]["fake-real"]["val"] == int((val["source"] == "fake-real").sum())
        assert load_fold_models(run / f"fold_{k}").training_data == {
            "localizer": ["phantom", "real"],
            "grader": ["phantom"],
        }
        # The canal's net learned real spines, the foramina's did not: the canal leads fusion.
        geometry = json.loads((run / f"fold_{k}" / "localizer_geometry.json").read_text())
        assert geometry["fuse_lead"] == "canal"
        assert load_fold_models(run / f"fold_{k}").localizer.fuse_lead == "canal"
    # A fold saved before the lead was recorded: decided from what its nets learned from.
    old = tmp_path / "old_fold"
    shutil.copytree(run / "fold_0", old)
    geometry = json.loads((old / "localizer_geometry.json").read_text())
    del geometry["fuse_lead"]
    (old / "localizer_geometry.json").write_text(json.dumps(geometry))
    for name in ("config.yaml", "task.yaml"):  # what load_fold_models reads beside a fold
        if (run / name).is_file():
            shutil.copy(run / name, tmp_path / name)
    assert Localizer.load(old).fuse_lead is None
    assert load_fold_models(old).localizer.fuse_lead == "canal"
    # Out-of-fold points: every validation study, disc centres derived from the learned offset.
    pts = pd.read_csv(run / "oof_points.csv")
    assert set(pts["study_id"]) == set(folds["study_id"])
    assert set(pts["target"]) == {"canal", "left_foramen", "right_foramen", "left_recess",
                                  "right_recess", "disc_centre"}  # fmt: skip
    canal = pts[pts["target"] == "canal"].set_index(["study_id", "level"])
    disc = pts[pts["target"] == "disc_centre"].set_index(["study_id", "level"])
    ahead = disc[["x_mm", "y_mm", "z_mm"]] - canal.loc[disc.index, ["x_mm", "y_mm", "z_mm"]]
    assert np.allclose(np.linalg.norm(ahead.to_numpy(), axis=1), 15.0, atol=1.0)
    # The caution says what each stage learned from.
    models = [load_fold_models(run / f"fold_{k}") for k in range(3)]
    notes = Predictor(run, [0, 1, 2], models, "cpu").describe_training()
    assert notes == [grader_caution(["phantom", "real"], ["Sagittal T1"])]
    assert "real spines" in notes[0] and "phantom studies only" in notes[0]


def test_a_run_without_grades_localises_and_does_not_score(two_sources, tmp_path, monkeypatch):
    monkeypatch.setenv("SPINEGRADE_PROGRESS", "0")
    _, (rdata, rcache) = two_sources
    run = tmp_path / "run"
    cfg = load_config("quick", [*TINY, "data.n_folds=2", "train.fold_workers=1"])
    cv = cross_validate(rdata, rcache, run, cfg, progress=False)
    assert cv["oof"] is None and cv["baselines"] is None
    assert cv["localizer"]["spinal"]["n"] == 6 * 5
    for k in range(2):
        fold = run / f"fold_{k}"
        assert (fold / "localizer_spinal.safetensors").is_file()
        assert not list(fold.glob("grader_*.safetensors"))
        assert json.loads((fold / "metrics.json").read_text())["oof"] is None
    assert len(pd.read_csv(run / "oof_points.csv").query("target == 'canal'")) == 6 * 5


def test_one_source_gives_the_folds_it_gave_before_and_patients_group(two_sources):
    (pdata, _), _ = two_sources
    labels = load_train(pdata / "train.csv")
    studies = pd.DataFrame(
        {"study_id": labels["study_id"], "source": "phantom",
         "patient_id": labels["study_id"].astype(str)}
    )  # fmt: skip
    plain, recorded = make_folds(labels, 3, 7), make_folds(labels, 3, 7, studies)
    assert plain.equals(recorded[["study_id", "fold"]])
    # Grouped: patients with two studies never straddle folds, over many seeds.
    many = pd.DataFrame({"study_id": range(40)})
    for col in labels.columns[1:]:
        many[col] = np.nan
    pairs = pd.DataFrame(
        {"study_id": range(40), "source": "s", "patient_id": [i // 2 for i in range(40)]}
    )
    for seed in range(5):
        f = make_folds(many, 5, seed, pairs)
        assert (f.groupby("patient_id")["fold"].nunique() == 1).all()


def test_a_study_in_two_folders_is_refused(two_sources, tmp_path):
    from spinegrade.data.sources import Source, load_tables

    (pdata, pcache), _ = two_sources
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("train.csv", "train_series_descriptions.csv"):
        (copy / name).write_bytes((pdata / name).read_bytes())
    with pytest.raises(ValueError, match=r"study 1000 \(and 5 more\) is in both"):
        load_tables([Source("a", "real", pdata, pcache), Source("b", "real", copy, pcache)])


def test_cli_takes_several_data_folders_with_one_cache_each(tmp_path):
    from typer.testing import CliRunner

    from spinegrade.cli import _split_train_args, app

    (tmp_path / "7").mkdir()
    assert _split_train_args(["0"], ["A", "1", "B", "x.y=1"]) == ([0, 1], ["x.y=1"], ["A", "B"])
    assert _split_train_args(None, [str(tmp_path / "7")]) == (None, [], [str(tmp_path / "7")])
    res = CliRunner().invoke(app, ["train", "A", "B", "--cache", "C", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "one --cache per data folder" in res.output


def test_a_folder_with_its_own_task_learns_its_grades_out_of_fold(
    two_sources, tmp_path, monkeypatch
):
    """An imported set graded as another task (SPIDER's discs): one disc network with an output
    per finding, scored per condition beside constants; prediction writes the task's table and
    reports; after the phantom, the same folder teaches the localiser only."""
    from spinegrade.evaluation.grades import score_grades
    from spinegrade.models.weights import read_sidecar
    from spinegrade.rsna.tables import matrix_to_wide
    from spinegrade.task import SPIDER_DISCS, TASK_FILE, load_task, save_task

    monkeypatch.setenv("SPINEGRADE_PROGRESS", "0")
    (pdata, pcache), (rdata, rcache) = two_sources
    disc = tmp_path / "discs"
    shutil.copytree(rdata, disc)
    ids = pd.read_csv(disc / "train.csv")["study_id"].tolist()
    rng = np.random.default_rng(3)
    task = SPIDER_DISCS
    codes = np.stack(
        [rng.integers(0, len(task.column_condition(c).grades), len(ids)) for c in task.columns],
        axis=1,
    )
    codes[0, 5:10] = -1  # a study whose narrowing was not graded
    matrix_to_wide(ids, codes, task).to_csv(disc / "train.csv", index=False)
    save_task(task, disc / TASK_FILE)

    run = tmp_path / "run"
    cfg = load_config("quick", [*TINY, "train.fold_workers=1", "localizer.tasks=[spinal]"])
    cv = cross_validate(disc, rcache, run, cfg, progress=False)
    assert cv["task"] == "spider_discs" and load_task(run / TASK_FILE) == task
    for k in range(2):
        fold = run / f"fold_{k}"
        assert sorted(p.name for p in fold.glob("grader_*.safetensors")) == [
            "grader_disc.safetensors"
        ]
        spec = read_sidecar(fold / "grader_disc.safetensors")["spec"]["kwargs"]
        assert (spec["n_targets"], spec["n_classes"]) == (5, 5)
    oof = pd.read_csv(run / "oof.csv")
    assert oof.columns.tolist() == ["row_id", "grade_1", "grade_2", "grade_3", "grade_4",
                                    "grade_5", "absent", "present"]  # fmt: skip
    assert len(oof) == len(ids) * 25
    pf = oof[oof["row_id"].str.contains("pfirrmann")]
    assert np.allclose(pf[[f"grade_{g}" for g in range(1, 6)]].sum(axis=1), 1.0)
    binary = oof[~oof["row_id"].str.contains("pfirrmann")]
    assert binary["grade_1"].isna().all()
    assert np.allclose(binary[["absent", "present"]].sum(axis=1), 1.0)
    wide = load_train(disc / "train.csv", task)
    assert cv["oof"] == score_grades(wide, oof, task)
    assert set(cv["oof"]["conditions"]) == set(task.condition_names)
    assert "qwk" in cv["oof"]["conditions"]["pfirrmann"]
    assert "roc_auc" in cv["oof"]["conditions"]["disc_bulging"]
    assert cv["oof"]["conditions"]["disc_narrowing"]["n"] == len(ids) * 5 - 5
    assert set(cv["baselines"]) == {"uniform", "prior", "best_constant"}
    _predicts_the_task_with_reports(run, disc, tmp_path / "pred", oof.columns.tolist())

    # The phantom first: the run grades RSNA and the disc folder teaches the localiser only.
    mixed = tmp_path / "mixed"
    cfg = load_config(
        "quick", [*TINY, "train.fold_workers=1", "localizer.tasks=[spinal]",
                  f"data.sources=[{{data_dir: {disc}, cache_dir: {rcache}}}]"]
    )  # fmt: skip
    cv = cross_validate(pdata, pcache, mixed, cfg, progress=False)
    assert cv["task"] == "rsna2024" and cv["sources"]["fake-real"]["graded"] == 0
    assert cv["oof"]["score"] > 0


def _predicts_the_task_with_reports(run: Path, data: Path, out: Path, columns: list[str]) -> None:
    """`predict` on a task run: the task's table (the oof's columns, a row per condition and
    level), grades.json named by its grades, a figure per study and an index that lists levels."""
    from PIL import Image

    from spinegrade.inference.predict import predict
    from spinegrade.phantom import generate_dataset
    from spinegrade.task import SPIDER_DISCS

    generate_dataset(out / "phantom", n_train=0, n_test=2, seed=5, workers=1)
    images = out / "phantom" / "test_images"  # DICOM studies (the run's folder holds a cache)
    result = predict(run, images, out / "table.csv", report_dir=out / "report", progress=False)
    table = pd.read_csv(out / "table.csv")
    assert table.columns.tolist() == columns and len(table) == 2 * 25
    assert result.task == SPIDER_DISCS and min(result.graded_per_study) > 0
    pf = table[table["row_id"].str.contains("pfirrmann")]
    assert np.allclose(pf[[f"grade_{g}" for g in range(1, 6)]].sum(axis=1), 1.0)
    assert table.loc[~table.index.isin(pf.index), "grade_1"].isna().all()
    assert not any("failed" in w for ws in result.warnings.values() for w in ws)
    for sid in result.study_ids:
        grades = json.loads((out / "report" / str(sid) / "grades.json").read_text())
        assert grades["task"] == "spider_discs" and len(grades["targets"]) == 25
        pfirrmann = grades["targets"]["pfirrmann_l4_l5"]
        assert list(pfirrmann["probabilities"]) == ["1", "2", "3", "4", "5"]
        assert pfirrmann["grade"] in "12345" and pfirrmann["point_lps_mm"] is not None
        assert list(grades["targets"]["disc_bulging_l4_l5"]["probabilities"]) == [
            "absent",
            "present",
        ]
        with Image.open(out / "report" / str(sid) / "figure.png") as im:
            assert im.size == (1360, 1120)
    index = (out / "report" / "index.html").read_text()
    assert "Findings by level" in index and "L4/L5: Pfirrmann grade" in index
