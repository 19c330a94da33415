"""Points derived from the located ones: per-level offsets learned in patient space, and fusion.

Axial T2 gets no network: the recesses are the spinal point plus a per-level, per-side offset in
patient space (learned from the training fold), then projected into the nearest axial stack.
Axial series are often stacks angled per disc; patient space makes that transparent.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from spinegrade.localization.points import StudyPoints
from spinegrade.task import CONDITIONS, LEVELS

SPINAL, LEFT_FOR, RIGHT_FOR = CONDITIONS[0], CONDITIONS[1], CONDITIONS[2]
LEFT_SUB, RIGHT_SUB = CONDITIONS[3], CONDITIONS[4]


def fit_offsets(points: Sequence[StudyPoints]) -> dict[str, np.ndarray]:
    """Median patient-space offsets learned from true points of the training studies.

    ``subarticular`` (2, 5, 3): recess minus canal point per side (left, right) and level: the
    recesses sit just lateral and posterior of the canal centre. ``spinal_from_foramina`` (5, 3):
    canal point minus the midpoint of the two foramina, used when the T2 series is missing.
    ``disc_from_spinal`` (5, 3): disc centre minus canal point, only when some training study
    has labelled disc centres (imported real sets); without it no disc centre is derived.
    Levels without examples fall back to the median over levels (then zero).
    """
    xyz = np.stack([p.xyz for p in points]) if points else np.full((0, 5, 5, 3), np.nan)
    spinal = xyz[:, 0]
    sub = np.stack([xyz[:, 3] - spinal, xyz[:, 4] - spinal], axis=1)  # (N, 2, 5, 3)
    mid = 0.5 * (xyz[:, 1] + xyz[:, 2])
    out = {
        "subarticular": _robust_median(sub, axis=0),
        "spinal_from_foramina": _robust_median(spinal - mid, axis=0),
    }
    disc = np.stack([p.disc for p in points]) - spinal if points else np.full((0, 5, 3), np.nan)
    if np.isfinite(disc).all(axis=-1).any():
        out["disc_from_spinal"] = _robust_median(disc, axis=0)
    return out


def _robust_median(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():  # all-NaN slices are expected (levels never labelled)
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(values, axis=axis)
        overall = np.nanmedian(values.reshape(-1, 3), axis=0) if values.size else np.zeros(3)
    overall = np.where(np.isnan(overall), 0.0, overall)
    return np.where(np.isnan(med), overall, med)


def fuse_level_points(
    points: StudyPoints, offsets: Mapping[str, np.ndarray], tol_mm: float
) -> StudyPoints:
    """Consensus of the canal and the two foramina of each level (height and depth only).

    The spinal network (sagittal T2) and the foraminal network (sagittal T1) look at different
    series, so their mistakes are nearly independent, yet anatomy ties their answers together:
    the two foramina of a level sit beside its disc, at a fixed offset from the canal point
    (``spinal_from_foramina``). Each of the three points thus gives an estimate of the canal's
    cranio-caudal and antero-posterior position; a point farther than ``tol_mm`` from their
    median (typically a level that slid towards its neighbouring disc) is moved onto it. The
    lateral coordinates are kept: the canal lies on the midline, the foramina where the foraminal
    network saw them. Levels missing any of the three points are left as they are.
    """
    out = points.copy()
    if tol_mm <= 0:
        return out
    xyz, off = out.xyz, offsets["spinal_from_foramina"]
    i_canal, i_left, i_right = (CONDITIONS.index(c) for c in (SPINAL, LEFT_FOR, RIGHT_FOR))
    for j in range(len(LEVELS)):
        trio = xyz[[i_canal, i_left, i_right], j]  # (3, 3) LPS
        if np.isnan(trio).any():
            continue
        # LPS axes 1 and 2 are posterior and superior: the level's depth and height. Each
        # foramen of a symmetric pair shares them with the pair's midpoint, so foramen + offset
        # is a canal estimate there; the lateral axis (0) is never touched.
        estimates = trio[:, 1:].copy()
        estimates[1:] += off[j, 1:]
        consensus = np.median(estimates, axis=0)
        far = np.linalg.norm(estimates - consensus, axis=1) > tol_mm
        estimates[far] = consensus
        estimates[1:] -= off[j, 1:]
        xyz[[i_canal, i_left, i_right], j, 1:] = estimates
    return out


def derive_points(points: StudyPoints, offsets: Mapping[str, np.ndarray]) -> StudyPoints:
    """Fill points no network predicts: the canal from the foramina (no T2), the recesses, and
    the disc centre (when the localiser learned its offset from labelled discs).

    Only NaN points are filled, so true or predicted points always win.
    """
    out = points.copy()
    disc_offset = offsets.get("disc_from_spinal")
    for j, level in enumerate(LEVELS):
        left, right = out.get(LEFT_FOR, level), out.get(RIGHT_FOR, level)
        if out.get(SPINAL, level) is None and left is not None and right is not None:
            out.set(SPINAL, level, 0.5 * (left + right) + offsets["spinal_from_foramina"][j])
        spinal = out.get(SPINAL, level)
        if spinal is None:
            continue
        if disc_offset is not None and out.get_disc(level) is None:
            out.disc[j] = spinal + disc_offset[j]
        for side, condition in enumerate((LEFT_SUB, RIGHT_SUB)):
            if out.get(condition, level) is None:
                out.set(condition, level, spinal + offsets["subarticular"][side, j])
    return out
