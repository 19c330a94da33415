"""The few header values the reader needs, per file and per frame.

Numbers (DS/IS) are parsed straight from the raw element text when pydicom has not converted the
element yet: pydicom's validated ``DSfloat`` conversion costs more per slice than the rest of the
reader's bookkeeping, and these values are plain decimal text ("-83.9063\\-91.2\\6.6406").
Enhanced (multi-frame) MR keeps geometry and rescale in functional group sequences: a per-frame
item, else the shared item, else (classic MR) the top level of the data set.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from spinegrade.io.files import REEXPORT, BadFile


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag


IPP = _tag("ImagePositionPatient")
IOP = _tag("ImageOrientationPatient")
PIXEL_SPACING = _tag("PixelSpacing")
SLOPE = _tag("RescaleSlope")
INTERCEPT = _tag("RescaleIntercept")
INSTANCE = _tag("InstanceNumber")
THICKNESS = _tag("SliceThickness")
SPACING_BETWEEN = _tag("SpacingBetweenSlices")
PER_FRAME = _tag("PerFrameFunctionalGroupsSequence")
SHARED = _tag("SharedFunctionalGroupsSequence")
PLANE_POSITION = _tag("PlanePositionSequence")
PLANE_ORIENTATION = _tag("PlaneOrientationSequence")
PIXEL_MEASURES = _tag("PixelMeasuresSequence")
VALUE_TRANSFORM = _tag("PixelValueTransformationSequence")
SERIES_DESCRIPTION = _tag("SeriesDescription")
SERIES_UID = _tag("SeriesInstanceUID")


class HeaderError(BadFile):
    """A geometric or rescale value that is present but cannot be right (zero, NaN, skewed)."""


def numbers(ds: Dataset, tag: int, strict: bool = False) -> list[float] | None:
    """All values of a DS/IS element as floats; None when absent or empty.

    Text that is not numeric gives None, or with ``strict`` a :class:`HeaderError` naming the
    element: a value the geometry needs must not silently count as missing.
    """
    elem = ds.get_item(tag)
    if elem is None:
        return None
    value = elem.value
    try:
        if isinstance(value, bytes):  # still raw: text like b"0.7\\0.7 "
            text = value.decode("latin-1").strip(" \x00")
            return [float(v) for v in text.split("\\")] if text else None
        if value is None or value == "":
            return None
        if isinstance(value, int | float):  # converted single value (DSfloat, IS)
            return [float(value)]
        return [float(v) for v in value]  # converted MultiValue
    except (TypeError, ValueError):
        if not strict:
            return None
        shown = value.decode("latin-1", "replace") if isinstance(value, bytes) else str(value)
        raise HeaderError(
            f"{keyword_for_tag(tag)} is not a number ('{shown.strip()[:40]}'); {REEXPORT}"
        ) from None


def text(ds: Dataset, tag: int) -> str:
    """A text element; ASCII straight from the raw bytes, anything else through pydicom (which
    applies the data set's SpecificCharacterSet)."""
    elem = ds.get_item(tag)
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, bytes) and value.isascii():
        return value.decode("ascii").strip(" \x00")
    return str(ds[tag].value or "")


def first_number(ds: Dataset, tag: int) -> float | None:
    vals = numbers(ds, tag)
    return vals[0] if vals else None


def group_numbers(
    ds: Dataset, item: Dataset | None, shared: Dataset | None, seq: int, tag: int
) -> list[float] | None:
    """A value from the per-frame functional group, else the shared one, else the top level.

    Strict: text that is not a number raises :class:`HeaderError`.
    """
    for group in (item, shared):
        if group is not None and seq in group:
            inner = group[seq].value
            if inner and tag in inner[0]:
                return numbers(inner[0], tag, strict=True)
    return numbers(ds, tag, strict=True)


def _shown(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _position(values: list[float] | None) -> np.ndarray | None:
    """ImagePositionPatient (None when absent): three finite numbers, or the file is refused."""
    if values is None:
        return None
    if len(values) != 3 or not all(map(math.isfinite, values)):
        raise HeaderError(
            f"ImagePositionPatient is not three finite numbers ({_shown(values)}): the slice "
            f"cannot be placed in the patient; {REEXPORT} with each slice's position"
        )
    return np.array(values, dtype=np.float64)


def _orientation(values: list[float] | None) -> np.ndarray | None:
    """ImageOrientationPatient (None when absent), refused unless it is two directions in a
    plane: a zero or non-perpendicular pair is a broken header, and would give a meaningless
    slice normal (the plane, the slice order and every mapped point hang on it)."""
    if values is None:
        return None
    iop = orientation_or_none(values)
    if iop is None:
        raise HeaderError(
            f"ImageOrientationPatient ({_shown(values)}) is not two perpendicular directions: "
            f"the slice plane is unknown; {REEXPORT} with its orientation"
        )
    return iop


def orientation_or_none(values: list[float] | None) -> np.ndarray | None:
    """ImageOrientationPatient as an array when it is two (near-)perpendicular, non-zero
    directions, else None (DS text is rounded, so a little slack is allowed)."""
    if values is None or len(values) != 6 or not all(map(math.isfinite, values)):
        return None
    iop = np.array(values, dtype=np.float64)
    row, col = iop[:3], iop[3:]
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if nr < 0.5 or nc < 0.5 or abs(float(row @ col)) > 0.1 * nr * nc:
        return None
    return iop


def _spacing(values: list[float] | None) -> tuple[float, float] | None:
    """PixelSpacing (row, column) in mm (None when absent), refused unless two positive
    numbers: a zero spacing makes every length zero (and divides by zero), a negative one has
    no meaning."""
    if values is None:
        return None
    problem = ""
    if len(values) != 2:
        problem = f"is not two numbers ({_shown(values)})"
    elif not all(map(math.isfinite, values)):
        problem = f"is not a finite number ({_shown(values)})"
    elif min(values) == 0:
        problem = f"is 0 ({_shown(values)})"
    elif min(values) < 0:
        problem = f"is negative ({_shown(values)})"
    if problem:
        raise HeaderError(
            f"PixelSpacing {problem}: the slices cannot be measured; {REEXPORT} with its "
            "pixel spacing"
        )
    return float(values[0]), float(values[1])


def _rescale(slope: list[float] | None, intercept: list[float] | None) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept), (1, 0) when absent. A zero slope would map every pixel
    to the intercept (a blank image), a NaN one every pixel to NaN: both are broken headers."""
    s = slope[0] if slope else 1.0
    b = intercept[0] if intercept else 0.0
    if s == 0 or not math.isfinite(s):
        what = "0 (every pixel would have one value)" if s == 0 else f"not a number ({s:g})"
        raise HeaderError(
            f"RescaleSlope is {what}: the pixel values cannot be scaled; {REEXPORT} with its "
            "rescale values"
        )
    if not math.isfinite(b):
        raise HeaderError(f"RescaleIntercept is not a number ({b:g}); {REEXPORT}")
    return s, b


def frame_values(
    ds: Dataset, item: Dataset | None, shared: Dataset | None, multi_frame: bool
) -> dict:
    """Geometry and rescale of one frame; None where the header lacks a geometric value.

    Raises :class:`HeaderError` where a value is present but broken (see the helpers above).
    """
    pos = _position(group_numbers(ds, item, shared, PLANE_POSITION, IPP))
    iop = _orientation(group_numbers(ds, item, shared, PLANE_ORIENTATION, IOP))
    spacing = _spacing(group_numbers(ds, item, shared, PIXEL_MEASURES, PIXEL_SPACING))
    if multi_frame and item is None:
        pos = None  # a legacy multi-frame file has one position for all frames: not per slice
    slope, intercept = _rescale(
        group_numbers(ds, item, shared, VALUE_TRANSFORM, SLOPE),
        group_numbers(ds, item, shared, VALUE_TRANSFORM, INTERCEPT),
    )
    return {
        "position": pos,
        "row": iop[:3] if iop is not None else None,
        "col": iop[3:] if iop is not None else None,
        "spacing": spacing,
        "slope": slope,
        "intercept": intercept,
    }


def file_values(ds: Dataset, path: Path) -> dict:
    """Values shared by all frames of one file (InstanceNumber -1 when absent or absurd).

    InstanceNumber and the slice step only break ties and space a series without geometry, so a
    broken value there is dropped rather than refused.
    """
    instance = first_number(ds, INSTANCE)
    steps = [first_number(ds, SPACING_BETWEEN), first_number(ds, THICKNESS)]
    return {
        "path": path,
        "instance": int(instance) if instance is not None and abs(instance) < 2**62 else -1,
        "invert_sum": monochrome1_sum(ds),
        "description": text(ds, SERIES_DESCRIPTION),
        "series_uid": text(ds, SERIES_UID),
        "step": next((v for v in steps if v is not None and 0 < v < 1e4), None),
    }


def monochrome1_sum(ds: Dataset) -> float | None:
    """For MONOCHROME1 (low values bright) the constant c such that ``c - v`` flips the stored
    range onto itself, so that bright is high like MONOCHROME2; None for other photometrics.

    Called after decoding, when pydicom has already converted these image-pixel elements.
    """
    if str(ds.get("PhotometricInterpretation", "")).strip() != "MONOCHROME1":
        return None
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -1.0  # signed range [-2^(b-1), 2^(b-1) - 1]
    return float(2**bits - 1)
