"""The PACS side: DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store) via dicomweb-client,
plus Orthanc's change feed and series deletion when the server is an Orthanc.

Credentials travel in a requests session (HTTP basic auth); they are stripped from the URL and
never appear in ``repr`` or log lines.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

log = logging.getLogger(__name__)

QIDO_PAGE = 100
SERIES_FIELDS = ["Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances"]
STUDY_FIELDS = ["StudyDate", "AccessionNumber", "StudyDescription"]
# WADO-RS: instances in the transfer syntax they are stored in (PS3.18 8.7.3.5.2)
STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass
class SeriesInfo:
    uid: str
    modality: str
    description: str
    n_instances: int


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``http://user:pw@host/x`` -> (``http://host/x``, user, pw)."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    clean = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), parts.query, ""))
    return clean, parts.username, parts.password


class Pacs:
    """A DICOMweb server (``url`` is its DICOMweb root, e.g. ``http://host:8042/dicom-web``)."""

    def __init__(
        self, url: str, user: str | None = None, password: str | None = None, timeout: float = 120
    ) -> None:
        self.url, url_user, url_password = split_credentials(url)
        self.session = requests.Session()
        user, password = user or url_user, password or url_password
        if user:
            self.session.auth = (user, password or "")
        self.timeout = timeout
        self.client = DICOMwebClient(url=self.url, session=self.session)
        self._orthanc: str | bool | None = False  # not probed yet

    def __repr__(self) -> str:
        return f"Pacs({self.url!r})"

    # ------------------------------------------------------------------ QIDO / WADO / STOW

    def studies(self, filters: dict | None = None) -> list[dict]:
        """MR studies on the server: StudyInstanceUID + the worklist's fields, all pages."""
        out, offset = [], 0
        search = {"ModalitiesInStudy": "MR", **(filters or {})}
        while True:
            page = self.client.search_for_studies(
                search_filters=search, fields=STUDY_FIELDS, limit=QIDO_PAGE, offset=offset
            )
            out += [_study_info(pydicom.Dataset.from_json(d)) for d in page]
            if len(page) < QIDO_PAGE:
                return out
            offset += len(page)

    def study(self, study_uid: str) -> dict | None:
        found = self.client.search_for_studies(
            search_filters={"StudyInstanceUID": study_uid}, fields=STUDY_FIELDS
        )
        return _study_info(pydicom.Dataset.from_json(found[0])) if found else None

    def series(self, study_uid: str) -> list[SeriesInfo]:
        found = self.client.search_for_series(study_uid, fields=SERIES_FIELDS)
        out = []
        for d in found:
            ds = pydicom.Dataset.from_json(d)
            out.append(
                SeriesInfo(
                    str(ds.SeriesInstanceUID),
                    str(ds.get("Modality", "")),
                    str(ds.get("SeriesDescription", "")),
                    int(ds.get("NumberOfSeriesRelatedInstances", 0) or 0),
                )
            )
        return out

    def retrieve_series(self, study_uid: str, series_uid: str) -> list[bytes]:
        """Every instance of a series: the bytes the PACS stores (WADO-RS, transfer syntax ``*``).

        Asked for the default syntax, a PACS transcodes, and Orthanc ends its answer at the first
        instance it cannot decode: that slice and every later one were lost without a word (2 of
        5 sent). As stored and unparsed, each file reaches the reader (a file stored without a
        preamble too), which decodes it or names it and says why not.
        """
        r = self.session.get(
            f"{self.url}/studies/{study_uid}/series/{series_uid}",
            headers={"Accept": STORED}, timeout=self.timeout,
        )  # fmt: skip
        r.raise_for_status()
        return multipart_parts(r.content, r.headers.get("Content-Type", ""))

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> pydicom.Dataset:
        return self.client.retrieve_instance(study_uid, series_uid, sop_uid)

    def store(self, datasets: list[pydicom.Dataset]) -> None:
        """STOW-RS; raises when the server refuses any instance."""
        response = self.client.store_instances(datasets)
        failed = response.get("00081198") if response is not None else None
        if failed and failed.get("Value"):
            raise RuntimeError(f"{self}: STOW-RS refused {len(failed['Value'])} instance(s)")

    # ------------------------------------------------------------------ Orthanc extras

    @property
    def orthanc_root(self) -> str | None:
        """The Orthanc REST root when the server is an Orthanc (probed once), else None."""
        if self._orthanc is False:
            root = self.url.rsplit("/dicom-web", 1)[0] if "/dicom-web" in self.url else None
            self._orthanc = None
            if root:
                try:
                    r = self.session.get(f"{root}/system", timeout=10)
                    if r.ok and "DicomAet" in r.json():
                        self._orthanc = root
                except (requests.RequestException, ValueError):
                    pass
        return self._orthanc  # type: ignore[return-value]

    def orthanc_changed_studies(self, since: int) -> tuple[list[str], int]:
        """StudyInstanceUIDs of studies that became stable after change ``since``; the last seq."""
        root, uids, last = self.orthanc_root, [], since
        while True:
            r = self.session.get(
                f"{root}/changes", params={"since": last, "limit": 200}, timeout=self.timeout
            )
            r.raise_for_status()
            feed = r.json()
            for change in feed["Changes"]:
                if change["ChangeType"] == "StableStudy":
                    s = self.session.get(f"{root}/studies/{change['ID']}", timeout=self.timeout)
                    if s.ok:  # deleted since: nothing to grade
                        uids.append(s.json()["MainDicomTags"]["StudyInstanceUID"])
            last = int(feed["Last"])
            if feed["Done"]:
                return list(dict.fromkeys(uids)), last

    def orthanc_delete_series(self, series_uid: str) -> bool:
        """Delete a series by UID on an Orthanc (superseded results); False if not possible."""
        root = self.orthanc_root
        if root is None:
            return False
        r = self.session.post(f"{root}/tools/lookup", data=series_uid, timeout=self.timeout)
        r.raise_for_status()
        done = False
        for hit in r.json():
            if hit.get("Type") == "Series":
                self.session.delete(f"{root}/series/{hit['ID']}", timeout=self.timeout)
                done = True
        return done


def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of a multipart/related message's parts (RFC 2046), in order."""
    found = re.search(r'boundary="?([^";]+)"?', content_type)
    if found is None:
        if content_type.startswith("application/dicom"):  # some servers send one part bare
            return [body]
        raise ValueError(f"the PACS answered {content_type or 'without a type'}, not DICOM parts")
    parts = []
    for chunk in body.split(b"--" + found.group(1).encode())[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        _, sep, data = chunk.partition(b"\r\n\r\n")  # part headers, then the file
        if sep:
            parts.append(data[:-2] if data.endswith(b"\r\n") else data)
    return parts


def _study_info(ds: pydicom.Dataset) -> dict:
    return {
        "study_uid": str(ds.StudyInstanceUID),
        "study_date": str(ds.get("StudyDate", "")),
        "accession": str(ds.get("AccessionNumber", "")),
        "description": str(ds.get("StudyDescription", "")),
    }
