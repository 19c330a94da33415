"""Patient-space geometry of DICOM slices: orientation groups, slice order, stack splitting, names.

All coordinates are DICOM LPS millimetres: +x towards the patient's Left, +y Posterior, +z Head.
A slice's normal is ``cross(row_dir, col_dir)`` of its ImageOrientationPatient; projecting
ImagePositionPatient on that normal gives the slice's place in its stack, independent of file names
and InstanceNumbers (which scanners and anonymisers number in either direction).
"""

from __future__ import annotations

import numpy as np

from spinegrade.task import AXIS_LETTERS, PLANE_OF_AXIS


def unit(v: np.ndarray) -> np.ndarray:
    """``v`` scaled to length 1 along its last axis."""
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def orthonormal_axes(row: np.ndarray, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column directions made unit and exactly perpendicular (DS text is rounded)."""
    r = unit(np.asarray(row, dtype=np.float64))
    c = np.asarray(col, dtype=np.float64)
    c = unit(c - (c @ r) * r)
    return r, c


def cluster_orientations(rows: np.ndarray, cols: np.ndarray, tol_deg: float) -> np.ndarray:
    """Label slices whose row and column directions agree within ``tol_deg`` degrees.

    Axial T2 series often hold one stack per disc, each tilted to lie parallel to its disc, so the
    orientation is what tells those stacks apart. Both in-plane axes must agree (not only the
    normal): slices rotated in-plane cannot share one pixel grid.
    Returns an int array of cluster ids, numbered in order of first appearance.
    """
    cos_tol = np.cos(np.deg2rad(tol_deg))
    reps: list[tuple[np.ndarray, np.ndarray]] = []
    known: dict[tuple[float, ...], int] = {}  # a series has a handful of distinct orientations
    labels = np.empty(len(rows), dtype=np.int64)
    for i, key in enumerate(map(tuple, np.round(np.hstack([rows, cols]), 4).tolist())):
        label = known.get(key)
        if label is None:
            r, c = unit(np.array(key[:3])), unit(np.array(key[3:]))
            label = next(
                (j for j, (rr, cc) in enumerate(reps) if r @ rr >= cos_tol and c @ cc >= cos_tol),
                len(reps),
            )
            if label == len(reps):
                reps.append((r, c))
            known[key] = label
        labels[i] = label
    return labels


def plane_name(normal: np.ndarray) -> str:
    """ "sagittal" | "coronal" | "axial", from the LPS axis the slice normal points along most."""
    return PLANE_OF_AXIS[int(np.argmax(np.abs(normal)))]


def direction_name(normal: np.ndarray) -> str:
    """Where increasing slice index runs in the patient, e.g. "R->L" or "H->F".

    Stacks are ordered so that the position along ``normal`` increases, so the direction is the
    dominant LPS axis of the normal, read from its negative to its positive end when the
    component is positive (x+ is Left, y+ Posterior, z+ Head).
    """
    axis = int(np.argmax(np.abs(normal)))
    neg, pos = AXIS_LETTERS[axis]
    return f"{neg}->{pos}" if normal[axis] > 0 else f"{pos}->{neg}"


def same_position_tolerance(d_sorted: np.ndarray) -> float:
    """Distance along the normal (mm) under which two slices count as the same position.

    A tenth of the median spacing between distinct positions: DS text rounding is ~1e-4 mm, real
    slice spacing is rarely under 0.5 mm.
    """
    diffs = np.diff(d_sorted)
    distinct = diffs[diffs > 1e-3]
    return max(1e-3, 0.1 * float(np.median(distinct))) if len(distinct) else 1e-3


def level_ids(d_sorted: np.ndarray, tol: float) -> np.ndarray:
    """Number the distinct positions of slices sorted along the normal: 0, 0, 1, 2, 2, ..."""
    new_level = np.concatenate([[True], np.diff(d_sorted) > tol])
    return np.cumsum(new_level) - 1


def rank_within_levels(levels: np.ndarray) -> np.ndarray:
    """0 for the first slice at a position, 1 for its first repeat, ... (``levels`` sorted).

    A repeated position means the same place was acquired again (a repeated stack), so the k-th
    occurrence of every position is sent to the k-th stack.
    """
    rank = np.zeros(len(levels), dtype=np.int64)
    for i in range(1, len(levels)):
        if levels[i] == levels[i - 1]:
            rank[i] = rank[i - 1] + 1
    return rank


def contiguous_runs(
    d: np.ndarray, inplane: np.ndarray, gap_factor: float, inplane_tol_mm: float
) -> list[np.ndarray]:
    """Split slices sorted along the normal into contiguous runs (index arrays into ``d``).

    A new run starts where the gap to the previous slice exceeds ``gap_factor`` times the median
    spacing (e.g. the next disc's stack, parallel to this one), or where the slice centre jumps
    sideways by more than ``inplane_tol_mm`` (a parallel stack shifted within the plane).
    ``inplane`` holds each slice's position with its normal component removed, shape (n, 3).
    """
    n = len(d)
    if n < 2:
        return [np.arange(n)]
    gaps = np.diff(d)
    median = float(np.median(gaps))
    jumps = np.linalg.norm(np.diff(inplane, axis=0), axis=1)
    breaks = jumps > inplane_tol_mm
    if median > 0:
        breaks |= gaps > gap_factor * median
    cut = np.flatnonzero(breaks) + 1
    return np.split(np.arange(n), cut)
