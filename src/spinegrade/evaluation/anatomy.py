"""Are the levels named right? Located canal points scored against the true disc centres.

A canal point lies about 2 cm behind its disc, so it is scored by its distance to the disc's
mid-plane, not by a 3D distance. The mid-plane is the disc's own where its canal point is known
(:func:`disc_axes`: the plane through the disc centre that holds the line from the disc to its
canal point and the left-right axis, which is how SPIDER's canal points were placed), else the
plane across the local spine axis (the tangent of the curve through the five disc centres,
:func:`spine_axes`). The two differ most at L5/S1, whose wedge-shaped disc is tilted against the
spine's curve: there SPIDER's own canal points lie 7 mm (median) off the spine-axis plane and
within 1.5 mm of their disc's plane. A level is *misnamed* when its point lies nearer another
disc's mid-plane than its own: a report that names L4/L5 on the L3/L4 disc. Used by
cross-validation on real sets with labelled disc centres (SPIDER) and by
``bench/bench_real_anatomy.py``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from spinegrade.task import LEVEL_TITLES, LEVELS


def spine_axes(centres: np.ndarray) -> np.ndarray:
    """(5, 3) unit local spine axes at the discs (head first), pointing to the head.

    The tangent of the curve through the disc centres: at an inner disc the line through its two
    neighbours, at L1/L2 and L5/S1 the end tangent of the parabola through the last three
    centres. So a canal point behind the disc is measured along the spine, not across it. The
    end tangent matters at L5/S1, where the lordosis curves most: the one-sided chord to L4/L5
    put a perfect canal point 4.5 mm (3.6-5.8) off its mid-plane on 40 phantom spines, whose
    exact disc planes are known; the end tangent, 1.1 mm (0.5-1.9; inner discs -0.5..-0.2 mm).
    """
    c = np.asarray(centres, dtype=float)
    n = len(c)
    out = np.zeros_like(c)
    for i in range(n):
        if 0 < i < n - 1:
            v = c[i - 1] - c[i + 1]
        elif i == 0:
            v = (3 * c[0] - 4 * c[1] + c[2]) / 2
        else:
            v = (-3 * c[-1] + 4 * c[-2] - c[-3]) / 2
        out[i] = v / np.linalg.norm(v)
    return out


def disc_axes(centres: np.ndarray, canal: np.ndarray | None) -> np.ndarray:
    """(5, 3) unit normals of the discs' mid-planes (head first), pointing to the head.

    Where a disc's canal point is known, the normal of the plane holding the disc centre, the
    line to the canal point (the disc's antero-posterior axis in the sagittal plane) and the
    left-right axis (LPS x): the disc's own plane. Elsewhere the spine axis (:func:`spine_axes`).
    """
    axes = spine_axes(centres)
    if canal is None:
        return axes
    out = axes.copy()
    for j in range(len(axes)):
        d = np.asarray(canal[j], dtype=float) - centres[j]
        if not np.isfinite(d).all():
            continue
        n = np.array([0.0, -d[2], d[1]])  # cross(left-right, d): in the sagittal plane, normal to d
        norm = np.linalg.norm(n)
        if norm < 1e-6:
            continue
        n /= norm
        out[j] = n if n @ axes[j] >= 0 else -n  # towards the head, as the spine axis
    return out


def plane_distances(point: np.ndarray, centres: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Signed distance (mm, + = towards the head) of ``point`` to every disc's mid-plane."""
    return np.einsum("ij,ij->i", point[None, :] - centres, axes)


def score_case(
    located: np.ndarray, centres: np.ndarray, canal: np.ndarray | None = None
) -> list[dict]:
    """Per level: signed mid-plane distance, and the disc whose mid-plane is nearest.

    ``canal``: the true canal points (5, 3), when known, give each disc its own plane
    (:func:`disc_axes`); without them the planes lie across the spine axis.
    """
    axes = disc_axes(np.asarray(centres, dtype=float), canal)
    rows = []
    for j, level in enumerate(LEVELS):
        p = located[j]
        if not np.isfinite(p).all():
            rows.append({"level": level, "dist_mm": np.nan, "nearest": None, "found": False})
            continue
        d = plane_distances(p, centres, axes)
        rows.append(
            {
                "level": level,
                "dist_mm": float(d[j]),
                "nearest": LEVELS[int(np.argmin(np.abs(d)))],
                "found": True,
            }
        )
    return rows


def misnamed(df: pd.DataFrame) -> pd.Series:
    """Rows whose level was not found or lies nearer another disc's mid-plane than its own."""
    return (~df["found"]) | (df["nearest"] != df["level"])


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per level and overall: n, median / p90 |distance|, within 5 / 10 mm, misnamed, bias."""
    out = []
    for name, g in [*((lv, df[df["level"] == lv]) for lv in LEVELS), ("all", df)]:
        a = g["dist_mm"].abs()
        out.append(
            {
                "level": LEVEL_TITLES.get(name, name) if name != "all" else "all",
                "n": len(g),
                "median_mm": a.median(),
                "p90_mm": a.quantile(0.9),
                "within_5mm": (a <= 5).mean(),
                "within_10mm": (a <= 10).mean(),
                "misnamed": int(misnamed(g).sum()),
                "mean_signed_mm": g["dist_mm"].mean(),
            }
        )
    return pd.DataFrame(out)


__all__ = ["disc_axes", "misnamed", "plane_distances", "score_case", "spine_axes", "summarise"]
