"""Read one DICOM series folder into geometrically ordered stacks of slices.

Every file is parsed once (``pydicom.dcmread``) and decoded once (``pixel_array``; compressed
transfer syntaxes go through pydicom's plugins: pylibjpeg, pylibjpeg-libjpeg/-openjpeg/-rle and
pyjpegls). Slices are then grouped by orientation, ordered along their normal and split into
contiguous stacks; see :mod:`spinegrade.io.geometry` for the geometric rules.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from spinegrade.io.header import PER_FRAME, SHARED, file_values, frame_values
from spinegrade.io.pixels import decode
from spinegrade.io.stacks import (
    SliceRecord,
    build_stacks,
    plan_with_geometry,
    plan_without_geometry,
    skip_unique,
)
from spinegrade.io.types import SeriesRead, SkippedFile

logger = logging.getLogger(__name__)
PIXEL_DATA = 0x7FE00010

_FIX_HINT = (
    "Point spinegrade at one series folder of DICOM files (e.g. train_images/<study_id>/"
    "<series_id>/); for compressed files make sure pydicom's decoders are installed "
    "(pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls)."
)


class DicomReadError(ValueError):
    """No usable image slice in a series folder (the message names the folder and the problems)."""


class _NotImage(Exception):
    """A file that is not a DICOM image (junk, DICOMDIR, a report): ignored, not an error."""


def read_series(
    folder: str | Path,
    *,
    min_slices: int = 1,
    gap_factor: float = 3.0,
    angle_tol_deg: float = 1.0,
) -> SeriesRead:
    """Read every DICOM image in ``folder`` (one series) into stacks ordered along their normals.

    Slices are grouped by orientation (within ``angle_tol_deg``), keep the majority shape of their
    group, are sorted by ImagePositionPatient projected on the slice normal, and split into
    separate stacks where a position repeats or a gap exceeds ``gap_factor`` times the median
    spacing. SliceThickness and SpacingBetweenSlices are never needed. Files that are not DICOM
    images, or that cannot be read or decoded, are listed in ``SeriesRead.skipped`` (corrupt ones
    are also logged as warnings). Raises :class:`DicomReadError` when fewer than ``min_slices``
    usable slices remain.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomReadError(f"{folder}: not a folder. {_FIX_HINT}")
    slices, skipped = _read_folder(folder)
    located = [s for s in slices if s.has_geometry]
    if located and len(located) < len(slices):
        reason = (
            "no patient geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing) "
            "while the rest of the series has it"
        )
        skip_unique(skipped, [s.path for s in slices if not s.has_geometry], reason, folder)
        slices = located
    if not slices:
        raise DicomReadError(_nothing_usable(folder, skipped))
    if located:
        plans = plan_with_geometry(slices, skipped, folder, gap_factor, angle_tol_deg)
    else:
        plans = [plan_without_geometry(slices, skipped, folder)]
    stacks = build_stacks(plans)
    n_slices = sum(st.shape[0] for st in stacks)
    if n_slices < min_slices:
        raise DicomReadError(
            f"{folder}: only {n_slices} usable slice(s), at least {min_slices} needed "
            f"({len(skipped)} file(s) skipped). {_FIX_HINT}"
        )
    uid = Counter(s.series_uid for s in slices).most_common(1)[0][0]
    return SeriesRead(folder=folder, stacks=stacks, skipped=skipped, series_instance_uid=uid)


def _nothing_usable(folder: Path, skipped: list[SkippedFile]) -> str:
    """The error text when no slice is left: what was there and why each kind was dropped."""
    if not skipped:
        return f"{folder}: the folder is empty. {_FIX_HINT}"
    reasons = Counter(sk.reason.split(" (")[0] for sk in skipped)
    summary = "; ".join(f"{n} x {r}" for r, n in reasons.most_common())
    examples = "; ".join(f"{sk.path.name}: {sk.reason}" for sk in skipped[:3])
    return (
        f"{folder}: no usable DICOM image among {len(skipped)} entries ({summary}). "
        f"First: {examples}. {_FIX_HINT}"
    )


# ----------------------------------------------------------------------------- reading files


def natural_key(name: str) -> list[object]:
    """Sort key that puts ``2.dcm`` before ``10.dcm`` (RSNA files are named by InstanceNumber)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _read_folder(folder: Path) -> tuple[list[SliceRecord], list[SkippedFile]]:
    """Parse and decode every file of ``folder`` once; collect what could not be used and why."""
    entries = sorted(os.scandir(folder), key=lambda e: natural_key(e.name))
    slices: list[SliceRecord] = []
    skipped: list[SkippedFile] = []
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir():
            skipped.append(SkippedFile(path, "sub-folder ignored (a series folder holds files)"))
            continue
        try:
            slices.extend(_read_file(path))
        except _NotImage as exc:
            skipped.append(SkippedFile(path, str(exc)))
            logger.info("%s: ignored %s: %s", folder, path.name, exc)
        except Exception as exc:  # any parser/decoder failure skips only this file
            reason = f"unreadable ({type(exc).__name__}: {_first_line(exc)})"
            skipped.append(SkippedFile(path, reason))
            logger.warning("%s: skipped %s: %s", folder, path.name, reason)
    return slices, skipped


def _first_line(exc: Exception, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else ""


def _load_dataset(path: Path) -> pydicom.Dataset:
    """``dcmread`` once; files without the 128-byte preamble are read only if they start like a
    DICOM data set (group 0002 or 0008), so that junk files are never parsed as DICOM."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head not in (b"\x02\x00", b"\x08\x00", b"\x00\x08"):
            raise _NotImage("not a DICOM file (no 'DICM' marker)") from None
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        # No file meta: the transfer syntax is the encoding pydicom detected while parsing.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    return ds


def _read_file(path: Path) -> list[SliceRecord]:
    """All frames of one file as slices (a classic MR file has one, an enhanced MR file many)."""
    ds = _load_dataset(path)
    if PIXEL_DATA not in ds:
        if "Rows" in ds:
            raise ValueError("image header without pixel data (truncated file?)")
        if "SOPClassUID" not in ds:
            raise ValueError("no readable data set after the DICOM header (corrupt file?)")
        raise _NotImage(f"DICOM without pixel data ({getattr(ds.SOPClassUID, 'name', '')})")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise ValueError(f"colour image (SamplesPerPixel={ds.SamplesPerPixel}); MR is grayscale")
    frames = decode(ds)
    per_frame = ds[PER_FRAME].value if PER_FRAME in ds else None
    shared = ds[SHARED].value[0] if SHARED in ds and len(ds[SHARED].value) else None
    common = file_values(ds, path)
    common["name_key"] = tuple(natural_key(path.name))
    multi = frames.shape[0] > 1
    out = []
    for k in range(frames.shape[0]):
        item = per_frame[k] if per_frame is not None and k < len(per_frame) else None
        values = frame_values(ds, item, shared, multi_frame=multi)
        out.append(SliceRecord(frame=k, pixels=frames[k], **common, **values))
    return out
