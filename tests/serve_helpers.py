"""Helpers shared by the service tests (test_serve*.py): a private Orthanc, what it holds, a copy
of a phantom study under new UIDs, the page in uvicorn and a headless Chromium."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

TOKEN = "test-token-5b1e"


@contextlib.contextmanager
def private_orthanc(folder: Path) -> Iterator:
    """An Orthanc of the caller's own in ``folder`` (its log stays there for a look), or the
    test skipped with how to install one."""
    import pytest

    from spinegrade.serve.orthanc import LocalOrthanc, orthanc_missing

    missing = orthanc_missing()
    if missing:
        pytest.skip(missing)
    with LocalOrthanc(folder) as server:
        yield server


def study_uid_of(folder: Path) -> str:
    import pydicom

    return str(
        pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    )


def series_in_orthanc(server, study_uid: str) -> list[dict]:
    """QIDO-RS: the series Orthanc holds in a study, asked with our own HTTP call."""
    import requests

    r = requests.get(
        f"{server.dicomweb_url}/studies/{study_uid}/series", auth=server.auth, timeout=30
    )
    if r.status_code == 404:  # Orthanc: no such study (yet)
        return []
    r.raise_for_status()
    return r.json() if r.content else []


def modalities(series: list[dict]) -> list[str]:
    return sorted(s["00080060"]["Value"][0] for s in series)


def instances_in_orthanc(server, study_uid: str, modality: str) -> list[str]:
    """SOP Instance UIDs of one modality in a study, from Orthanc's REST API (not DICOMweb)."""
    import requests

    r = requests.post(f"{server.url}/tools/find", auth=server.auth, timeout=30, json={
        "Level": "Instance", "Expand": True,
        "Query": {"StudyInstanceUID": study_uid, "Modality": modality},
    })  # fmt: skip
    r.raise_for_status()
    return sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in r.json())


def copy_study(src: Path, dst: Path, tag: str, study_uid: str | None = None, **fields) -> str:
    """A copy of the study in ``src`` under new Study/Series/SOP Instance UIDs (derived from
    ``tag``), with ``fields`` (DICOM keywords: a value, or a function of the file's dataset) set
    on every file; returns its Study UID."""
    import pydicom
    from pydicom.uid import generate_uid

    study = study_uid or generate_uid(entropy_srcs=[tag, "study"])
    for f in sorted(src.rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[tag, str(ds.SeriesInstanceUID)])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[tag, str(ds.SOPInstanceUID)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = f"P-{tag}"
        for key, value in fields.items():
            setattr(ds, key, value(ds) if callable(value) else value)
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out)
    return study


@contextlib.contextmanager
def page_server(service, token: str = TOKEN) -> Iterator[str]:
    """The worklist app over ``service`` in uvicorn on a free loopback port; yields its URL."""
    import requests
    import uvicorn

    from spinegrade.serve.app import create_app
    from spinegrade.serve.orthanc import free_port

    port = free_port()
    config = uvicorn.Config(create_app(service, token), host="127.0.0.1", port=port,
                            log_level="warning")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            requests.get(f"{url}/login", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def chromium_missing() -> str | None:
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        return (
            "Chromium is not installed; run `sudo scripts/install-serve-deps.sh` "
            "(Debian: apt-get install chromium chromium-driver)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is missing: pip install 'spinegrade[serve]'"
    return None


@contextlib.contextmanager
def chromium() -> Iterator:
    """A headless Chromium driven by selenium (the caller skips first when it is missing)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1100",
                "--disable-dev-shm-usage"):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=DriverService(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()
