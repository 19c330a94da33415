"""The clinical service against a real Orthanc (DICOMweb plugin) and its page in real Chromium.

The session's tiny run (conftest.tiny_trained) grades; phantom studies are uploaded to a private
Orthanc on a loopback port (basic auth on), the loop grades them, and Orthanc is asked what
arrived.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from spinegrade.inference.ensemble import PHANTOM_CAUTION
from spinegrade.task import LABEL_COLUMNS, SEVERITY_INDEX

pytest.importorskip("highdicom", reason="pip install 'spinegrade[serve]' for the service tests")
pytest.importorskip("dicomweb_client", reason="pip install 'spinegrade[serve]'")

from serve_helpers import (
    TOKEN,
    chromium,
    chromium_missing,
    modalities,
    page_server,
    private_orthanc,
    series_in_orthanc,
    study_uid_of,
)
from spinegrade.serve.orthanc import LocalOrthanc
from spinegrade.serve.state import State, backoff_s


class _Capture(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        LOG_LINES.append(self.format(record))


LOG_LINES: list[str] = []
_CAPTURE = _Capture(level=logging.DEBUG)


# ------------------------------------------------------------------------------- unit level


def test_state_is_idempotent_supersedes_and_backs_off(tmp_path: Path) -> None:
    st = State(tmp_path / "s.db")
    assert st.observe("1.2.3", "m", "fpA", {}) == "pending"
    row = st.get("1.2.3", "m")
    st.start(row.study_uid, "m")
    st.finish(row, {"x": 1}, "sr1", "sop1", "sc1", started=0.0)
    assert st.observe("1.2.3", "m", "fpA", {}) == "graded"  # same study, same model: no regrade
    assert st.due("m") == []
    assert st.observe("1.2.3", "m", "fpB", {}) == "pending"  # a changed study is graded again
    row = st.get("1.2.3", "m")
    st.finish(row, {"x": 2}, "sr2", "sop2", "sc2", started=0.0)
    assert st.get("1.2.3", "m").superseded == [{"sr": "sr1", "sc": "sc1"}]
    # Failure: retried only after the backoff, which doubles.
    st.observe("9.9", "m", "f", {})
    st.fail(st.get("9.9", "m"), "bad", started=0.0, base_backoff_s=60)
    assert [r.study_uid for r in st.due("m")] == []
    assert [r.study_uid for r in st.due("m", now=st.get("9.9", "m").next_try)] == ["9.9"]
    assert backoff_s(1, 60) == 60 and backoff_s(3, 60) == 240 and backoff_s(30, 60) == 3600
    # An interrupted run resumes: running -> pending.
    st.observe("7.7", "m", "f", {})
    st.start("7.7", "m")
    st.close()
    st = State(tmp_path / "s.db")
    assert st.resume() == 1 and st.get("7.7", "m").status == "pending"


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with private_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def corrupt_copy(src: Path, dst: Path) -> None:
    """A study whose headers are fine but whose pixel data is cut short (a broken transfer)."""
    import pydicom

    for f in sorted(src.rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.PixelData = ds.PixelData[:64]
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out)


def retrieve(server: LocalOrthanc, study_uid: str, series_uid: str) -> list:
    """WADO-RS: the instances of a series as the PACS holds them (its own client, not ours)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = server.auth
    return list(DICOMwebClient(url=server.dicomweb_url, session=session).retrieve_series(
        study_uid, series_uid))  # fmt: skip


def caution_pixels(rgb: np.ndarray) -> int:
    """Pixels of the figure's caution colour (#8a4b00) in its top tenth (cf. test_report)."""
    top = rgb[: rgb.shape[0] // 10].astype(int)
    return int((np.abs(top - [138, 75, 0]).sum(-1) < 60).sum())


@pytest.fixture(scope="module")
def served(tiny_trained, pacs, tmp_path_factory):
    """Two good studies and a corrupt one on the PACS, one polling round done."""
    from spinegrade.serve.service import Service, load_serve_config

    data, run = tiny_trained
    studies = sorted((data / "test_images").iterdir())
    good, bad_src = studies[:2], studies[2]
    bad = tmp_path_factory.mktemp("corrupt") / bad_src.name
    corrupt_copy(bad_src, bad)
    for s in good:
        pacs.upload_folder(s)
    pacs.upload_folder(bad)
    work = tmp_path_factory.mktemp("servework")
    LOG_LINES.clear()
    logging.getLogger().addHandler(_CAPTURE)
    try:  # the capture lasts this module's tests, never the rest of the session
        cfg = load_serve_config(
            pacs_url=pacs.dicomweb_url, pacs_user=pacs.user, pacs_password=pacs.password,
            token=TOKEN, work_dir=str(work), device="cpu", backoff_s=3600.0,
        )  # fmt: skip
        svc = _wait_and_poll(Service(run, cfg))
        yield svc, [study_uid_of(s) for s in good], study_uid_of(bad), cfg, run, good
    finally:
        logging.getLogger().removeHandler(_CAPTURE)


def _wait_and_poll(svc, done=None, tries: int = 30):
    """Poll until the uploaded studies are stable (Orthanc's StableAge) and ``done`` holds."""
    import time

    def all_done(rows) -> bool:
        return len(rows) >= 3 and all(r.status in ("graded", "failed") for r in rows)

    for _ in range(tries):
        counts = svc.poll_once()
        if (done or all_done)(svc.state.all(svc.model.model_id)):
            return svc
        time.sleep(1.0)
    raise AssertionError(f"studies not seen/graded: {counts}")


def test_service_files_sr_and_sc_into_each_study(served, pacs, tmp_path) -> None:
    import pydicom
    from PIL import Image

    from spinegrade.inference.predict import predict
    from spinegrade.serve.service import study_key
    from spinegrade.serve.sr import read_sr

    svc, good, _, _, run, folders = served
    for uid, folder in zip(good, folders, strict=True):
        row = svc.state.get(uid, svc.model.model_id)
        assert row.status == "graded", row.reason
        series = series_in_orthanc(pacs, uid)
        assert modalities(series).count("SR") == 1 and modalities(series).count("OT") == 1
        # The secondary capture is the study's figure, filed into the study: the same pixels as
        # the figure the service kept, not a blank frame, with the phantom caution drawn in.
        (sc,) = retrieve(pacs, uid, row.sc_series_uid)
        assert sc.StudyInstanceUID == uid and sc.Modality == "OT"
        with Image.open(svc.work / "results" / study_key(uid) / "figure.png") as im:
            figure = np.asarray(im.convert("RGB"))
        assert np.array_equal(sc.pixel_array, figure), "the SC's pixels are not the figure's"
        assert figure.std() > 20 and len(np.unique(figure.reshape(-1, 3), axis=0)) > 100
        assert caution_pixels(figure) > 500  # a phantom-trained run (the notes below)
        (ds,) = retrieve(pacs, uid, row.sr_series_uid)
        assert ds.SOPInstanceUID == row.sr_sop_uid
        assert ds.StudyInstanceUID == uid and ds.Modality == "SR"
        content = read_sr(ds)
        assert f"model_id={svc.model.model_id}" in content["parameters"]
        assert row.result["model"]["notes"] == [PHANTOM_CAUTION]  # a phantom-trained run
        assert f"folds={','.join(map(str, svc.model.folds))}" in content["parameters"]
        probs = np.array([content["targets"][c]["probs"] for c in LABEL_COLUMNS])
        want = np.array([row.result["targets"][c]["clinical"] for c in LABEL_COLUMNS])
        assert np.allclose(probs, want, atol=1e-3) and np.allclose(probs.sum(1), 1.0)
        # De-weighted: submission.csv's probabilities divided by the class weights (1, 2, 4),
        # renormalised (the rounding to 4 places in the result allows ~1e-4).
        sub = np.array([row.result["targets"][c]["submission"] for c in LABEL_COLUMNS])
        by_hand = sub / [1.0, 2.0, 4.0]
        by_hand /= by_hand.sum(axis=1, keepdims=True)
        assert np.allclose(probs, by_hand, atol=1e-3) and not np.allclose(probs, sub, atol=1e-3)
        # The SR's points are the ones prediction finds on this study's own files.
        res = predict(run, folder, tmp_path / uid / "sub.csv", report_dir=tmp_path / uid / "r",
                      cache_dir=tmp_path / uid / "c", device="cpu", progress=False,
                      predictor=svc.predictor)  # fmt: skip
        (grades_path,) = (tmp_path / uid / "r").glob("*/grades.json")
        predicted = json.loads(grades_path.read_text())["targets"]
        assert res.graded_per_study[0] > 0
        located = [t for t in content["targets"].values() if t["point"] is not None]
        assert located, "no level point reached the SR"
        assert {c for c, t in content["targets"].items() if t["point"] is not None} == {
            c for c, t in predicted.items() if t["point_lps_mm"] is not None
        }  # the phantom's studies have every series type, so every located level has a frame
        for c, t in content["targets"].items():
            if t["point"] is not None:
                assert np.allclose(t["point"], predicted[c]["point_lps_mm"], atol=1e-2), c
        # Points live in the frame of reference of the study's own series.
        for_uids = {
            str(pydicom.dcmread(f, stop_before_pixels=True).FrameOfReferenceUID)
            for f in folder.rglob("*.dcm")
        }
        assert {t["frame_of_reference"] for t in located} <= for_uids


def dciodvfy_missing() -> str | None:
    if shutil.which("dciodvfy") is None:
        return (
            "dciodvfy is not installed; run `sudo scripts/install-serve-deps.sh` "
            "(Debian: apt-get install dicom3tools)"
        )
    return None


def private_code_items(ds) -> int:
    """Code items anywhere in ``ds`` (content tree, scheme declaration) in the private scheme."""
    from spinegrade.reporting.codes import PRIVATE_SCHEME

    return sum(
        e.keyword == "CodingSchemeDesignator" and e.value == PRIVATE_SCHEME for e in ds.iterall()
    )


def test_stored_sr_and_sc_pass_dciodvfy(served, pacs, tmp_path) -> None:
    """What a PACS team runs on what we filed: no errors; warnings only for our private codes."""
    import subprocess

    from spinegrade.reporting.codes import PRIVATE_SCHEME

    missing = dciodvfy_missing()
    if missing:
        pytest.skip(missing)
    private_warning = (
        f"Warning - Unrecognized defined term <{PRIVATE_SCHEME}> for value 1 of attribute "
        "<Coding Scheme Designator>"
    )
    svc, good, _, _, _, _ = served
    for k, uid in enumerate(good):
        row = svc.state.get(uid, svc.model.model_id)
        for kind, series_uid in (("SR", row.sr_series_uid), ("SC", row.sc_series_uid)):
            (ds,) = retrieve(pacs, uid, series_uid)  # as the PACS holds it
            path = tmp_path / f"{k}-{kind}.dcm"
            ds.save_as(path, enforce_file_format=True)
            run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                                 timeout=300, check=False)  # fmt: skip
            lines = (run.stdout + run.stderr).splitlines()
            errors = [ln for ln in lines if ln.startswith("Error")]
            warnings = [ln for ln in lines if ln.startswith("Warning")]
            assert errors == [], f"{kind}: {errors}"
            assert [w for w in warnings if w != private_warning] == [], kind
            # One warning per private code item: every other concept is coded by a standard.
            assert len(warnings) == private_code_items(ds), kind
            if kind == "SR":  # it has private codes: the output is read, not just empty
                assert warnings


def grades_from_codes(ds) -> dict[str, str]:
    """Column -> grade of an SR, read with highdicom from its codes alone: finding type, finding
    site and its laterality, grade. The tracking identifiers' text is blanked first, so nothing can
    lean on "Spinal Canal Stenosis L4/L5"."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from spinegrade.reporting import codes as sg

    ds = ds.copy()
    for elem in ds.iterall():
        if elem.keyword == "ContentSequence":
            for child in elem.value:
                name = child.get("ConceptNameCodeSequence")
                if name and name[0].CodeValue == codes.DCM.TrackingIdentifier.value:
                    child.TextValue = "?"
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    groups = [*report.get_planar_roi_measurement_groups(), *report.get_image_measurement_groups()]
    recovered: dict[str, str] = {}
    for g in groups:
        (site,) = g.finding_sites
        condition = sg.condition_of(g.finding_type, site.laterality)
        column = f"{condition}_{sg.level_of(site.value)}"
        (evaluation,) = g.get_qualitative_evaluations(name=sg.SEVERITY)
        assert column not in recovered, column
        recovered[column] = sg.severity_of(evaluation.value)
        # Standard codes wherever a standard names the concept (SNOMED CT here).
        assert site.value.scheme_designator == "SCT"
        assert (g.finding_type.scheme_designator == "SCT") != ("subarticular" in condition)
        assert site.laterality is None or site.laterality.scheme_designator == "SCT"
        assert (evaluation.value.scheme_designator == "SCT") != (recovered[column] == "Normal/Mild")
    assert sorted(recovered) == sorted(LABEL_COLUMNS)
    return recovered


def test_stored_sr_round_trips_from_its_codes_alone(served, pacs) -> None:
    """The SR as the PACS holds it gives back every target's grade in the study's grades.json."""
    from spinegrade.serve.service import study_key

    svc, good, _, _, _, _ = served
    for uid in good:
        row = svc.state.get(uid, svc.model.model_id)
        (ds,) = retrieve(pacs, uid, row.sr_series_uid)
        grades = json.loads((svc.work / "results" / study_key(uid) / "grades.json").read_text())
        want = {c: grades["targets"][c]["clinical"]["grade"] for c in LABEL_COLUMNS}
        assert grades_from_codes(ds) == want


def test_every_grade_round_trips_from_its_codes(tiny_trained) -> None:
    """The tiny run grades the phantoms Normal/Mild throughout: here each target gets a chosen
    grade (all three, on every condition), through build_sr, bytes and highdicom."""
    import io

    import pydicom

    from spinegrade.serve.sr import ModelIdentity, build_sr, read_sr
    from spinegrade.task import SEVERITIES

    data, _ = tiny_trained
    study = sorted((data / "test_images").iterdir())[0]
    evidence = {}
    for f in sorted(study.rglob("*.dcm")):
        head = pydicom.dcmread(f, stop_before_pixels=True)
        evidence.setdefault(str(head.SeriesDescription), head)
    chosen = [(k + k // 5) % 3 for k in range(len(LABEL_COLUMNS))]  # each level, each condition
    probs = np.full((len(LABEL_COLUMNS), 3), 0.1)
    probs[np.arange(len(LABEL_COLUMNS)), chosen] = 0.8
    sr = build_sr(evidence, probs, {c: None for c in LABEL_COLUMNS}, ModelIdentity("r", [0], "x"))
    buf = io.BytesIO()
    sr.save_as(buf)
    want = {c: SEVERITIES[g] for c, g in zip(LABEL_COLUMNS, chosen, strict=True)}
    assert grades_from_codes(pydicom.dcmread(io.BytesIO(buf.getvalue()))) == want
    assert {c: t["grade"] for c, t in read_sr(buf.getvalue())["targets"].items()} == want


def test_corrupt_study_fails_with_reason_and_others_are_graded(served, pacs) -> None:
    svc, good, bad, _, _, _ = served
    row = svc.state.get(bad, svc.model.model_id)
    assert row.status == "failed" and row.reason and row.next_try > row.updated
    assert "SR" not in modalities(series_in_orthanc(pacs, bad))
    assert all(svc.state.get(u, svc.model.model_id).status == "graded" for u in good)


def test_rerun_and_restart_create_no_duplicate(served, pacs) -> None:
    from spinegrade.serve.service import Service

    svc, good, _, cfg, run, _ = served
    again = Service(run, cfg, predictor=svc.predictor)  # a restart: same state folder
    counts = again.poll_once()
    assert counts["graded"] == 0 and counts["failed"] == 0
    for uid in good:
        assert modalities(series_in_orthanc(pacs, uid)).count("SR") == 1


def test_changed_study_is_regraded_and_old_results_superseded(served, pacs, tmp_path) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    svc, good, _, _, _, folders = served
    uid = good[0]
    old = svc.state.get(uid, svc.model.model_id)
    # A new MR series arrives in the study (a repeated sagittal): the study has changed.
    series_uid = generate_uid()
    first_series = sorted(p for p in folders[0].iterdir() if p.is_dir())[0]
    for f in sorted(first_series.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.SeriesNumber = 77
        ds.save_as(tmp_path / f.name)
    pacs.upload_folder(tmp_path)

    def regraded(rows) -> bool:
        return any(r.study_uid == uid and r.superseded and r.status == "graded" for r in rows)

    _wait_and_poll(svc, regraded)
    new = svc.state.get(uid, svc.model.model_id)
    assert new.status == "graded" and new.sr_series_uid != old.sr_series_uid
    assert new.superseded == [{"sr": old.sr_series_uid, "sc": old.sc_series_uid}]
    series = series_in_orthanc(pacs, uid)
    assert modalities(series).count("SR") == 1 and modalities(series).count("OT") == 1
    assert {s["0020000E"]["Value"][0] for s in series} >= {new.sr_series_uid, series_uid}


# ------------------------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def page_url(served):
    """The worklist app over the served state, in uvicorn on a free loopback port."""
    with page_server(served[0]) as url:
        yield url


def test_api_needs_the_token_and_never_shows_secrets(served, page_url, pacs) -> None:
    import requests

    _, good, bad, _, _, _ = served
    assert requests.get(f"{page_url}/api/studies", timeout=10).status_code == 401
    assert requests.get(f"{page_url}/", timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert requests.get(f"{page_url}/api/studies", headers=wrong, timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    studies = requests.get(f"{page_url}/api/studies", headers=auth, timeout=10).json()
    assert {s["study_uid"]: s["status"] for s in studies} == {
        good[0]: "graded",
        good[1]: "graded",
        bad: "failed",
    }
    key = next(s["key"] for s in studies if s["study_uid"] == good[1])
    one = requests.get(f"{page_url}/api/studies/{key}", headers=auth, timeout=10).json()
    assert len(one["result"]["targets"]) == 25
    sr = requests.get(f"{page_url}/api/studies/{key}/sr.dcm", headers=auth, timeout=10)
    assert sr.status_code == 200 and sr.content[128:132] == b"DICM"
    for path in ("/", f"/study/{key}", "/api/studies"):
        text = requests.get(f"{page_url}{path}", headers=auth, timeout=10).text
        assert TOKEN not in text and pacs.password not in text
    logged = "\n".join(LOG_LINES)
    # The capture works: the loop's lines, with the reason in our words (no exception name).
    assert "failed (attempt 1): no target could be graded" in logged
    assert TOKEN not in logged and pacs.password not in logged


def test_qido_polling_finds_the_same_studies(served, pacs, tmp_path) -> None:
    """Without the Orthanc change feed (any DICOMweb server): QIDO-RS finds every MR study."""
    from spinegrade.serve.service import Service, load_serve_config

    svc, good, bad, _, run, _ = served
    qido = load_serve_config(
        pacs_url=pacs.dicomweb_url, pacs_user=pacs.user, pacs_password=pacs.password,
        token=TOKEN, work_dir=str(tmp_path), watch="qido",
    )  # fmt: skip
    other = Service(run, qido, predictor=svc.predictor)
    assert other.discover() == 3
    assert {r.study_uid for r in other.state.due(other.model.model_id)} == {*good, bad}


def test_serve_cli_refuses_to_start_without_a_token(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from spinegrade.cli import app

    monkeypatch.delenv("SPINEGRADE_TOKEN", raising=False)
    out = CliRunner().invoke(app, ["serve", str(tmp_path), "--pacs", "http://u:pw@127.0.0.1:9/x"])
    assert out.exit_code != 0 and "SPINEGRADE_TOKEN" in out.output and "pw" not in out.output


def test_page_in_headless_chromium(served, page_url, tmp_path) -> None:
    missing = chromium_missing()
    if missing:
        pytest.skip(missing)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from spinegrade.serve.service import study_key

    svc = served[0]
    shots = Path(os.environ.get("SPINEGRADE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with chromium() as driver:
        driver.get(page_url + "/")
        assert driver.find_elements(By.ID, "token"), "no login form without the token"
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "login").click()
        # The login posts a form: wait for the worklist page it leads to (a loaded machine is slow).
        WebDriverWait(driver, 30).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#worklist tr")) >= 4
        )
        rows = driver.find_elements(By.CSS_SELECTOR, "#worklist tr")[1:]
        statuses = sorted(r.find_elements(By.TAG_NAME, "td")[4].text for r in rows)
        assert statuses == ["failed", "graded", "graded"]
        assert TOKEN not in driver.page_source
        driver.save_screenshot(str(shots / "worklist.png"))
        link = next(
            r.find_element(By.TAG_NAME, "a")
            for r in rows
            if r.find_elements(By.TAG_NAME, "td")[4].text == "graded"
        )
        link.click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grades td"))
        cells = driver.find_elements(By.CSS_SELECTOR, "#grades td")
        shown = [c.get_attribute("data-grade") for c in cells]
        assert len(cells) == 25 and set(shown) <= {"0", "1", "2"}, shown
        # The study's own grades, each once (the table orders them by condition and level).
        key = driver.current_url.rstrip("/").rsplit("/", 1)[-1]
        (row,) = [r for r in svc.state.all(svc.model.model_id) if study_key(r.study_uid) == key]
        graded = [SEVERITY_INDEX[t["grade"]] for t in row.result["targets"].values()]
        assert sorted(map(int, shown)) == sorted(graded)
        # The run learned from phantoms only: the reader is told before the grades.
        assert driver.find_element(By.CSS_SELECTOR, "p.caution").text == PHANTOM_CAUTION
        img = driver.find_element(By.CSS_SELECTOR, "img.fig")
        assert driver.execute_script("return arguments[0].naturalWidth", img) > 100
        assert driver.find_element(By.ID, "sr-link").get_attribute("href").endswith("sr.dcm")
        driver.save_screenshot(str(shots / "study.png"))
    assert (shots / "worklist.png").stat().st_size > 10_000
    assert (shots / "study.png").stat().st_size > 10_000
