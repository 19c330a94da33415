"""Phantom dataset: label model, RSNA layout, DICOM headers, geometry round trips, determinism."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from spinegrade.evaluation.metrics import prior_submission, score_frames
from spinegrade.phantom import labels as pl
from spinegrade.phantom.anatomy import SPINAL, label_point
from spinegrade.phantom.generate import SynthConfig, generate_dataset, load_study_anatomy
from spinegrade.rsna.submission import submission_frame
from spinegrade.task import (
    CONDITION_TITLES,
    LABEL_COLUMNS,
    LEVEL_TITLES,
    LEVELS,
    PROB_COLUMNS,
    SERIES_DESCRIPTIONS,
    SEVERITIES,
)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
COND_INDEX = {title: i for i, title in enumerate(CONDITION_TITLES.values())}
LEVEL_INDEX = {LEVEL_TITLES[lv]: i for i, lv in enumerate(LEVELS)}


# ----------------------------------------------------------------------------- label model


def _simulate(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    model = pl.LabelModel()
    rng = np.random.default_rng(seed)
    z = pl.sample_latents(rng, n, model)
    probs = pl.class_probs(z, model.reader_sd)
    grades = pl.sample_grades(rng, probs)
    wide = pd.DataFrame(np.array(SEVERITIES)[grades], columns=list(LABEL_COLUMNS))
    wide.insert(0, "study_id", np.arange(1000, 1000 + n))
    return wide, probs, grades


def _submission(ids, probs: np.ndarray) -> pd.DataFrame:
    return submission_frame(dict(zip(ids, probs, strict=True)))


def test_class_probs_are_a_distribution_and_ordered():
    z = np.linspace(-4, 4, 101)
    p = pl.class_probs(z, 0.5)
    assert np.allclose(p.sum(axis=1), 1.0) and (p >= 0).all()
    assert np.all(np.diff(p[:, 0]) <= 1e-12) and np.all(np.diff(p[:, 2]) >= -1e-12)
    at = pl.class_probs(np.array([0.0, 1.0]), 0.5)  # the Moderate and Severe thresholds
    assert at[0, 0] == pytest.approx(0.5) and at[1, 2] == pytest.approx(0.5)


def test_marginals_match_the_real_per_level_tables():
    _, _, grades = _simulate(20000)
    for group, (ge_mod, severe) in pl.LEVEL_TARGETS.items():
        cols = [
            j
            for j, c in enumerate(LABEL_COLUMNS)
            if group in c  # "spinal", "foraminal", "subarticular" name their columns
        ]
        g = grades[:, cols].reshape(len(grades), -1, 5)
        assert np.allclose((g >= 1).mean(axis=(0, 1)), ge_mod, atol=0.02), group
        assert np.allclose((g == 2).mean(axis=(0, 1)), severe, atol=0.015), group


def test_degeneration_is_correlated_like_the_real_labels():
    _, _, g = _simulate(8000, seed=1)
    c = np.corrcoef(g.T)
    adjacent = np.mean([c[k * 5 + lv, k * 5 + lv + 1] for k in range(5) for lv in range(4)])
    four_apart = np.mean([c[k * 5, k * 5 + 4] for k in range(5)])
    left_right = np.mean(
        [c[5 + lv, 10 + lv] for lv in range(5)] + [c[15 + lv, 20 + lv] for lv in range(5)]
    )
    assert 0.2 < adjacent < 0.5 and four_apart < adjacent and 0.25 < left_right < 0.55
    severe_spinal = (g[:, :5] == 2).any(axis=1).mean()
    assert 0.12 < severe_spinal < 0.25  # real: 18.5% of studies


def test_true_probabilities_reach_the_bayes_limit_and_beat_the_prior():
    wide, probs, _ = _simulate(3000, seed=2)
    ids = wide["study_id"].tolist()
    truth = score_frames(wide, _submission(ids, probs))["score"]
    weighted = score_frames(wide, _submission(ids, pl.weighted_optimal(probs)))["score"]
    prior = score_frames(wide, prior_submission(wide, ids))["score"]
    assert 0.28 < truth < 0.45, truth
    assert weighted < truth  # reweighting by 1/2/4 is optimal for the weighted metric
    assert prior > 0.85 and prior - truth > 0.4


# ----------------------------------------------------------------------------- the files


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    generate_dataset(out, 3, 1, seed=5)
    return out


def _read(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_layout_and_tables(dataset: Path):
    for name in (
        "train.csv",
        "train_series_descriptions.csv",
        "train_label_coordinates.csv",
        "test_series_descriptions.csv",
        "sample_submission.csv",
        "truth/test_labels.csv",
        "truth/train_true_probs.csv",
        "truth/test_true_probs.csv",
        "truth/phantom.json",
    ):
        assert (dataset / name).is_file(), name
    assert not (dataset / "truth" / ".incomplete").exists()
    train = pd.read_csv(dataset / "train.csv")
    assert list(train.columns) == ["study_id", *LABEL_COLUMNS] and len(train) == 3
    assert set(train[list(LABEL_COLUMNS)].stack()) <= {"Normal/Mild", "Moderate", "Severe"}
    for split, n in (("train", 3), ("test", 1)):
        series = _read(dataset / f"{split}_series_descriptions.csv")
        assert len({r["study_id"] for r in series}) == n
        for r in series:
            assert r["series_description"] in SERIES_DESCRIPTIONS
            folder = dataset / f"{split}_images" / r["study_id"] / r["series_id"]
            files = sorted(folder.glob("*.dcm"))
            assert 3 <= len(files) <= 40
        probs = pd.read_csv(dataset / "truth" / f"{split}_true_probs.csv")
        assert len(probs) == 25 * n and np.allclose(
            probs[list(PROB_COLUMNS)].sum(axis=1), 1, atol=1e-6
        )
        assert probs["row_id"].tolist() == sorted(probs["row_id"])
    sub = pd.read_csv(dataset / "sample_submission.csv")
    assert list(sub.columns) == ["row_id", *PROB_COLUMNS] and len(sub) == 25
    coords = _read(dataset / "train_label_coordinates.csv")
    assert len(coords) == 3 * 25  # clean data: every cell labelled and located
    for r in coords:
        assert (
            dataset
            / "train_images"
            / r["study_id"]
            / r["series_id"]
            / f"{r['instance_number']}.dcm"
        ).is_file()
    assert not (dataset / "test_label_coordinates.csv").exists()


def test_evaluate_prints_the_bayes_limit_of_the_truth(dataset: Path):
    from typer.testing import CliRunner

    from spinegrade.cli import app

    # The limit's value is checked by hand below (test_bayes_limit_of_a_hand_made_truth); here,
    # the three ways to name the truth, the printed table and the wrong split.
    labels_csv = dataset / "truth" / "test_labels.csv"
    args = ["evaluate", str(dataset / "sample_submission.csv"), "--labels", str(labels_csv)]
    runner = CliRunner()
    limits = []
    # The data folder, its truth/ folder or the split's CSV: the same limit.
    for truth in (dataset, dataset / "truth", dataset / "truth" / "test_true_probs.csv"):
        out = runner.invoke(app, [*args, "--truth", str(truth), "--json"])
        assert out.exit_code == 0, out.output
        res = json.loads(out.output)
        assert res["bayes_limit"]["score"] < res["score"]  # uniform 1/3 is far from the limit
        limits.append(res["bayes_limit"])
    assert limits[0] == limits[1] == limits[2]
    text = runner.invoke(app, [*args, "--truth", str(dataset)])
    assert text.exit_code == 0 and "Bayes limit" in text.output
    assert f"{limits[0]['score']:.4f}" in text.output
    # The train split's truth does not know the test studies: a clear error, not a wrong number.
    wrong = dataset / "truth" / "train_true_probs.csv"
    bad = runner.invoke(app, [*args, "--truth", str(wrong)])
    assert bad.exit_code == 2 and "no probabilities for 1 labelled studies" in bad.output


def test_bayes_limit_of_a_hand_made_truth(tmp_path: Path):
    # One study whose every true probability is (0.5, 0.3, 0.2); all labels Normal/Mild except a
    # Severe spinal L4/L5 and a Moderate left subarticular L5/S1. With weights 1/2/4 the best
    # submission is (0.5, 0.6, 0.8) / 1.9 on every row, so with a = -ln(0.5/1.9),
    # b = -ln(0.6/1.9), c = -ln(0.8/1.9) the four terms are:
    # spinal (4a + 4c) / 8, foraminal a, subarticular (9a + 2b) / 11, any-severe c (y = 1).
    from typer.testing import CliRunner

    from spinegrade.cli import app

    a, b, c = (-math.log(x / 1.9) for x in (0.5, 0.6, 0.8))
    want = {"spinal": (a + c) / 2, "foraminal": a, "subarticular": (9 * a + 2 * b) / 11,
            "any_severe_spinal": c}  # fmt: skip
    want["score"] = sum(want.values()) / 4
    labels = {col: "Normal/Mild" for col in LABEL_COLUMNS}
    labels |= {
        "spinal_canal_stenosis_l4_l5": "Severe",
        "left_subarticular_stenosis_l5_s1": "Moderate",
    }
    pd.DataFrame([{"study_id": 7, **labels}]).to_csv(tmp_path / "labels.csv", index=False)
    rows = [f"7_{col}" for col in LABEL_COLUMNS]
    truth = pd.DataFrame({"row_id": rows, "normal_mild": 0.5, "moderate": 0.3, "severe": 0.2})
    truth.to_csv(tmp_path / "test_true_probs.csv", index=False)
    uniform = pd.DataFrame({"row_id": rows, "normal_mild": 1 / 3, "moderate": 1 / 3,
                            "severe": 1 / 3})  # fmt: skip
    uniform.to_csv(tmp_path / "sub.csv", index=False)
    out = CliRunner().invoke(app, ["evaluate", str(tmp_path / "sub.csv"), "--labels",
                                   str(tmp_path / "labels.csv"), "--truth",
                                   str(tmp_path / "test_true_probs.csv"), "--json"])  # fmt: skip
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert res["bayes_limit"] == pytest.approx(want, rel=1e-9)
    # Uniform 1/3 loses ln 3 on every labelled row and on the any-severe study alike.
    assert res["score"] == pytest.approx(math.log(3), rel=1e-9)


def test_dicom_headers(dataset: Path):
    series = _read(dataset / "train_series_descriptions.csv")
    study_uids = {}
    for r in series:
        files = list((dataset / "train_images" / r["study_id"] / r["series_id"]).glob("*.dcm"))
        numbers = []
        for f in files:
            ds = pydicom.dcmread(f)
            assert ds.file_meta.MediaStorageSOPClassUID == MR_IMAGE_STORAGE == ds.SOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.Modality == "MR" and ds.SeriesDescription == r["series_description"]
            assert ds.PatientID and str(ds.PatientID) != r["study_id"] and str(ds.PatientName)
            assert study_uids.setdefault(r["study_id"], ds.StudyInstanceUID) == ds.StudyInstanceUID
            assert int(f.stem) == ds.InstanceNumber
            arr = ds.pixel_array
            assert arr.dtype == np.uint16 and arr.shape == (ds.Rows, ds.Columns)
            assert 384 <= ds.Rows <= 640 or r["series_description"] == "Axial T2"
            assert 0.45 <= float(ds.PixelSpacing[0]) <= 0.95 and float(ds.SliceThickness) > 2.5
            assert ds.RescaleSlope is not None and ds.RescaleIntercept is not None
            iop = np.array(ds.ImageOrientationPatient, dtype=float).reshape(2, 3)
            assert np.allclose(iop @ iop.T, np.eye(2), atol=1e-6)
            numbers.append(ds.InstanceNumber)
        assert sorted(numbers) == list(range(1, len(files) + 1))
    assert len(set(study_uids.values())) == 3


def _geometry(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    spacing = np.array(ds.PixelSpacing, dtype=float)
    return np.array(ds.ImagePositionPatient, dtype=float), iop[:3], iop[3:], spacing


def _to_patient(path: Path, x: float, y: float) -> np.ndarray:
    pos, row, col, (dy, dx) = _geometry(path)
    return pos + x * dx * row + y * dy * col


def _label_file(dataset: Path, study_id: int, row) -> Path:
    """The DICOM file a coordinate row points at."""
    series = dataset / "train_images" / str(study_id) / str(row.series_id)
    return series / f"{row.instance_number}.dcm"


def test_label_points_sit_on_their_structures(dataset: Path):
    """(instance, x, y) -> patient space lands on the anatomy's landmark (jitter + half a slice)."""
    coords = pd.read_csv(dataset / "train_label_coordinates.csv")
    for study_id, rows in coords.groupby("study_id"):
        anat = load_study_anatomy(dataset, int(study_id))
        for r in rows.itertuples():
            path = _label_file(dataset, int(study_id), r)
            p = _to_patient(path, r.x, r.y)
            truth = anat.to_patient(
                label_point(anat, COND_INDEX[r.condition], LEVEL_INDEX[r.level])
            )
            assert np.linalg.norm(p - truth) < 5.0, (study_id, r.condition, r.level)


def test_points_project_onto_the_axial_stack_of_their_level(dataset: Path):
    """A spinal point, mapped through patient space, falls on the axial slices of its own level."""
    coords = pd.read_csv(dataset / "train_label_coordinates.csv")
    for study_id, rows in coords.groupby("study_id"):
        sub = rows[rows["condition"].str.contains("Subarticular")]
        axial = dataset / "train_images" / str(study_id) / str(sub["series_id"].iloc[0])
        geo = {int(f.stem): _geometry(f) for f in axial.glob("*.dcm")}
        for r in rows[rows["condition"] == "Spinal Canal Stenosis"].itertuples():
            path = _label_file(dataset, int(study_id), r)
            p = _to_patient(path, r.x, r.y)
            dist = {k: abs((p - g[0]) @ np.cross(g[1], g[2])) for k, g in geo.items()}
            nearest = min(dist, key=dist.get)
            label_inst = int(sub[(sub["level"] == r.level)]["instance_number"].iloc[0])
            assert np.allclose(geo[nearest][1:3], geo[label_inst][1:3]), (study_id, r.level)
            assert dist[nearest] < 6.0


def test_sides_and_level_order(dataset: Path):
    coords = pd.read_csv(dataset / "train_label_coordinates.csv")
    for study_id, rows in coords.groupby("study_id"):
        spinal = rows[rows["condition"] == "Spinal Canal Stenosis"].sort_values("level")
        assert spinal["y"].is_monotonic_increasing  # L1/L2 above L5/S1 on the sagittal image
        for level in LEVEL_INDEX:
            at = rows[rows["level"] == level].set_index("condition")
            # patient left appears on the image right of an axial slice
            assert (
                at.loc["Left Subarticular Stenosis", "x"]
                > at.loc["Right Subarticular Stenosis", "x"]
            )
            pts = {}
            for cond in ("Left Neural Foraminal Narrowing", "Right Neural Foraminal Narrowing"):
                r = at.loc[cond]
                path = (
                    dataset
                    / "train_images"
                    / str(study_id)
                    / str(r.series_id)
                    / f"{r.instance_number}.dcm"
                )
                pts[cond] = _to_patient(path, r.x, r.y)
            assert (
                pts["Left Neural Foraminal Narrowing"][0]
                > pts["Right Neural Foraminal Narrowing"][0] + 20
            )


def test_severe_canal_is_darker_than_normal_on_t2(tmp_path: Path):
    """The label spot shows the severity: less CSF (signal) at a severe spinal level."""
    from spinegrade.phantom import anatomy as pa
    from spinegrade.phantom.ops import build_ops
    from spinegrade.phantom.render import SagittalGeometry, Scanner, SeriesPlan, render_slice

    sev = np.full((5, 5), 0.1)
    sev[SPINAL, 3] = 0.95
    rng = np.random.default_rng(0)
    anat = pa.sample_anatomy(rng, sev)
    ops, scanner = build_ops(anat), Scanner.random(rng)
    scanner.noise = 0.0
    plan = SeriesPlan("Sagittal T2/STIR", "T2", SagittalGeometry.plan(rng, anat, 15).slices(384))
    means = []
    for level in (1, 3):
        point = anat.to_patient(label_point(anat, SPINAL, level))
        k, x, y, _ = plan.nearest_slice(point)
        img = render_slice(rng, anat, ops, scanner, plan.slices[k], ("T2",))[0].astype(float)
        r = int(3.0 / plan.slices[k].spacing[0])
        means.append(img[int(y) - r : int(y) + r + 1, int(x) : int(x) + 2 * r + 1].mean())
    assert means[1] < 0.75 * means[0], means


def test_age_changes_the_images_only(monkeypatch):
    """Desiccated discs, fatty marrow and the sacral remnant come from their own random stream:
    the spine's geometry and every later draw of the study (so the labels) are unchanged, and
    older spines (brighter T2 marrow) have darker discs."""
    from spinegrade.phantom import anatomy as pa

    sev = np.full((5, 5), 0.1)
    aged, rng_a = [], []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        aged.append(pa.sample_anatomy(rng, sev))
        rng_a.append(rng.random())
    monkeypatch.setattr(pa, "_age_contrast", lambda anat: None)
    for seed in range(30):
        rng = np.random.default_rng(seed)
        plain = pa.sample_anatomy(rng, sev)
        assert rng.random() == rng_a[seed]  # the study's next draws are the same
        a = aged[seed]
        assert np.allclose(a.rotation, plain.rotation) and a.texture_seed == plain.texture_seed
        for da, dp in zip(a.discs, plain.discs, strict=True):
            assert np.allclose(da.frame.origin, dp.frame.origin) and da.height == dp.height
            assert da.nucleus_t2 <= dp.nucleus_t2
        assert plain.marrow_gain == (1.0, 1.0, 1.0)
    lumbar = slice(pa.FIRST_LABEL_DISC, pa.S1_INDEX)
    loss = [np.mean([d.nucleus_t2 for d in a.discs[lumbar]]) for a in aged]
    marrow_t2 = [a.marrow_gain[1] for a in aged]
    assert np.corrcoef(loss, marrow_t2)[0, 1] < -0.3
    assert min(marrow_t2) >= 0.8 and max(marrow_t2) <= 1.8
    remnants = [a.discs[pa.S1_INDEX].remnant for a in aged]
    assert min(remnants) >= 0.4 and max(remnants) <= 1.8 and np.std(remnants) > 0.2


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path):
    def digest(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    small = SynthConfig(sagittal_slices=(6, 7), axial_per_level=(1, 2))
    generate_dataset(tmp_path / "a", 1, 1, seed=9, workers=1, config=small)
    generate_dataset(tmp_path / "b", 1, 1, seed=9, workers=2, config=small)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    generate_dataset(tmp_path / "c", 1, 0, seed=10, config=small)
    assert (tmp_path / "c" / "train.csv").read_bytes() != (
        tmp_path / "a" / "train.csv"
    ).read_bytes()


def test_refuses_to_overwrite(tmp_path: Path):
    (tmp_path / "train.csv").write_text("study_id\n")
    with pytest.raises(FileExistsError, match="did not write"):
        generate_dataset(tmp_path, 1, 0)
    assert (tmp_path / "train.csv").read_text() == "study_id\n"


def test_quirks(tmp_path: Path):
    cfg = SynthConfig(quirks=True, quirk_scale=6.0, sagittal_slices=(5, 6), axial_per_level=(1, 2))
    generate_dataset(tmp_path, 4, 2, seed=3, config=cfg)
    series = pd.read_csv(tmp_path / "train_series_descriptions.csv")
    train = pd.read_csv(tmp_path / "train.csv", dtype=str)
    assert train[list(LABEL_COLUMNS)].isna().any().any()  # empty cells
    per_study = (
        series.groupby("study_id")["series_description"].value_counts().unstack(fill_value=0)
    )
    assert (per_study.get("Axial T2", 0) >= 2).any() or (per_study.sum(axis=1) < 3).any()
    first = []
    for r in series.itertuples():
        folder = tmp_path / "train_images" / str(r.study_id) / str(r.series_id)
        first.append(min(int(p.stem) for p in folder.glob("*.dcm")))
    assert max(first) > 1  # some series numbered from an offset, as scanners sometimes do
    test_file = next((tmp_path / "test_images").rglob("*.dcm"))
    assert "SliceThickness" not in pydicom.dcmread(test_file, stop_before_pixels=True)


def test_reader_sees_one_stack_per_axial_level(dataset: Path):
    from spinegrade.io import dicom

    series = _read(dataset / "train_series_descriptions.csv")
    for r in series:
        read = dicom.read_series(dataset / "train_images" / r["study_id"] / r["series_id"])
        assert not read.skipped
        if r["series_description"] == "Axial T2":
            assert len(read.stacks) == 5 and all(s.plane == "axial" for s in read.stacks)
        else:
            assert len(read.stacks) == 1 and read.stacks[0].plane == "sagittal"
            assert 15 <= read.stacks[0].shape[0] <= 17


def test_cli_preview(tmp_path: Path):
    from typer.testing import CliRunner

    from spinegrade.cli import app

    result = CliRunner().invoke(app, ["synth", "--preview", str(tmp_path)])
    assert result.exit_code == 0, result.output
    pngs = {p.name for p in tmp_path.glob("*.png")}
    assert {"sagittal_t2_mid.png", "axial_t2_l4_l5_severe.png", "preview.png"} <= pngs
