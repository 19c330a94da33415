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

from spinegrade.io.files import (
    DICOMDIR_REASON,
    RECOPY,
    REEXPORT,
    BadFile,
    NotImage,
    damaged_header,
    describe,
    is_dicomdir,
    open_dataset,
    pydicom_quiet,
)
from spinegrade.io.header import PER_FRAME, SHARED, file_values, frame_values
from spinegrade.io.pixels import check_pixel_data, decode, decode_reason
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


# What one series may take in memory as float32 slices (the stack the reader returns): a lumbar
# series holds tens to a few hundred slices of at most 1024 x 1024 (~0.4 GB at the most); 2 GB
# leaves room for any real series while a folder of thousands of huge files is refused before
# it fills the machine.
MAX_SERIES_BYTES = 2 * 2**30


def read_series(
    folder: str | Path,
    *,
    min_slices: int = 1,
    gap_factor: float = 3.0,
    angle_tol_deg: float = 1.0,
    max_bytes: int | None = None,
) -> SeriesRead:
    """Read every DICOM image in ``folder`` (one series) into stacks ordered along their normals.

    Slices are grouped by orientation (within ``angle_tol_deg``), keep the majority shape of their
    group, are sorted by ImagePositionPatient projected on the slice normal, and split into
    separate stacks where a position repeats or a gap exceeds ``gap_factor`` times the median
    spacing. SliceThickness and SpacingBetweenSlices are never needed. Files that are not DICOM
    images, or that cannot be read or decoded, are listed in ``SeriesRead.skipped`` (corrupt ones
    are also logged as warnings). Raises :class:`DicomReadError` when fewer than ``min_slices``
    usable slices remain, or when the slices would take more than ``max_bytes`` (default
    :data:`MAX_SERIES_BYTES`) in memory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomReadError(f"{folder}: not a folder. {_FIX_HINT}")
    slices, skipped = _read_folder(folder, max_bytes)
    located = [s for s in slices if s.has_geometry]
    if located and len(located) < len(slices):
        reason = (
            "no patient geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing) "
            f"while the rest of the series has it: left out; {REEXPORT} to keep it"
        )
        skip_unique(skipped, [s.path for s in slices if not s.has_geometry], reason, folder)
        slices = located
    if not slices:
        raise DicomReadError(_nothing_usable(folder, skipped))
    if located:
        plans = plan_with_geometry(slices, skipped, folder, gap_factor, angle_tol_deg)
    else:
        plans = [plan_without_geometry(slices, skipped, folder)]
    if not plans:  # every slice was left out while planning (e.g. all at one position)
        raise DicomReadError(_nothing_usable(folder, skipped))
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
    by_reason: dict[str, list[str]] = {}
    for sk in skipped:
        by_reason.setdefault(sk.reason, []).append(sk.path.name)
    groups = sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
    shown = "; ".join(f"{_names(names)}: {reason}" for reason, names in groups[:3])
    more = f"; and {len(groups) - 3} other reasons" if len(groups) > 3 else ""
    # Each refused file's reason says what to do; a folder of things that are not images at all
    # was probably not a series folder.
    hint = "" if any("ignored" not in sk.reason for sk in skipped) else f" {_FIX_HINT}"
    return f"{folder}: no usable DICOM image among {len(skipped)} entries: {shown}{more}.{hint}"


def _names(names: list[str], limit: int = 3) -> str:
    """``a.dcm, b.dcm, c.dcm (+4 more)``."""
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def natural_key(name: str) -> list[object]:
    """Sort key that puts ``2.dcm`` before ``10.dcm`` (RSNA files are named by InstanceNumber)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _read_folder(
    folder: Path, max_bytes: int | None = None
) -> tuple[list[SliceRecord], list[SkippedFile]]:
    """Parse and decode every file of ``folder`` once; collect what could not be used and why.

    Stops with :class:`DicomReadError` once the slices would need more than ``max_bytes``
    (default :data:`MAX_SERIES_BYTES`) as float32, before decoding more.
    """
    limit = MAX_SERIES_BYTES if max_bytes is None else max_bytes
    entries = sorted(os.scandir(folder), key=lambda e: natural_key(e.name))
    slices: list[SliceRecord] = []
    skipped: list[SkippedFile] = []
    total = 0
    with pydicom_quiet() as said:
        for entry in entries:
            path = Path(entry.path)
            said.clear()
            try:
                records = _read_file(path, limit - total, limit)
            except NotImage as exc:
                skipped.append(SkippedFile(path, str(exc)))
                logger.info("%s: ignored %s: %s", folder, path.name, exc)
                continue
            except _OverBudget as exc:
                raise DicomReadError(_over_budget(folder, limit, len(slices), str(exc))) from None
            except Exception as exc:  # any parser/decoder failure skips only this file
                reason = str(exc) if isinstance(exc, BadFile) else _unexpected(exc, said)
                skipped.append(SkippedFile(path, reason))
                logger.warning("%s: skipped %s: %s", folder, path.name, reason)
                continue
            slices.extend(records)
            total += sum(4 * r.pixels.size for r in records)  # the float32 stack to come
    return _one_series(slices, skipped, folder), skipped


def _unexpected(exc: Exception, said: list[str]) -> str:
    """The reason for a failure no check foresaw: the exception, or the decoder's own words."""
    words = f"{describe(exc)}" + (f"; {said[0]}" if said else "")
    return f"unreadable ({words[:240]}): the file is damaged; {RECOPY}"


class _OverBudget(Exception):
    """Decoding this file would take the series past its memory budget."""


def _over_budget(folder: Path, limit: int, n_read: int, what: str) -> str:
    return (
        f"{folder}: {what}; a series may take at most {limit / 2**20:.0f} MB in memory "
        f"(stopped after {n_read} slice(s)). A lumbar MR series needs far less: check that the "
        "folder holds one series, or split it"
    )


def _one_series(slices: list[SliceRecord], skipped: list[SkippedFile], folder: Path) -> list:
    """Keep the slices of the folder's main series (the SeriesInstanceUID most files carry).

    A file of another series (another study's slice copied in, a stray CT) would otherwise be
    ordered among these slices as if it were one of them.
    """
    uids = Counter(s.series_uid for s in slices)
    if len(uids) < 2:
        return slices
    main, n = max(uids.items(), key=lambda kv: (kv[1], kv[0] != ""))
    for s in slices:
        if s.series_uid != main:
            other = f"SeriesInstanceUID ...{s.series_uid[-12:]}" if s.series_uid else "none"
            reason = (
                f"belongs to another series ({other}) than the other {n} slice(s) here: put "
                "each series in its own folder"
                if s.series_uid
                else "no SeriesInstanceUID, so it cannot be told apart from another series: "
                f"{REEXPORT}"
            )
            skip_unique(skipped, [s.path], reason, folder)
    return [s for s in slices if s.series_uid == main]


def _read_file(path: Path, budget: int, limit: int) -> list[SliceRecord]:
    """All frames of one file as slices (a classic MR file has one, an enhanced MR file many).

    ``budget``: bytes the series may still take as float32; ``limit``: all it may take.
    """
    ds = open_dataset(path)
    with damaged_header():
        _check_image(ds)
        mb = 4 * check_pixel_data(ds) / 2**20
    if mb > limit / 2**20:  # the file alone: its header claims more than any series may hold
        raise BadFile(
            f"its header claims {mb:.0f} MB of pixels (Rows x Columns x frames), more than the "
            f"{limit / 2**20:.0f} MB a whole series may take: damaged header; {RECOPY}"
        )
    if mb > budget / 2**20:
        raise _OverBudget(f"{path.name} would take the series past the limit")
    try:
        frames = decode(ds)
    except Exception as exc:
        raise BadFile(decode_reason(ds, exc)) from exc
    with damaged_header():
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


def _check_image(ds: pydicom.Dataset) -> None:
    """Refuse what is not a grayscale image slice, with what it is instead."""
    if is_dicomdir(ds):
        raise NotImage(DICOMDIR_REASON)
    sop = ds.get("SOPClassUID")
    if PIXEL_DATA not in ds:
        name = str(getattr(sop, "name", "") or "")
        if "Rows" in ds or "Image Storage" in name:
            raise BadFile(f"image file without pixel data (cut short or damaged); {RECOPY}")
        if sop is None:
            raise BadFile(f"damaged: no readable data set after the DICOM header; {RECOPY}")
        raise NotImage(f"DICOM without pixel data ({name or sop}); ignored")
    samples = ds.get("SamplesPerPixel") or 1
    if samples != 1:
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
        raise BadFile(
            f"colour image (SamplesPerPixel {samples}, {photometric or 'colour'}): a screenshot "
            "or secondary capture, not an MR slice; leave it out of the series"
        )
