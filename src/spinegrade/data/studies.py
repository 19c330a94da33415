"""Studies in memory: a study's chosen series, its cached stacks and its labelled points.

A study's series are chosen once (:func:`select_stacks`): per sagittal description the series
the coordinates were labelled on, else the one covering the spine best, and every stack of every
axial series (the projection picks the stack that passes through a level, so a second axial
series covering the upper discs is used, not wasted).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.localization.points import StudyPoints, true_points
from spinegrade.preprocessing.cache import CachedStack, load_stack, read_index
from spinegrade.task import AX_T2, RSNA_2024, SERIES_DESCRIPTIONS, Task
from spinegrade.util.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class StudyData:
    """One training study: chosen stacks, true points (patient space) and labels."""

    study_id: int
    stacks: dict[str, list[CachedStack]]
    points: StudyPoints
    labels: np.ndarray  # int64 (the task's columns,): grade index, -1 where the cell is empty
    # (series_id, stack) -> label maps on that stack's cached grid (data.label_maps), if drawn.
    label_maps: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)


def select_stacks(
    stacks: Sequence[CachedStack], labelled: Collection[int] = ()
) -> dict[str, list[CachedStack]]:
    """Description -> stacks to use, first = the one to read.

    Real studies can hold two sagittal T1 or T2 series (a repeat after motion, a truncated
    scout). Per sagittal description one series is kept: the one the coordinates were labelled
    on (``labelled`` series ids, in training), else the one that covers the lumbar spine best
    (:func:`series_coverage`). Axial series all stay (a second series often covers the upper
    discs), labelled ones first, then by cranio-caudal coverage.
    """
    labelled = {int(s) for s in labelled}
    out: dict[str, list[CachedStack]] = {}
    for desc in SERIES_DESCRIPTIONS:
        by_series: dict[int, list[CachedStack]] = {}
        for s in stacks:
            if s.description == desc:
                by_series.setdefault(int(s.series_id), []).append(s)
        if not by_series:
            continue

        def rank(sid: int, by_series=by_series) -> tuple:
            return (sid not in labelled, -series_coverage(by_series[sid]), sid)

        order = sorted(by_series, key=rank)
        if desc == AX_T2:
            out[desc] = [s for sid in order for s in by_series[sid]]
        else:
            out[desc] = sorted(by_series[order[0]], key=lambda s: -s.volume.shape[0])
    return out


def series_coverage(stacks: Sequence[CachedStack]) -> float:
    """Millimetres a series spans through its slices, summed over its stacks.

    Sagittal slices step left-right, so this is the width across the spine (foramina on both
    sides need it); axial slices step head-feet, so it is the cranio-caudal reach over the five
    discs. A truncated repeat spans less than the full series.
    """
    total = 0.0
    for s in stacks:
        d = len(s.positions)
        if d == 0:
            continue
        span = float(np.linalg.norm(s.positions[-1] - s.positions[0])) if d > 1 else 0.0
        total += span * d / max(d - 1, 1)  # + one slice gap: a single slice still covers some
    return total


def used_series(stacks: Mapping[str, Sequence[CachedStack]]) -> dict[str, list[int]]:
    """Description -> the series ids a study was read from, in the order they are used."""
    return {d: list(dict.fromkeys(int(s.series_id) for s in v)) for d, v in stacks.items() if v}


def load_studies(
    cache_dir: str | Path,
    study_ids: Sequence[int],
    labels: pd.DataFrame | None = None,
    coordinates: pd.DataFrame | None = None,
    split: str = "train",
    progress: bool = True,
    task: Task = RSNA_2024,
) -> dict[int, StudyData]:
    """Load the chosen stacks (and, for training, true points and labels) of ``study_ids``.

    ``coordinates`` are the rows of :func:`spinegrade.rsna.normalize_coordinates`. Studies
    with no usable cached stack are still returned (empty ``stacks``): they get prior predictions.
    """
    from spinegrade.rsna import label_matrix

    cache_dir = Path(cache_dir)
    index = read_index(cache_dir)
    index = index[(index["split"] == split) & (index["status"] == "ok")]
    paths = index.groupby("study_id")["path"].apply(list).to_dict()
    codes = {}
    if labels is not None:
        codes = dict(zip(labels["study_id"].astype(int), label_matrix(labels, task), strict=True))
    by_study = dict(iter(coordinates.groupby("study_id"))) if coordinates is not None else {}
    out: dict[int, StudyData] = {}
    for sid in progress_bar(
        study_ids, "loading studies", unit="study", enabled=progress, leave=False
    ):
        sid = int(sid)
        all_stacks = [load_stack(cache_dir / p) for p in paths.get(sid, [])]
        coords = by_study.get(sid)
        pts = true_points(coords, all_stacks) if coords is not None else StudyPoints()
        lab = codes.get(sid, np.full(len(task.columns), -1, dtype=np.int64))
        # Training reads the series the labels were drawn on; prediction the best-covering one.
        labelled = () if coords is None else coords["series_id"].astype(int).tolist()
        chosen = select_stacks(all_stacks, labelled)
        out[sid] = StudyData(sid, chosen, pts, np.asarray(lab, dtype=np.int64))
    missing = [s for s, d in out.items() if not d.stacks]
    if missing:
        # Asked for one study (prediction, study by study), the caller says it in its own words,
        # naming the study's input folder.
        (log.warning if len(out) > 1 else log.debug)(
            "%d studies have no cached stack (e.g. %s): they get prior predictions; check "
            "index.csv (status/reason) in %s",
            len(missing),
            missing[:5],
            cache_dir,
        )
    return out
