"""Points derived from the located ones: per-level offsets learned in patient space, and fusion.

Axial T2 gets no network: the recesses are the spinal point plus a per-level, per-side offset in
patient space (learned from the training fold), then projected into the nearest axial stack.
Axial series are often stacks angled per disc; patient space makes that transparent.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from spinegrade.localization.points import StudyPoints
from spinegrade.task import CONDITIONS, LEVELS

SPINAL, LEFT_FOR, RIGHT_FOR = CONDITIONS[0], CONDITIONS[1], CONDITIONS[2]
LEFT_SUB, RIGHT_SUB = CONDITIONS[3], CONDITIONS[4]
I_CANAL = CONDITIONS.index(SPINAL)


def fit_offsets(points: Sequence[StudyPoints]) -> dict[str, np.ndarray]:
    """Median patient-space offsets learned from true points of the training studies.

    ``subarticular`` (2, 5, 3): recess minus canal point per side (left, right) and level: the
    recesses sit just lateral and posterior of the canal centre. ``spinal_from_foramina`` (5, 3):
    canal point minus the midpoint of the two foramina, used when the T2 series is missing.
    ``disc_from_spinal`` (5, 3): disc centre minus canal point, and ``disc_in_frame`` (5, 3): the
    same offset in the spine's own axes at the level (lateral, along, across; see
    :func:`spine_frames`), both only when some training study has labelled disc centres
    (imported real sets); without them no disc centre is derived.
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
        local = np.full_like(disc, np.nan)
        for n, p in enumerate(points):
            axes = spine_frames(p.xyz[I_CANAL])
            local[n] = np.einsum("jab,jb->ja", axes, disc[n])  # NaN where either is unknown
        out["disc_in_frame"] = _robust_median(local, axis=0)
    return out


def spine_frames(canal: np.ndarray) -> np.ndarray:
    """(5, 3, 3): per level, the rows are the spine's own unit axes at its canal point: lateral,
    along the canal (head to feet), and across it (the sagittal plane's normal to the canal).

    The disc lies in front of the canal, across the spine's axis; with lordosis that direction
    turns by tens of degrees from L1/L2 to L5/S1 and from one patient to the next, so an offset
    in fixed patient axes puts the disc centre above or below the disc where the spine leans
    (on SPIDER's true canal points, out of fold: median error 3.8 mm in patient axes, 2.9 in
    these). The axis along the canal runs through the nearest known neighbours of the level
    (one side at the chain's ends). NaN for a level whose canal point, or both neighbours, are
    unknown.
    """
    canal = np.asarray(canal, dtype=np.float64)
    out = np.full((len(canal), 3, 3), np.nan)
    known = [j for j in range(len(canal)) if np.isfinite(canal[j]).all()]
    lateral = np.array([1.0, 0.0, 0.0])  # LPS x: the patient's left
    for j in known:
        above = [k for k in known if k < j]
        below = [k for k in known if k > j]
        if not above and not below:
            continue
        head = canal[above[-1] if above else j]
        feet = canal[below[0] if below else j]
        along = (feet - head) / np.linalg.norm(feet - head)
        across = np.cross(lateral, along)
        norm = np.linalg.norm(across)
        if norm < 1e-6:  # a canal running left-right: no sagittal plane to speak of
            continue
        across /= norm
        out[j] = np.stack([np.cross(along, across), along, across])
    return out


def _robust_median(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():  # all-NaN slices are expected (levels never labelled)
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(values, axis=axis)
        overall = np.nanmedian(values.reshape(-1, 3), axis=0) if values.size else np.zeros(3)
    overall = np.where(np.isnan(overall), 0.0, overall)
    return np.where(np.isnan(med), overall, med)


# Which point leads the canal/foramina consensus (see fuse_level_points): "" = none, the median of
# the three; "canal" = the canal's, which the foramina follow and never move (fusion_lead).
FUSE_LEADS: tuple[str, ...] = ("", "canal")


def fusion_lead(kinds: Mapping[str, Collection[str]]) -> str:
    """The consensus's lead from what each stage-1 net learned from (task name -> kinds of its
    training data, "phantom" / "real"): "canal" when the canal's net learned from real spines
    and the foramina's did not, else "" (no lead).

    On real images a phantom-only net names discs far worse than one that saw real spines, and
    its two foramina come from one net, so they agree with each other when they are wrong and
    outvote the canal. With SPIDER's T2 series also given as the T1 series (a proxy: no real T1
    here), the demo's phantom-only foraminal net dragged its real-trained canal from 79.5% of
    the levels within 5 mm and 27 misnamed to 39.5% and 70 (BENCHMARKS.md, "Tenth round").
    """
    canal, foramina = set(kinds.get("spinal", ())), set(kinds.get("foraminal", ()))
    return "canal" if "real" in canal and "real" not in foramina else ""


def fuse_level_points(
    points: StudyPoints, offsets: Mapping[str, np.ndarray], tol_mm: float, lead: str | None = ""
) -> StudyPoints:
    """Consensus of the canal and the two foramina of each level (height and depth only).

    The spinal network (sagittal T2) and the foraminal network (sagittal T1) look at different
    series, so their mistakes are nearly independent, yet anatomy ties their answers together:
    the two foramina of a level sit beside its disc, at a fixed offset from the canal point
    (``spinal_from_foramina``). Each of the three points thus gives an estimate of the canal's
    cranio-caudal and antero-posterior position; a point farther than ``tol_mm`` from their
    median (typically a level that slid towards its neighbouring disc) is moved onto it. The
    lateral coordinates are kept: the canal lies on the midline, the foramina where the foraminal
    network saw them. Levels missing any of the three points are left as they are. With
    ``lead`` "canal" (:func:`fusion_lead`) the canal's estimate is the consensus: a foramen
    farther than ``tol_mm`` from it is moved onto it, and the canal never moves.
    """
    if lead not in (*FUSE_LEADS, None):
        raise ValueError(f"fusion lead {lead!r}: use one of {list(FUSE_LEADS)}")
    out = points.copy()
    if tol_mm <= 0:
        return out
    xyz, off = out.xyz, offsets["spinal_from_foramina"]
    i_canal, i_left, i_right = I_CANAL, CONDITIONS.index(LEFT_FOR), CONDITIONS.index(RIGHT_FOR)
    for j in range(len(LEVELS)):
        trio = xyz[[i_canal, i_left, i_right], j]  # (3, 3) LPS
        if np.isnan(trio).any():
            continue
        # LPS axes 1 and 2 are posterior and superior: the level's depth and height. Each
        # foramen of a symmetric pair shares them with the pair's midpoint, so foramen + offset
        # is a canal estimate there; the lateral axis (0) is never touched.
        estimates = trio[:, 1:].copy()
        estimates[1:] += off[j, 1:]
        consensus = estimates[0] if lead == "canal" else np.median(estimates, axis=0)
        far = np.linalg.norm(estimates - consensus, axis=1) > tol_mm
        estimates[far] = consensus
        estimates[1:] -= off[j, 1:]
        xyz[[i_canal, i_left, i_right], j, 1:] = estimates
    return out


def derive_points(points: StudyPoints, offsets: Mapping[str, np.ndarray]) -> StudyPoints:
    """Fill points no network predicts: the canal from the foramina (no T2), the recesses, and
    the disc centre (when the localiser learned its offset from labelled discs).

    The disc centre takes its offset in the spine's own axes at the level
    (``disc_in_frame``, see :func:`spine_frames`) where the canal chain gives them, else in
    patient axes (``disc_from_spinal``; localisers saved before the former was learned).
    Only NaN points are filled, so true or predicted points always win.
    """
    out = points.copy()
    for j, level in enumerate(LEVELS):
        left, right = out.get(LEFT_FOR, level), out.get(RIGHT_FOR, level)
        if out.get(SPINAL, level) is None and left is not None and right is not None:
            out.set(SPINAL, level, 0.5 * (left + right) + offsets["spinal_from_foramina"][j])
    disc_offset, in_frame = offsets.get("disc_from_spinal"), offsets.get("disc_in_frame")
    axes = spine_frames(out.xyz[I_CANAL]) if in_frame is not None else None
    for j, level in enumerate(LEVELS):
        spinal = out.get(SPINAL, level)
        if spinal is None:
            continue
        if out.get_disc(level) is None:
            if axes is not None and np.isfinite(axes[j]).all():
                out.disc[j] = spinal + axes[j].T @ in_frame[j]
            elif disc_offset is not None:
                out.disc[j] = spinal + disc_offset[j]
        for side, condition in enumerate((LEFT_SUB, RIGHT_SUB)):
            if out.get(condition, level) is None:
                out.set(condition, level, spinal + offsets["subarticular"][side, j])
    return out
