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
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset


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


def numbers(ds: Dataset, tag: int) -> list[float] | None:
    """All values of a DS/IS element as floats; None when absent, empty or not numeric."""
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
        return None


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
    """A value from the per-frame functional group, else the shared one, else the top level."""
    for group in (item, shared):
        if group is not None and seq in group:
            inner = group[seq].value
            if inner and tag in inner[0]:
                return numbers(inner[0], tag)
    return numbers(ds, tag)


def _vector(values: list[float] | None, n: int) -> np.ndarray | None:
    if values is None or len(values) != n or not all(map(math.isfinite, values)):
        return None
    return np.array(values, dtype=np.float64)


def _orientation(values: list[float] | None) -> np.ndarray | None:
    """ImageOrientationPatient, or None when it cannot be two directions in a plane (a zero or
    non-perpendicular pair is a broken header, and would give a meaningless slice normal)."""
    iop = _vector(values, 6)
    if iop is None:
        return None
    row, col = iop[:3], iop[3:]
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if nr < 0.5 or nc < 0.5 or abs(float(row @ col)) > 0.1 * nr * nc:
        return None
    return iop


def frame_values(
    ds: Dataset, item: Dataset | None, shared: Dataset | None, multi_frame: bool
) -> dict:
    """Geometry and rescale of one frame; None where the header lacks a geometric value."""
    pos = _vector(group_numbers(ds, item, shared, PLANE_POSITION, IPP), 3)
    iop = _orientation(group_numbers(ds, item, shared, PLANE_ORIENTATION, IOP))
    spacing = _vector(group_numbers(ds, item, shared, PIXEL_MEASURES, PIXEL_SPACING), 2)
    if multi_frame and item is None:
        pos = None  # a legacy multi-frame file has one position for all frames: not per slice
    slope = group_numbers(ds, item, shared, VALUE_TRANSFORM, SLOPE)
    intercept = group_numbers(ds, item, shared, VALUE_TRANSFORM, INTERCEPT)
    return {
        "position": pos,
        "row": iop[:3] if iop is not None else None,
        "col": iop[3:] if iop is not None else None,
        "spacing": (float(spacing[0]), float(spacing[1])) if spacing is not None else None,
        # A zero slope is a broken header, not a black image.
        "slope": (slope[0] if slope else 1.0) or 1.0,
        "intercept": intercept[0] if intercept else 0.0,
    }


def file_values(ds: Dataset, path: Path) -> dict:
    """Values shared by all frames of one file (InstanceNumber -1 when absent)."""
    instance = first_number(ds, INSTANCE)
    return {
        "path": path,
        "instance": int(instance) if instance is not None else -1,
        "invert_sum": monochrome1_sum(ds),
        "description": text(ds, SERIES_DESCRIPTION),
        "series_uid": text(ds, SERIES_UID),
        "step": first_number(ds, SPACING_BETWEEN) or first_number(ds, THICKNESS),
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
