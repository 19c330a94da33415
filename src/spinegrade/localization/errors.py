"""How far located points are from labelled ones (mm, right slice), per target and level."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from spinegrade.localization.looks import locate_in_stacks
from spinegrade.localization.points import StudyPoints
from spinegrade.localization.samples import LocalizerSample
from spinegrade.preprocessing.cache import CachedStack, project_point
from spinegrade.task import AX_T2, CONDITION_GROUP, CONDITION_SERIES, CONDITIONS, LEVELS


def localizer_hits_errors(
    net: nn.Module,
    samples: Sequence[LocalizerSample],
    zoom: float,
    decoder: str = "ordered",
    fine: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-slice flags and errors (mm) of the labelled targets of ``samples`` (concatenated)."""
    hits, errs = [np.zeros(0, dtype=bool)], [np.zeros(0)]
    stacks, frames = [s.stack for s in samples], [s.frame for s in samples]
    located = locate_in_stacks(net, stacks, frames, zoom, decoder=decoder, fine=fine)
    for s, (z, y, x) in zip(samples, located, strict=True):
        lps = s.stack.voxel_to_patient(*s.frame.from_full(z, y, x))
        hits.append((np.rint(z) == np.rint(s.zyx[:, 0]))[s.valid])
        errs.append(np.linalg.norm(lps - s.points, axis=-1)[s.valid])
    return np.concatenate(hits), np.concatenate(errs)


def evaluate_localizer(
    net: nn.Module,
    samples: Sequence[LocalizerSample],
    zoom: float,
    decoder: str = "ordered",
    fine: float = 0.0,
) -> dict[str, float]:
    """Validation as prediction does it: right-slice rate, median and 90th percentile error (mm)."""
    return summarize_hits_errors(*localizer_hits_errors(net, samples, zoom, decoder, fine))


def summarize_hits_errors(hits: np.ndarray, err: np.ndarray) -> dict[str, float]:
    """Slice accuracy, median and 90th percentile error of :func:`localizer_hits_errors`."""
    return {
        "slice_acc": float(hits.mean()),
        "median_mm": float(np.median(err)),
        "p90_mm": float(np.quantile(err, 0.9)),
    }


# ----------------------------------------------------------------------------------- errors


def point_errors(
    study_id: int, pred: StudyPoints, true: StudyPoints, stacks: Mapping[str, Sequence[CachedStack]]
) -> list[dict]:
    """Per labelled point: 3D error (mm) and whether the predicted slice is the labelled one.

    The slice is judged in the series the condition is graded on (sagittal: the chosen stack;
    axial: the nearest stack and slice after projection).
    """
    rows = []
    for condition in CONDITIONS:
        desc = CONDITION_SERIES[condition]
        for level in LEVELS:
            t = true.get(condition, level)
            if t is None:
                continue
            p = pred.get(condition, level)
            row = {
                "study_id": study_id, "condition": condition, "level": level,
                "group": CONDITION_GROUP[condition], "error_mm": np.nan, "slice_ok": False,
            }  # fmt: skip
            if p is not None:
                row["error_mm"] = float(np.linalg.norm(p - t))
                row["slice_ok"] = _same_slice(p, t, stacks.get(desc, []), desc == AX_T2)
            rows.append(row)
    return rows


def _same_slice(p: np.ndarray, t: np.ndarray, stacks: Sequence[CachedStack], axial: bool) -> bool:
    if not stacks:
        return False
    if axial:
        return project_point(p, stacks)[:2] == project_point(t, stacks)[:2]
    zp, zt = stacks[0].patient_to_voxel(p)[0], stacks[0].patient_to_voxel(t)[0]
    return int(np.rint(zp)) == int(np.rint(zt))


def summarize_errors(rows) -> dict[str, dict[str, float]]:
    """Median and 90th percentile error (mm), slice accuracy and misses per point type."""
    import pandas as pd

    df = pd.DataFrame(rows)
    out: dict[str, dict[str, float]] = {}
    if df.empty:
        return out
    for group, g in df.groupby("group", sort=False):
        err = g["error_mm"].dropna()
        out[str(group)] = {
            "n": len(g),
            "median_mm": float(err.median()) if len(err) else float("nan"),
            "p90_mm": float(err.quantile(0.9)) if len(err) else float("nan"),
            "slice_acc": float(g["slice_ok"].mean()),
            "missed": int(g["error_mm"].isna().sum()),
        }
    return out
