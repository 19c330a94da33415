"""Are the levels named right? Located canal points scored against the true disc centres.

A canal point lies about 2 cm behind its disc, so it is scored by its distance to the disc's
mid-plane along the local spine axis (the tangent of the curve through the five disc centres,
:func:`spine_axes`), not by a 3D distance. A level is *misnamed* when its point lies nearer
another disc's mid-plane than its own: a report that names L4/L5 on the L3/L4 disc. Used by
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


def plane_distances(point: np.ndarray, centres: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Signed distance (mm, + = towards the head) of ``point`` to every disc's mid-plane."""
    return np.einsum("ij,ij->i", point[None, :] - centres, axes)


def score_case(located: np.ndarray, centres: np.ndarray) -> list[dict]:
    """Per level: signed mid-plane distance, and the disc whose mid-plane is nearest."""
    axes = spine_axes(centres)
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


__all__ = ["misnamed", "plane_distances", "score_case", "spine_axes", "summarise"]
