"""Patient identifiers in folder names: read from the headers only to blank them out.

Hospital exports often name folders after the patient (``DOE^JOHN/``, ``12345678_19700101/``).
spinegrade names studies by hashed ids, and where it must say which input folder a study came
from (``studies.csv``, the report index) it writes the folder relative to the input with every
path component that contains one of the study's identifiers replaced by ``[patient]``. The
identifiers are compared in memory and never written anywhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import pydicom

from spinegrade.io.files import open_dataset, pydicom_quiet

REDACTED = "[patient]"
# What identifies the person, as opposed to the scan: name, ids, birth date, accession number.
IDENTIFIER_TAGS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "AccessionNumber",
)
# Identifiers shorter than this ("Li", an id "7") would blank out ordinary folder names ("exam7")
# as substrings; they are still caught when they are the whole folder name.
MIN_PART = 3
_SPLIT = re.compile(r"[^0-9a-z]+")


def _variants(tag: str, value: str) -> set[str]:
    """Lower-cased strings that betray ``value`` inside a folder name."""
    value = value.strip().lower()
    if not value:
        return set()
    out = {value}
    if tag == "PatientName":
        out |= {value.replace("^", sep) for sep in (" ", "_", "-", "", ",")}
        out |= {p for p in _SPLIT.split(value) if len(p) >= MIN_PART}
    elif tag == "PatientBirthDate" and re.fullmatch(r"\d{8}", value):
        y, m, d = value[:4], value[4:6], value[6:]
        out |= {f"{y}{s}{m}{s}{d}" for s in "-_."} | {f"{d}{s}{m}{s}{y}" for s in "-_."}
    return out


def patient_identifiers(paths: Iterable[Path]) -> set[str]:
    """The identifier strings (lower case) in the headers of ``paths`` (unreadable files skipped).

    One file per series is enough: every file of a study carries the same patient module.
    """
    found: set[str] = set()
    with pydicom_quiet():
        for path in paths:
            try:
                found |= _identifiers_of(path)
            except Exception:  # a file discovery could read once; nothing to add if it cannot
                continue
    return found


def _identifiers_of(path: Path) -> set[str]:
    ds = open_dataset(path, header_only=True, tags=IDENTIFIER_TAGS)
    found: set[str] = set()
    for tag in IDENTIFIER_TAGS:
        value = ds.get(tag)
        if value is None:
            continue
        values = value if isinstance(value, pydicom.multival.MultiValue) else [value]
        for v in values:
            found |= _variants(tag, str(v))
    return found


def redact_folder(relative: str, identifiers: set[str]) -> str:
    """``relative`` (a POSIX path below the input) with identifying components as ``[patient]``."""
    if not identifiers:
        return relative
    return "/".join(
        REDACTED if _identifying(part.lower(), identifiers) else part
        for part in relative.split("/")
    )


def _identifying(part: str, identifiers: set[str]) -> bool:
    return part in identifiers or any(
        len(ident) >= MIN_PART and ident in part for ident in identifiers
    )


def input_folder(paths: Iterable[Path], root: Path, identifiers: set[str]) -> str:
    """The deepest folder holding all ``paths``, relative to ``root`` ("." for ``root``), with
    identifying components blanked: how a study or series is named to the user."""
    common = os.path.commonpath([os.path.dirname(os.fspath(p)) for p in paths])
    return redact_folder(Path(os.path.relpath(common, root)).as_posix(), identifiers)


def input_path(path: Path, root: Path, identifiers: set[str]) -> str:
    """``path`` relative to ``root``, identifying components blanked."""
    return redact_folder(Path(os.path.relpath(path, root)).as_posix(), identifiers)
