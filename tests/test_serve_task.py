"""The clinical service for a task other than RSNA 2024 (SPIDER's disc grades): its page reads as a
list by level, its SR names the task's conditions and grades by codes, and both round-trip.

A tiny disc-task run is trained on the session's phantom (its labels drawn at random: plumbing,
not accuracy), starting its localiser from the session's tiny run; a study goes through a real
Orthanc as in test_serve.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from spinegrade.task import LEVEL_TITLES, SPIDER_DISCS, TASK_FILE, save_task

pytest.importorskip("highdicom", reason="pip install 'spinegrade[serve]' for the service tests")
pytest.importorskip("dicomweb_client", reason="pip install 'spinegrade[serve]'")

from serve_helpers import TOKEN, private_orthanc, study_uid_of

TASK = SPIDER_DISCS


@pytest.fixture(scope="module")
def disc_run(tiny_trained, tmp_path_factory):
    """A 2-fold run of the disc task on the tiny phantom; its localisers are the tiny run's."""
    from spinegrade.config import load_config
    from spinegrade.rsna.tables import matrix_to_wide
    from spinegrade.training.cv import cross_validate
    from tiny_config import TINY_RUN

    data, tiny = tiny_trained
    root = tmp_path_factory.mktemp("disc_task")
    disc = root / "data"
    shutil.copytree(data, disc)
    ids = pd.read_csv(disc / "train.csv")["study_id"].tolist()
    rng = np.random.default_rng(0)
    grades = [rng.integers(0, len(TASK.column_condition(c).grades), len(ids)) for c in TASK.columns]
    matrix_to_wide(ids, np.stack(grades, axis=1), TASK).to_csv(disc / "train.csv", index=False)
    save_task(TASK, disc / TASK_FILE)
    # Disc centres, as an imported set labels them: the crops of the disc task are centred there
    # (the localiser learns where they lie from its canal points). 6 px in front of the canal.
    coords = pd.read_csv(disc / "train_label_coordinates.csv")
    canal = coords[coords["condition"] == "Spinal Canal Stenosis"].drop(columns="condition")
    canal.assign(x=canal["x"] - 6.0).to_csv(disc / "train_disc_coordinates.csv", index=False)
    run = root / "run"
    run.mkdir()
    shutil.copy(tiny / "folds.csv", run / "folds.csv")  # the localisers' folds: out of fold
    cfg = load_config("quick", [*TINY_RUN, "localizer.tasks=[spinal]",
                                f"localizer.init_from={tiny}", "localizer.epochs=0"])  # fmt: skip
    cross_validate(disc, tiny.parent / "cache", run, cfg, progress=False)
    return data, run


def _evidence(study) -> dict:
    import pydicom

    out = {}
    for f in sorted(study.rglob("*.dcm")):
        head = pydicom.dcmread(f, stop_before_pixels=True)
        out.setdefault(str(head.SeriesDescription), head)
    return out


def test_every_grade_of_another_task_round_trips_through_its_sr(tiny_trained) -> None:
    """Each target of the disc task gets a chosen grade (every grade of every condition occurs),
    through build_sr, bytes and highdicom, read back from the codes alone."""
    import highdicom as hd
    import pydicom

    from spinegrade.reporting.codes import LEVEL_SITES, PRIVATE_SCHEME, codes_for
    from spinegrade.serve.sr import ModelIdentity, build_sr, read_sr

    data, _ = tiny_trained
    evidence = _evidence(sorted((data / "test_images").iterdir())[0])
    chosen, probs = {}, []
    for k, column in enumerate(TASK.columns):
        n = len(TASK.column_condition(column).grades)
        g = (k + k // 5) % n
        p = np.full(n, 0.2 / (n - 1))
        p[g] = 0.8
        chosen[column], probs = TASK.column_condition(column).grades[g], [*probs, p]
    points = {c: [1.0, 2.0, 3.0] for c in TASK.columns}
    sr = build_sr(evidence, probs, points, ModelIdentity("r", [0], "x"), task=TASK)
    buf = io.BytesIO()
    sr.save_as(buf)
    back = read_sr(buf.getvalue(), TASK)
    assert {c: t["grade"] for c, t in back["targets"].items()} == chosen
    for k, c in enumerate(TASK.columns):
        assert np.allclose(back["targets"][c]["probs"], probs[k])
    assert set(chosen.values()) >= {"1", "2", "3", "4", "5", "absent", "present"}
    # The codes: the disc of each level is SNOMED CT's (CID 7604); the conditions and grades are
    # private, declared in the SR, and no two targets share a finding type and site.
    ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    groups = [*report.get_planar_roi_measurement_groups(), *report.get_image_measurement_groups()]
    tc = codes_for(TASK)
    seen = set()
    for g in groups:
        (site,) = g.finding_sites
        assert site.value.scheme_designator == "SCT" and site.laterality is None
        assert g.finding_type.scheme_designator == PRIVATE_SCHEME
        seen.add((g.finding_type.value, site.value.value))
    assert len(seen) == len(TASK.columns) == 25
    assert {s for _, s in seen} == {LEVEL_SITES[lv].value for lv in TASK.levels}
    assert all(len(code.value) <= 16 for codes in tc.probabilities.values() for code in codes)
    # RSNA's reader refuses a disc-task SR instead of misreading it.
    with pytest.raises(ValueError, match="no condition is coded"):
        read_sr(buf.getvalue())


def test_codes_a_task_gives_are_what_its_sr_names(tiny_trained) -> None:
    """A task.yaml's own codes (here a hospital's scheme for Pfirrmann's finding and grades) are
    the SR's finding type and graded values, and read back to the same grades."""
    import highdicom as hd
    import pydicom

    from spinegrade.serve.sr import ModelIdentity, build_sr, read_sr
    from test_task import _coded_spider

    coded = _coded_spider()
    data, _ = tiny_trained
    evidence = _evidence(sorted((data / "test_images").iterdir())[0])
    probs = []
    for k, column in enumerate(coded.columns):
        p = np.full(len(coded.column_condition(column).grades), 0.1)
        p[k % len(p)] = 1.0
        probs.append(p / p.sum())
    points = {c: [1.0, 2.0, 3.0] for c in coded.columns}
    sr = build_sr(evidence, probs, points, ModelIdentity("r", [0], "x"), task=coded)
    buf = io.BytesIO()
    sr.save_as(buf)
    back = read_sr(buf.getvalue(), coded)
    want = {c: coded.column_condition(c).grades[k % len(probs[k])]
            for k, c in enumerate(coded.columns)}  # fmt: skip
    assert {c: t["grade"] for c, t in back["targets"].items()} == want
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(buf.getvalue())))
    groups = [*report.content.get_planar_roi_measurement_groups(),
              *report.content.get_image_measurement_groups()]  # fmt: skip
    types = {(g.finding_type.value, g.finding_type.scheme_designator) for g in groups}
    assert ("PFIRR", "99HOSP") in types and ("N1", "99HOSP") in types
    graded = {
        (item.value.value, item.value.scheme_designator)
        for g in groups for item in g.get_qualitative_evaluations()
    }  # fmt: skip
    assert {("PF1", "99HOSP"), ("PF2", "99HOSP")} <= graded


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with private_orthanc(tmp_path_factory.mktemp("orthanc_task")) as server:
        yield server


def test_service_grades_another_task_and_files_its_sr(disc_run, pacs, tmp_path) -> None:
    """A disc-task run serves: the study is graded by the task's conditions, the SR the PACS
    holds re-reads to the worklist's grades, and the page lists the findings level by level."""
    import time

    import requests
    from dicomweb_client.api import DICOMwebClient

    from spinegrade.serve.app import _study_page
    from spinegrade.serve.service import Service, load_serve_config, study_key
    from spinegrade.serve.sr import read_sr

    data, run = disc_run
    study = sorted((data / "test_images").iterdir())[0]
    pacs.upload_folder(study)
    cfg = load_serve_config(
        pacs_url=pacs.dicomweb_url, pacs_user=pacs.user, pacs_password=pacs.password,
        token=TOKEN, work_dir=str(tmp_path / "work"), device="cpu", backoff_s=3600.0,
    )  # fmt: skip
    svc = Service(run, cfg)
    assert svc.task == TASK
    uid = study_uid_of(study)
    for _ in range(30):
        svc.poll_once()
        row = svc.state.get(uid, svc.model.model_id)
        if row is not None and row.status in ("graded", "failed"):
            break
        time.sleep(1.0)
    assert row is not None and row.status == "graded", row and row.reason
    result = row.result
    assert result["task"] == TASK.name and list(result["targets"]) == list(TASK.columns)
    for c, t in result["targets"].items():
        grades = TASK.column_condition(c).grades
        assert t["grade"] in grades and len(t["clinical"]) == len(grades)
        assert t["clinical"] == t["submission"]  # equal class weights: nothing to remove
        # The most probable grade (the shown values are rounded to 4 places: ties within that)
        assert t["clinical"][grades.index(t["grade"])] >= max(t["clinical"]) - 1e-4
    assert "weights every grade equally" in result["note"]
    saved = json.loads((svc.work / "results" / study_key(uid) / "grades.json").read_text())
    assert saved["task"] == TASK.name
    # The SR as the PACS holds it.
    session = requests.Session()
    session.auth = pacs.auth
    client = DICOMwebClient(url=pacs.dicomweb_url, session=session)
    (ds,) = client.retrieve_series(uid, row.sr_series_uid)
    back = read_sr(ds, TASK)
    assert {c: t["grade"] for c, t in back["targets"].items()} == {
        c: t["grade"] for c, t in result["targets"].items()
    }
    # The page: a row per level, a column per finding, each cell the grade and its probability.
    page = _study_page(study_key(uid), row, TASK).body.decode()
    assert "<th>Level</th><th>Pfirrmann grade</th><th>Disc narrowing</th>" in page
    for lv in TASK.levels:
        assert f"<tr><th>{LEVEL_TITLES[lv]}</th>" in page
    cell = result["targets"]["pfirrmann_l4_l5"]
    g = TASK.condition("pfirrmann").grades.index(cell["grade"])
    assert f"data-grade='{g}'>{cell['grade']} {cell['clinical'][g]:.0%}" in page
