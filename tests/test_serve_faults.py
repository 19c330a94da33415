"""The service under faults (#25): a PACS that goes away, many studies at once, a process killed
at each step, a full disk; and the page against hostile metadata and requests without the token.

Against a real Orthanc (LocalOrthanc, loopback, basic auth) and, for the page, a real headless
Chromium, as test_serve.py. Every count is asked of Orthanc itself: how many SR instances a study
holds there, not what our state believes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

pytest.importorskip("highdicom", reason="pip install 'spinegrade[serve]' for the service tests")
pytest.importorskip("dicomweb_client", reason="pip install 'spinegrade[serve]'")

from serve_helpers import (
    TOKEN,
    chromium,
    chromium_missing,
    copy_study,
    instances_in_orthanc,
    page_server,
    private_orthanc,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Studies sent at once in the test (bench/bench_serve_faults.py sends 50).
MANY = 6


class Killed(BaseException):
    """A process killed at this point: like SIGKILL, no ``except Exception`` handler runs."""


@pytest.fixture
def pacs(tmp_path):
    """An Orthanc of the test's own: a service's first poll reads the whole change feed, so a
    shared one would grade every earlier test's studies again."""
    with private_orthanc(tmp_path / "orthanc") as server:
        yield server


@pytest.fixture(scope="module")
def predictor(tiny_trained):
    """The tiny run's ensemble, loaded once for every service of this module."""
    from spinegrade.inference.ensemble import Predictor

    return Predictor.from_run_dir(tiny_trained[1], None, "cpu", "auto")


def make_service(tiny_trained, predictor, server, work: Path, **settings):
    from spinegrade.serve.service import Service, load_serve_config

    cfg = load_serve_config(
        pacs_url=server.dicomweb_url, pacs_user=server.user, pacs_password=server.password,
        token=TOKEN, work_dir=str(work), device="cpu", **settings,
    )  # fmt: skip
    return Service(tiny_trained[1], cfg, predictor=predictor)


def phantom_studies(tiny_trained) -> list[Path]:
    return sorted((tiny_trained[0] / "test_images").iterdir())


def send(server, tiny_trained, tmp: Path, tag: str, k: int = 0, **fields) -> str:
    """A copy of the k-th phantom test study under new UIDs, uploaded; its Study UID."""
    folder = tmp / tag
    uid = copy_study(phantom_studies(tiny_trained)[k % 3], folder, tag, **fields)
    server.upload_folder(folder)
    return uid


def wait_for(check, timeout_s: float, what: str, step_s: float = 0.3):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def poll_until(svc, uids: list[str], statuses: set[str], timeout_s: float = 120):
    """Poll rounds until every study in ``uids`` has one of ``statuses``."""

    def done() -> bool:
        svc.poll_once()
        rows = [svc.state.get(u, svc.model.model_id) for u in uids]
        return all(r is not None and r.status in statuses for r in rows)

    return wait_for(done, timeout_s, f"{len(uids)} study(ies) {sorted(statuses)}", 0.5)


def outcomes(svc, uid: str) -> list[str]:
    return [a["outcome"] for a in svc.state.attempts(uid)]


def assert_one_result(server, svc, uid: str) -> None:
    """Orthanc holds exactly one SR and one SC in the study, the ones the state names."""
    row = svc.state.get(uid, svc.model.model_id)
    assert row.status == "graded", row.reason
    assert instances_in_orthanc(server, uid, "SR") == [row.sr_sop_uid]
    assert len(instances_in_orthanc(server, uid, "OT")) == 1
    assert outcomes(svc, uid).count("graded") == 1


# ------------------------------------------------------------------------------ the PACS away


def test_orthanc_stopped_mid_grading_is_graded_once_when_back(
    tiny_trained, predictor, pacs, tmp_path, caplog
) -> None:
    """Orthanc goes down while a study is being predicted: the store fails, the study backs off,
    the loop keeps polling through the outage, and once Orthanc is back it is graded once."""
    from spinegrade.serve.service import Service

    caplog.set_level(logging.INFO, logger="spinegrade.serve.service")
    uid = send(pacs, tiny_trained, tmp_path, "outage")
    svc = make_service(tiny_trained, predictor, pacs, tmp_path / "work", backoff_s=2.0,
                       poll_s=0.3)  # fmt: skip
    original = Service.retrieve
    stopped = threading.Event()

    def retrieve_then_lose_the_pacs(self, study_uid, folder):
        headers = original(self, study_uid, folder)
        if not stopped.is_set():
            pacs.stop()  # the images are here; the PACS is gone before the results go back
            stopped.set()
        return headers

    svc.retrieve = retrieve_then_lose_the_pacs.__get__(svc)
    loop = threading.Thread(target=svc.run_forever, daemon=True)
    loop.start()
    try:
        wait_for(stopped.is_set, 120, "the study's images to be retrieved")
        wait_for(lambda: svc.state.get(uid, svc.model.model_id).status == "failed", 120,
                 "the store to fail")  # fmt: skip
        row = svc.state.get(uid, svc.model.model_id)
        assert row.attempts == 1 and "ConnectionError" in row.reason
        wait_for(lambda: "poll failed" in caplog.text, 30, "a poll during the outage")
        pacs.start()
        wait_for(
            lambda: svc.state.get(uid, svc.model.model_id).status == "graded", 120,
            "the study to be graded after the restart",
        )  # fmt: skip
    finally:
        svc.stop_event.set()
        loop.join(timeout=60)
    assert outcomes(svc, uid) == ["failed", "graded"]
    assert_one_result(pacs, svc, uid)
    text = caplog.text
    # The backoff is in the log: the failure, its attempt and the wait before the retry.
    assert "failed (attempt 1): ConnectionError" in text and "retrying in 2 s" in text
    assert "poll failed (ConnectionError" in text


# ----------------------------------------------------------------------- many studies at once


def test_many_studies_at_once_each_graded_once_and_the_page_answers(
    tiny_trained, predictor, pacs, tmp_path
) -> None:
    uids = [send(pacs, tiny_trained, tmp_path, f"many-{k}", k) for k in range(MANY)]
    svc = make_service(tiny_trained, predictor, pacs, tmp_path / "work", poll_s=0.5)
    seen: list[tuple[float, int]] = []  # (seconds to answer, studies graded at that moment)
    loop = threading.Thread(target=svc.run_forever, daemon=True)
    with page_server(svc) as url:
        loop.start()
        try:
            deadline = time.monotonic() + 60 * MANY
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                rows = requests.get(f"{url}/api/studies", headers=AUTH, timeout=30).json()
                page = requests.get(f"{url}/", headers=AUTH, timeout=30)
                graded = sum(r["status"] == "graded" for r in rows)
                seen.append((time.perf_counter() - t0, graded))
                assert page.status_code == 200 and "worklist" in page.text
                if graded == MANY:
                    break
                time.sleep(0.5)
        finally:
            svc.stop_event.set()
            loop.join(timeout=120)
    for uid in uids:
        assert_one_result(pacs, svc, uid)
        assert outcomes(svc, uid) == ["graded"]
    # The page answered while grading went on, and promptly (a slow, shared machine: 5 s).
    during = [s for s, graded in seen if 0 < graded < MANY]
    assert during, f"no answer while grading went on: {seen}"
    assert max(s for s, _ in seen) < 5.0, seen


# --------------------------------------------------------------------- killed at every step


def _kill_after(monkeypatch, owner, name: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        original(*args, **kwargs)
        raise Killed(f"killed after {name}")

    monkeypatch.setattr(owner, name, wrapper)


def test_killed_at_each_step_then_restarted_files_one_sr_and_loses_no_study(
    tiny_trained, predictor, pacs, tmp_path
) -> None:
    """A crash after the retrieve, after the prediction, after the STOW-RS and just before the
    state update, each followed by a restart on the same work folder: in the end every study is
    graded, and Orthanc holds one SR and one SC per study."""
    import spinegrade.inference.predict as predict_module
    from spinegrade.serve.pacs import Pacs
    from spinegrade.serve.service import Service
    from spinegrade.serve.state import State

    uids = [send(pacs, tiny_trained, tmp_path, f"kill-{k}", k) for k in range(2)]
    work = tmp_path / "work"

    def refuse_finish(*args, **kwargs):
        raise Killed("killed before the state update")

    steps = {
        "after retrieve": lambda mp: _kill_after(mp, Service, "retrieve"),
        "after predict": lambda mp: _kill_after(mp, predict_module, "predict"),
        "after the SR store": lambda mp: _kill_after(mp, Pacs, "store"),
        "before the state update": lambda mp: mp.setattr(State, "finish", refuse_finish),
    }
    filed: dict[str, list[str]] = {}  # study -> the SRs Orthanc held right after a crash
    for step, arm in steps.items():
        svc = make_service(tiny_trained, predictor, pacs, work)  # a (re)start
        with pytest.MonkeyPatch.context() as mp:
            arm(mp)
            with pytest.raises(Killed):
                wait_for(lambda svc=svc: svc.poll_once() and False, 120, f"a crash {step}")
        running = [r for r in svc.state.all() if r.status == "running"]
        assert len(running) == 1, step  # left mid-grading, as a killed process leaves it
        if step in ("after the SR store", "before the state update"):
            uid = running[0].study_uid
            filed[uid] = instances_in_orthanc(pacs, uid, "SR")
            # The SR is on the PACS though the state never heard of it.
            assert len(filed[uid]) == 1 and running[0].sr_sop_uid is None, step
        svc.state.close()
    assert filed
    svc = make_service(tiny_trained, predictor, pacs, work)  # the last restart, no fault
    poll_until(svc, uids, {"graded"})
    for uid in uids:
        assert_one_result(pacs, svc, uid)
        left = [p for p in (work / "results").rglob("*") if p.name.startswith(".")]
        assert not left, f"a half-written result was left: {left}"
    # The retry filed the same instance again: the SR the state names is the one of the crash.
    for uid, sops in filed.items():
        assert instances_in_orthanc(pacs, uid, "SR") == sops


# ------------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def full_disk(how: str, results: Path, monkeypatch) -> Iterator:
    """A disk that fills while the figure is written; yields a function that frees space.

    ``tmpfs``: a real 256 KiB tmpfs mounted on the results folder (root only): the SR (~150 KB)
    fits, the figure (~350 KB) does not, and the kernel says ENOSPC. ``monkeypatch``: the write
    of the figure stops half-way with ENOSPC, anywhere.
    """
    import spinegrade.serve.service as service_module

    if how == "monkeypatch":
        original = service_module._write

        def write_until_full(path: Path, data: bytes) -> None:
            if path.name.startswith(".figure.png.tmp-"):  # atomic_path's temporary name
                path.write_bytes(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            original(path, data)

        monkeypatch.setattr(service_module, "_write", write_until_full)
        yield lambda: monkeypatch.setattr(service_module, "_write", original)
        return
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (the monkeypatched case covers the same path)")
    results.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(results)],
                             capture_output=True, text=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield lambda: subprocess.run(["mount", "-o", "remount,size=16m", str(results)], check=True)
    finally:
        subprocess.run(["umount", str(results)], check=False)


@pytest.mark.parametrize("how", ["monkeypatch", "tmpfs"])
def test_disk_full_while_writing_results_files_nothing_and_retries(
    how, tiny_trained, predictor, pacs, tmp_path, monkeypatch, caplog
) -> None:
    from spinegrade.serve.service import study_key

    caplog.set_level(logging.INFO, logger="spinegrade.serve.service")
    uid = send(pacs, tiny_trained, tmp_path, "diskfull")
    svc = make_service(tiny_trained, predictor, pacs, tmp_path / "work", backoff_s=1.0)
    with full_disk(how, svc.work / "results", monkeypatch) as free_space:
        poll_until(svc, [uid], {"failed"})
        row = svc.state.get(uid, svc.model.model_id)
        assert "the disk is full" in row.reason and "free space" in row.reason
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert errors and "the disk is full" in errors[0].getMessage()
        # Nothing half-written, and nothing filed into the PACS for the study.
        results = svc.work / "results" / study_key(uid)
        assert not results.exists() or list(results.iterdir()) == []
        assert instances_in_orthanc(pacs, uid, "SR") == []
        assert instances_in_orthanc(pacs, uid, "OT") == []
        free_space()
        time.sleep(1.0)  # the backoff
        poll_until(svc, [uid], {"graded"})
        assert outcomes(svc, uid) == ["failed", "graded"]
        assert_one_result(pacs, svc, uid)
        assert sorted(p.name for p in results.iterdir()) == ["figure.png", "grades.json", "sr.dcm"]
        svc.state.close()


# ------------------------------------------------------------------------ hostile metadata

# Each hostile value sets window.__pwned if it ever runs as script; shown, it must read literally.
SCRIPT = "<script>window.__pwned=1</script>"
HTML_DESC = "<img src=x onerror=window.__pwned=2>Lendenwirbelsäule & <b>Co"  # LO: 64 at most
LATIN1_NAME = "Müller<script>window.__pwned=3</script>^Zoë"
UTF8_NAME = "李^小龙"
UTF8_DESC = "../../etc/passwd ∅ <i>é</i> 腰椎 🦴"
ESCAPE_UID = "../../../escape"
# Orthanc shortens values past the VR's length; another PACS may pass them on: a study row
# holding 10,000 characters, as it would arrive from such a PACS.
LONG_UID = "1.2.826.0.1.3680043.10.999.1"
LONG_DESC = (SCRIPT + "&lt;x&gt;" + "ÿ" * 38) * 125  # 10,000 characters


@pytest.fixture(scope="module")
def hostile_pacs(tmp_path_factory):
    with private_orthanc(tmp_path_factory.mktemp("orthanc-hostile")) as server:
        yield server


@pytest.fixture(scope="module")
def hostile(tiny_trained, predictor, hostile_pacs, tmp_path_factory):
    """Studies whose patient and series fields hold HTML, script, odd encodings and path-like
    text, graded; a study whose Study UID is a path; the page over them."""
    tmp, pacs = tmp_path_factory.mktemp("hostile"), hostile_pacs
    latin = send(pacs, tiny_trained, tmp, "latin1", 0, SpecificCharacterSet="ISO_IR 100",
                 PatientName=LATIN1_NAME, StudyDescription=HTML_DESC, AccessionNumber="<b>A1</b>",
                 SeriesDescription=lambda ds: f"<s>../../{ds.SeriesDescription}")  # fmt: skip
    utf8 = send(pacs, tiny_trained, tmp, "utf8", 1, SpecificCharacterSet="ISO_IR 192",
                PatientName=UTF8_NAME, StudyDescription=UTF8_DESC)  # fmt: skip
    send(pacs, tiny_trained, tmp, "path-uid", 2, study_uid=ESCAPE_UID)
    work = tmp / "work"
    svc = make_service(tiny_trained, predictor, pacs, work, backoff_s=3600.0)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("spinegrade.serve.service")
    logger.addHandler(handler)
    try:
        poll_until(svc, [latin, utf8], {"graded", "failed"})
        # The last study may become stable (Orthanc's StableAge) after those two were graded.
        wait_for(lambda: svc.poll_once() and any(repr(ESCAPE_UID) in ln for ln in lines), 30,
                 "the study with a path for a UID to be seen")  # fmt: skip
    finally:
        logger.removeHandler(handler)
    svc.state.observe(LONG_UID, svc.model.model_id, "x", {
        "description": LONG_DESC, "accession": SCRIPT, "study_date": HTML_DESC,
    })  # fmt: skip
    with page_server(svc) as url:
        yield svc, url, latin, utf8, tmp, lines


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the path-UID study, on purpose
def test_hostile_fields_reach_the_sr_intact_and_never_the_file_system(
    hostile, hostile_pacs, tiny_trained, tmp_path
) -> None:
    from spinegrade.serve.service import study_key

    svc, _, latin, utf8, _, logged = hostile
    pacs = hostile_pacs
    for uid in (latin, utf8):
        assert_one_result(pacs, svc, uid)
    # The study whose UID is a path was named in the log and skipped; the others were graded.
    assert {r.study_uid for r in svc.state.all()} == {latin, utf8, LONG_UID}
    assert any(repr(ESCAPE_UID) in line and "skipped" in line for line in logged)
    # QIDO polling (any DICOMweb server) lists it too: discovery goes on past it.
    qido = make_service(tiny_trained, svc.predictor, pacs, tmp_path / "qido", watch="qido")
    assert qido.discover() == 2
    assert {r.study_uid for r in qido.state.all()} == {latin, utf8}
    # The SR carries the patient's name in the study's encoding (Orthanc decodes it to UTF-8).
    for uid, name in ((latin, LATIN1_NAME), (utf8, UTF8_NAME)):
        (sop,) = instances_in_orthanc(pacs, uid, "SR")
        found = requests.post(f"{pacs.url}/tools/lookup", data=sop, auth=pacs.auth, timeout=30)
        (orthanc_id,) = [h["ID"] for h in found.json() if h["Type"] == "Instance"]
        tags = requests.get(f"{pacs.url}/instances/{orthanc_id}/simplified-tags", auth=pacs.auth,
                            timeout=30).json()  # fmt: skip
        assert tags["PatientName"] == name
    # Nothing the PACS named became a path: only our hashes, numbers and fixed names.
    names = {p.name for p in svc.work.rglob("*")}
    assert {study_key(latin), study_key(utf8)} <= names
    bad = [n for n in names if "<" in n or ".." in n or "escape" in n or "passwd" in n]
    assert bad == []
    assert not (svc.work.parent.parent / "escape").exists()


def test_page_shows_hostile_metadata_escaped_in_chromium(hostile) -> None:
    missing = chromium_missing()
    if missing:
        pytest.skip(missing)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from spinegrade.serve.service import study_key

    svc, url, latin, utf8, _, _ = hostile
    with chromium() as driver:
        driver.get(url + "/login")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "login").click()
        WebDriverWait(driver, 30).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#worklist tr")) >= 4
        )
        assert driver.execute_script("return window.__pwned") is None
        cells = {}
        for tr in driver.find_elements(By.CSS_SELECTOR, "#worklist tr")[1:]:
            tds = tr.find_elements(By.TAG_NAME, "td")
            cells[tds[0].text] = [td.text for td in tds]
        # The text appears literally: tags and entities as typed, accents and emoji intact.
        info = {r.study_uid: r.info for r in svc.state.all()}
        assert info[latin]["description"] == HTML_DESC  # as Orthanc gave it
        assert cells[study_key(latin)][3] == HTML_DESC
        assert cells[study_key(latin)][2] == "<b>A1</b>"
        # Orthanc's index keeps main tags in Latin-1: its QIDO answer lacks "∅" and "腰椎".
        assert info[utf8]["description"].startswith("../../etc/passwd")
        assert cells[study_key(utf8)][3] == " ".join(info[utf8]["description"].split())
        assert "<i>é</i>" in cells[study_key(utf8)][3]
        long_row = cells[study_key(LONG_UID)]
        assert long_row[3] == LONG_DESC and len(long_row[3]) == 10_000
        assert long_row[2] == SCRIPT and long_row[1] == HTML_DESC
        # A graded study's own page: its warnings and model lines, escaped too.
        driver.get(f"{url}/study/{study_key(latin)}")
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grades td"))
        assert driver.execute_script("return window.__pwned") is None
        assert not driver.find_elements(By.CSS_SELECTOR, "body script, body img[src='x']")


def test_every_route_refuses_a_request_without_the_token(hostile) -> None:
    """Every route of the app (enumerated, so a new one is covered), each method: no token, a
    wrong bearer token or a wrong cookie get 401 and none of the study's data."""
    from spinegrade.serve.app import COOKIE, create_app
    from spinegrade.serve.service import study_key

    svc, url, latin, _, _, _ = hostile
    key = study_key(latin)
    checked = []
    for route in create_app(svc, TOKEN).routes:
        if route.path == "/login":  # the way in: a form, and a refusal for a wrong token
            continue
        path = route.path.replace("{key}", key)
        for method in sorted(route.methods):
            ok = requests.request(method, url + path, headers=AUTH, timeout=30)
            assert ok.status_code == 200, (method, path)  # the route serves something
            for headers, cookies in (({}, {}), ({"Authorization": "Bearer nope"}, {}),
                                     ({}, {COOKIE: "nope"})):  # fmt: skip
                r = requests.request(method, url + path, headers=headers, cookies=cookies,
                                     timeout=30)  # fmt: skip
                assert r.status_code == 401, (method, path, r.status_code)
                assert latin not in r.text and b"DICM" not in r.content and b"PNG" not in r.content
            checked.append((method, route.path))
    assert {p for _, p in checked} >= {"/", "/api/studies", "/api/studies/{key}",
                                       "/api/studies/{key}/sr.dcm", "/api/studies/{key}/figure.png",
                                       "/study/{key}"}  # fmt: skip
    wrong = requests.post(f"{url}/login", data={"token": "nope"}, timeout=30, allow_redirects=False)
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    # Paths that try to leave the results folder, with the token: nothing but "not found".
    for path in ("/api/studies/..%2F..%2Fstate.db/sr.dcm", "/api/studies/../sr.dcm",
                 "/api/studies/%2E%2E/figure.png",
                 f"/api/studies/{key}%2F..%2F..%2Fstate.db"):  # fmt: skip
        r = requests.get(url + path, headers=AUTH, timeout=30)
        assert r.status_code == 404, (path, r.status_code)
        assert b"SQLite" not in r.content and b"DICM" not in r.content
