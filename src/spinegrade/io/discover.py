"""Raw-folder input: find the DICOM studies and series in any folder structure and type each series.

Hospital exports rarely follow the RSNA layout: files sit in nested or flat folders, named by
anything. Here every file is opened for its header only (``stop_before_pixels``), files are grouped
by StudyInstanceUID / SeriesInstanceUID, and each series is given one of the three RSNA types
(``Sagittal T1``, ``Sagittal T2/STIR``, ``Axial T2``) from, in order of trust:

1. the SeriesDescription (or ProtocolName) text, e.g. ``SAG T2 FSE``, ``t1_tse_sag``, ``AX T2``;
2. the sequence timing: inversion time of a STIR, or EchoTime / RepetitionTime (T1: short TR and
   short TE; T2: long TE);
3. the image itself: on T2/STIR the cerebrospinal fluid is the brightest tissue, so the
   mid-sagittal slice shows a long, unbroken bright band (the thecal sac) running head to foot; on
   T1 the fluid is dark and the bright tissues (marrow, fat) are interrupted by discs. This is a
   guess and is logged as one.

The plane always comes from ImageOrientationPatient (the slice normal's dominant LPS axis), which,
unlike the text, cannot be mistyped. Nothing here reads or returns patient identifiers: studies are
named by an RSNA-style integer id (the UID itself when it is one, else a hash of the UID).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from spinegrade.io.files import (
    DICOMDIR_REASON,
    RECOPY,
    BadFile,
    NotImage,
    damaged_header,
    entry_reason,
    is_dicomdir,
    open_dataset,
    pydicom_quiet,
)
from spinegrade.io.geometry import plane_name
from spinegrade.io.header import orientation_or_none
from spinegrade.io.identifiers import input_folder, input_path, patient_identifiers
from spinegrade.io.pixels import check_pixel_data, decode
from spinegrade.task import AX_T2, SAG_T1, SAG_T2

log = logging.getLogger(__name__)

# Header elements needed to group and type a series; nothing that identifies the patient.
_TAGS = [
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesDescription",
    "ProtocolName",
    "SeriesNumber",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "EchoTime",
    "RepetitionTime",
    "InversionTime",
    "ScanningSequence",
    "Modality",
    "SOPClassUID",
    "SharedFunctionalGroupsSequence",  # enhanced multi-frame: orientation lives in here
]
# An RSNA-style id is an integer that fits int64; real UIDs are dotted and longer.
_MAX_ID = 2**63 - 1
TABLE_COLUMNS: tuple[str, ...] = (
    "study_id",
    "series_id",
    "series_description",
    "plane",
    "n_files",
    "type_source",
    "guessed",
    "note",
)


@dataclass
class _Header:
    """What one file's header says (internal)."""

    path: Path
    study_uid: str
    series_uid: str
    description: str
    series_number: int | None
    orientation: np.ndarray | None
    position: np.ndarray | None
    echo_time: float | None
    repetition_time: float | None
    inversion_time: float | None
    scanning_sequence: str


@dataclass
class DiscoveredSeries:
    """One series found under the input folder, with its inferred RSNA type."""

    study_id: int
    series_id: int
    files: list[Path]
    plane: str  # "sagittal" | "axial" | "coronal" | "unknown"
    series_description: str  # one of the three RSNA types, or "" when the series is not usable
    type_source: str  # "description" | "sequence timing" | "image contrast" | "elimination" | ""
    guessed: bool = False
    note: str = ""
    header_description: str = ""
    echo_time: float | None = None
    repetition_time: float | None = None
    inversion_time: float | None = None


@dataclass
class Discovery:
    """All studies and series under one input folder."""

    root: Path
    series: list[DiscoveredSeries]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # entries not read, and why
    warnings: list[str] = field(default_factory=list)  # guesses and missing series types
    guesses: list[str] = field(default_factory=list)  # only the guessed series types
    # study id -> its folder relative to ``root``, patient identifiers blanked (io.identifiers)
    study_folders: dict[int, str] = field(default_factory=dict)
    # the identifiers of every study, only to blank them from the paths of skipped entries
    _secrets: set[str] = field(default_factory=set, repr=False)

    def shown(self, path: Path) -> str:
        """``path`` as the user may see it: relative to ``root``, any component holding a
        patient identifier of any study found blanked."""
        return input_path(path, self.root, self._secrets)

    def skipped_paths(self) -> list[tuple[str, str]]:
        """(path as :meth:`shown`, reason) of each entry that was not read."""
        return [(self.shown(p), r) for p, r in self.skipped]

    @property
    def study_ids(self) -> list[int]:
        return sorted({s.study_id for s in self.series})

    def table(self) -> pd.DataFrame:
        """One row per series (usable or not): ids, inferred type, plane, how it was decided."""
        rows = [
            {
                "study_id": s.study_id,
                "series_id": s.series_id,
                "series_description": s.series_description,
                "plane": s.plane,
                "n_files": len(s.files),
                "type_source": s.type_source,
                "guessed": s.guessed,
                "note": s.note,
            }
            for s in self.series
        ]
        return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))

    def series_descriptions(self) -> pd.DataFrame:
        """The usable series as a ``test_series_descriptions.csv`` table."""
        t = self.table()
        t = t[t["series_description"] != ""]
        return t[["study_id", "series_id", "series_description"]].reset_index(drop=True)

    def files_of(self, study_id: int, series_id: int) -> list[Path]:
        for s in self.series:
            if s.study_id == study_id and s.series_id == series_id:
                return list(s.files)
        raise KeyError(f"study {study_id} has no series {series_id} in {self.root}")


# ---------------------------------------------------------------------------------------- ids


def stable_id(uid: str) -> int:
    """RSNA-style integer id of a study or series UID.

    An all-digit UID (as in the anonymised RSNA files) is kept, so a copy of an RSNA layout keeps
    its ids; a dotted DICOM UID becomes the first 8 hex digits of its SHA-256 (the RSNA id range).
    Never derived from PatientID.
    """
    uid = uid.strip()
    if uid.isdigit() and 0 < int(uid) <= _MAX_ID:
        return int(uid)
    return int(hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:8], 16)


# ------------------------------------------------------------------------------------ headers


def _float_or_none(value: object) -> float | None:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _orientation(ds) -> np.ndarray | None:
    """ImageOrientationPatient (enhanced MR: in the shared functional groups), or None when it
    is absent or not two perpendicular directions (a zero one would make every plane sagittal)."""
    iop = ds.get("ImageOrientationPatient")
    if iop is None:
        # Enhanced MR: PlaneOrientationSequence within the shared functional groups.
        try:
            iop = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
            iop = iop.ImageOrientationPatient
        except (AttributeError, IndexError, KeyError, TypeError):
            return None
    try:
        return orientation_or_none([float(x) for x in iop])
    except (TypeError, ValueError):
        return None


def _position(ds) -> np.ndarray | None:
    try:
        v = np.asarray([float(x) for x in ds.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        return None
    return v if v.shape == (3,) and np.isfinite(v).all() else None


def read_header(path: Path) -> _Header | str:
    """The header fields of ``path``, or the reason the file is not an MR image slice."""
    try:
        ds = open_dataset(path, header_only=True, tags=_TAGS)
        with damaged_header():
            return _header_of(path, ds)
    except (NotImage, BadFile) as exc:
        return str(exc)


def _header_of(path: Path, ds) -> _Header | str:
    if is_dicomdir(ds):
        return DICOMDIR_REASON
    study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
    if not study or not series:
        if "SOPClassUID" not in ds:
            return f"damaged: no readable data set after the DICOM header; {RECOPY}"
        return (
            "no StudyInstanceUID/SeriesInstanceUID (every image has them: damaged, or "
            "stripped by an anonymiser?): its study is unknown; ignored"
        )
    modality = str(ds.get("Modality", "MR") or "MR")
    if modality not in ("MR", "OT"):
        return f"modality {modality}, not MR; ignored"
    desc = str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "") or "")
    return _Header(
        path=path,
        study_uid=study,
        series_uid=series,
        description=desc.strip(),
        series_number=_int_or_none(ds.get("SeriesNumber")),
        orientation=_orientation(ds),
        position=_position(ds),
        echo_time=_float_or_none(ds.get("EchoTime")),
        repetition_time=_float_or_none(ds.get("RepetitionTime")),
        inversion_time=_float_or_none(ds.get("InversionTime")),
        scanning_sequence=str(ds.get("ScanningSequence", "") or ""),
    )


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return None


def _walk_files(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every regular file under ``root`` once (hidden entries skipped), in a stable order, and
    the entries not read, with the reason.

    Links are followed, but no folder is entered twice and no file read twice: a link back up
    the tree (``loop -> ..``) would otherwise make the walk read everything again at every level
    until the path grows too long, and count each file as many times.
    """
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    seen: dict[tuple[int, int], Path] = {}  # (device, inode) -> first path, folders and files

    def first_visit(path: Path, kind: str) -> bool:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            skipped.append((path, f"a link to {kind} already read ({_rel(seen[key], root)})"))
            return False
        seen[key] = path
        return True

    def unreadable(err: OSError) -> None:
        skipped.append((Path(err.filename), f"folder cannot be read ({err.strerror})"))

    first_visit(root, "a folder")
    for folder, dirs, names in os.walk(root, followlinks=True, onerror=unreadable):
        kept = sorted(d for d in dirs if not d.startswith("."))
        dirs[:] = [d for d in kept if first_visit(Path(folder) / d, "a folder")]
        for name in sorted(n for n in names if not n.startswith(".")):
            path = Path(folder) / name
            reason = entry_reason(path)
            if reason is not None:
                skipped.append((path, reason))
            elif first_visit(path, "a file"):
                files.append(path)
    return files, skipped


def _rel(path: Path, root: Path) -> str:
    rel = os.path.relpath(path, root)
    return "the input folder" if rel == "." else rel


# ------------------------------------------------------------------------------------- typing

_TOKEN = re.compile(r"[a-z0-9]+")


def type_from_description(text: str) -> tuple[str | None, str | None]:
    """(plane, weighting) named by a series description; either may be None.

    Plane: ``sag``/``sagittal`` or ``ax``/``axial``/``tra``/``transverse``/``cor``. Weighting:
    ``stir``/``tirm`` (fat-suppressed inversion recovery, read like T2), tokens starting ``t2`` or
    ``t1`` (``t2w``, ``t2_tse``), or ``flair`` (ambiguous: None).
    """
    tokens = _TOKEN.findall(text.lower().replace("_", " "))
    plane = None
    for tok in tokens:
        if tok in ("sag", "sagittal", "sagital") or tok.startswith("sag"):
            plane = "sagittal"
        elif tok in ("ax", "axial", "tra", "trans", "transverse", "axi") or tok.startswith("axial"):
            plane = "axial"
        elif tok in ("cor", "coronal"):
            plane = "coronal"
    weighting = None
    stir = any(t in ("stir", "tirm", "tir") or t.startswith("stir") for t in tokens)
    if stir or any(t.startswith("t2") for t in tokens):
        weighting = "T2"
    elif any(t.startswith("t1") for t in tokens):
        weighting = "T1"
    return plane, weighting


def weighting_from_timing(
    te: float | None, tr: float | None, ti: float | None, scanning_sequence: str = ""
) -> str | None:
    """T1 / T2 from sequence timing (ms), or None when the values do not decide.

    STIR nulls fat with a short inversion time (about 100-250 ms at 1.5-3 T) and is read as a
    fluid-sensitive (T2-like) image. Otherwise T1 weighting needs a short TR (< ~1000 ms) and a
    short TE (< ~30 ms); T2 weighting a long TE (>= ~60 ms) with a long TR.
    """
    if ti is not None and 80 <= ti <= 300 and ("IR" in scanning_sequence or not scanning_sequence):
        return "T2"
    if te is None or tr is None:
        return None
    if tr < 1000 and te < 30:
        return "T1"
    if te >= 60 and tr >= 1500:
        return "T2"
    return None


def fluid_band_score(image: np.ndarray) -> float:
    """How far one connected bright structure runs head to foot on a mid-sagittal slice (0..1).

    On T2/STIR the CSF of the thecal sac is the brightest tissue and runs the whole lumbar spine,
    following the lordotic curve, as one connected band. On T1 the CSF is dark; the bright tissues
    (fatty marrow, epidural fat) come in pieces separated by discs and ligaments. The score is the
    largest row extent, as a fraction of the image height, of a connected component of the
    brightest 10% of pixels within the central 60% of columns (which keeps out the subcutaneous
    fat at the back, bright on both weightings).
    """
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    centre = img[:, int(0.2 * w) : int(0.8 * w)]
    bright = centre >= np.percentile(centre, 90)
    # 8-connectivity: a band one pixel wide on a slant is still one structure.
    labels, n = ndimage.label(bright, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return 0.0
    extents = [sl[0].stop - sl[0].start for sl in ndimage.find_objects(labels)]
    return float(max(extents)) / h


# Above this score a lone sagittal series is guessed T2/STIR, below it T1. On 30 phantom studies
# the T1 scores ran 0.25-0.80 and the T2/STIR scores 0.72-1.0, so a lone guess is right about
# 95% of the time; two unknown series are compared with each other instead (right in 29 of 30).
_FLUID_THRESHOLD = 0.75


def _mid_slice(headers: list[_Header]) -> np.ndarray | None:
    """Pixels of the slice nearest the middle of the stack (by position along the normal)."""
    with_pos = [h for h in headers if h.position is not None and h.orientation is not None]
    if with_pos:
        o = with_pos[0].orientation
        normal = np.cross(o[:3], o[3:])  # type: ignore[index]
        d = np.array([h.position @ normal for h in with_pos])  # type: ignore[operator]
        pick = with_pos[int(np.argsort(d)[len(d) // 2])]
    else:
        pick = headers[len(headers) // 2]
    try:
        ds = open_dataset(pick.path)
        check_pixel_data(ds)
        frames = decode(ds)
    except Exception as exc:  # decoder errors vary by transfer syntax
        log.debug("%s: cannot decode pixels for the contrast check (%s)", pick.path, exc)
        return None
    # Multi-frame: the middle frame.
    arr = np.asarray(frames[frames.shape[0] // 2], dtype=np.float64)
    return arr if arr.ndim == 2 and arr.size else None


def _plane_of(headers: list[_Header]) -> str:
    """Plane named by the majority ImageOrientationPatient of the series."""
    planes = [
        plane_name(np.cross(h.orientation[:3], h.orientation[3:]))
        for h in headers
        if h.orientation is not None
    ]
    return Counter(planes).most_common(1)[0][0] if planes else "unknown"


def _type_series(study_id: int, series_id: int, headers: list[_Header]) -> DiscoveredSeries:
    """Plane and weighting of one series from its geometry, description and timing."""
    first = headers[0]
    plane = _plane_of(headers)
    text_plane, weighting = type_from_description(first.description)
    notes: list[str] = []
    if plane == "unknown" and text_plane:
        plane = text_plane
        notes.append("no ImageOrientationPatient: plane taken from the description")
    elif text_plane and text_plane != plane:
        notes.append(f"description says {text_plane} but the geometry is {plane}: using {plane}")
    source = "description" if weighting else ""
    if weighting is None:
        weighting = weighting_from_timing(
            first.echo_time, first.repetition_time, first.inversion_time, first.scanning_sequence
        )
        source = "sequence timing" if weighting else ""
    s = DiscoveredSeries(
        study_id=study_id,
        series_id=series_id,
        files=[h.path for h in headers],
        plane=plane,
        series_description="",
        type_source=source,
        header_description=first.description,
        echo_time=first.echo_time,
        repetition_time=first.repetition_time,
        inversion_time=first.inversion_time,
    )
    if plane == "axial":
        if weighting == "T1":
            notes.append("axial T1 is not used by the model")
        else:
            s.series_description = AX_T2
            if weighting is None:
                # Lumbar protocols acquire their axials as T2; nothing says otherwise here.
                s.type_source, s.guessed = "plane only", True
    elif plane == "sagittal" and weighting:
        s.series_description = SAG_T1 if weighting == "T1" else SAG_T2
    elif plane in ("coronal", "unknown"):
        notes.append(f"{plane} plane: not one of the series types the model reads")
    s.note = "; ".join(notes)
    return s


def _resolve_sagittals(series: list[DiscoveredSeries], headers: dict[int, list[_Header]]) -> None:
    """Type the sagittal series of one study whose weighting neither text nor timing gave.

    A study normally holds one sagittal T1 and one sagittal T2/STIR. If the other type is already
    known, the unknown one is the missing type (elimination); if two are unknown, the one with the
    stronger fluid band is the T2/STIR; a lone unknown is judged by its own fluid-band score.
    """
    pending = [s for s in series if s.plane == "sagittal" and not s.series_description]
    if not pending:
        return
    known = {s.series_description for s in series if s.plane == "sagittal" and s.series_description}
    scores: dict[int, float] = {}
    for s in pending:
        img = _mid_slice(headers[s.series_id])
        scores[s.series_id] = fluid_band_score(img) if img is not None else float("nan")
    if len(pending) == 1 and len(known) == 1:
        s = pending[0]
        s.series_description = SAG_T2 if SAG_T1 in known else SAG_T1
        s.type_source = "elimination"
    elif len(pending) == 2 and not known and all(np.isfinite(list(scores.values()))):
        a, b = sorted(pending, key=lambda p: scores[p.series_id])
        a.series_description, b.series_description = SAG_T1, SAG_T2
        a.type_source = b.type_source = "image contrast"
    else:
        for s in pending:
            score = scores[s.series_id]
            s.series_description = SAG_T2 if score >= _FLUID_THRESHOLD else SAG_T1
            s.type_source = "image contrast" if np.isfinite(score) else "default"
    for s in pending:
        s.guessed = True
        extra = f"fluid-band score {scores[s.series_id]:.2f}"
        s.note = f"{s.note}; {extra}" if s.note else extra


def discover_studies(root: Path | str) -> Discovery:
    """Find every MR series under ``root`` (any folder structure) and infer its RSNA type.

    Reads headers only, except the middle slice of a sagittal series whose weighting neither the
    description nor the timing gives. Non-DICOM files are skipped and listed in ``skipped``.
    Raises FileNotFoundError / ValueError when the folder is missing or holds no MR series.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder; give a folder of DICOM studies")
    with pydicom_quiet():
        return _discover(root)


def _discover(root: Path) -> Discovery:
    groups: dict[tuple[str, str], list[_Header]] = defaultdict(list)
    paths, skipped = _walk_files(root)
    for path in paths:
        h = read_header(path)
        if isinstance(h, str):
            skipped.append((path, h))
        else:
            groups[(h.study_uid, h.series_uid)].append(h)
    skipped.sort(key=lambda item: str(item[0]))
    if not groups:
        raise ValueError(
            f"{root}: no MR DICOM series found among {len(skipped)} file(s); point INPUT at a "
            "folder of DICOM files or at an RSNA layout with test_images/"
        )
    _check_unique_ids(groups)
    out = Discovery(root=root, series=[], skipped=skipped)
    by_study: dict[int, list[tuple[int, list[_Header]]]] = defaultdict(list)
    for (study_uid, series_uid), headers in groups.items():
        by_study[stable_id(study_uid)].append((stable_id(series_uid), headers))
    for study_id in sorted(by_study):
        members = sorted(by_study[study_id])
        secrets = patient_identifiers(hs[0].path for _, hs in members)
        out._secrets |= secrets
        folder = input_folder([h.path for _, hs in members for h in hs], root, secrets)
        out.study_folders[study_id] = folder
        typed = [_type_series(study_id, sid, hs) for sid, hs in members]
        _resolve_sagittals(typed, dict(members))
        out.series.extend(typed)
        named = f"study {study_id} ({folder})"
        guesses = _guess_warnings(named, typed)
        out.guesses.extend(guesses)
        out.warnings.extend(guesses + _missing_warning(named, typed))
    # Missing series are reported by whoever reads the series next (predict, after caching,
    # knows which ones were also unreadable); guesses are only known here.
    for w in out.guesses:
        log.warning(w)
    return out


def _check_unique_ids(groups: dict[tuple[str, str], list[_Header]]) -> None:
    """Two different UIDs must not hash to one id (astronomically rare, but then say so)."""
    seen: dict[tuple[str, int], str] = {}
    for study_uid, series_uid in groups:
        for kind, uid in (("study", study_uid), ("series", series_uid)):
            key = (kind, stable_id(uid))
            if seen.setdefault(key, uid) != uid:
                raise ValueError(
                    f"two {kind} UIDs map to the same id {key[1]}; move one study to its own "
                    "folder and run predict on each folder separately"
                )


def _guess_warnings(study: str, series: list[DiscoveredSeries]) -> list[str]:
    """One warning per series whose type is a guess (``study``: how the study is named)."""
    return [
        f"{study}: series {s.series_id} ({s.header_description or 'no description'}) "
        f"taken as {s.series_description} from {s.type_source} -- a guess"
        + (f" ({s.note})" if s.note else "")
        for s in series
        if s.guessed and s.series_description
    ]


def _missing_warning(study: str, series: list[DiscoveredSeries]) -> list[str]:
    """A warning when the study lacks one of the three series types."""
    have = {s.series_description for s in series}
    missing = [t for t in (SAG_T1, SAG_T2, AX_T2) if t not in have]
    if not missing:
        return []
    return [
        f"{study}: no {', '.join(missing)} series found; its grades will fall back "
        "to the training prior where no other view sees them"
    ]
