"""A study's points in patient space (LPS mm), per target and level, and the labelled ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from spinegrade.preprocessing.cache import CachedStack, find_stack
from spinegrade.task import ANCHORS, CONDITIONS, LEVELS

# ----------------------------------------------------------------------------------- points


@dataclass
class StudyPoints:
    """One 3D point (LPS mm) per condition and level; NaN where unknown.

    ``xyz[i, j]`` is the point of ``CONDITIONS[i]`` at ``LEVELS[j]``: the disc centre in the canal
    for spinal stenosis, the foramen for foraminal narrowing, the recess for subarticular stenosis.
    ``disc[j]`` is the centre of the disc itself (in front of the canal point): labelled in
    imported real sets (SPIDER), derived from the canal point otherwise (``derive_points``).
    """

    xyz: np.ndarray = field(
        default_factory=lambda: np.full((len(CONDITIONS), len(LEVELS), 3), np.nan)
    )
    disc: np.ndarray = field(default_factory=lambda: np.full((len(LEVELS), 3), np.nan))

    def get(self, condition: str, level: str) -> np.ndarray | None:
        """The point, or None when it is unknown."""
        p = self.xyz[CONDITIONS.index(condition), LEVELS.index(level)]
        return None if np.isnan(p).any() else p

    def set(self, condition: str, level: str, point: Sequence[float] | np.ndarray) -> None:
        self.xyz[CONDITIONS.index(condition), LEVELS.index(level)] = np.asarray(point, float)

    def anchor(self, anchor: str, level: str) -> np.ndarray | None:
        """The point a crop is centred on (``task.ANCHORS``: a condition's point or the disc
        centre), or None when it is unknown."""
        if anchor == ANCHORS[-1]:
            return self.get_disc(level)
        return self.get(CONDITIONS[ANCHORS.index(anchor)], level)

    def get_disc(self, level: str) -> np.ndarray | None:
        """The disc centre, or None when it is unknown."""
        p = self.disc[LEVELS.index(level)]
        return None if np.isnan(p).any() else p

    def copy(self) -> StudyPoints:
        return StudyPoints(self.xyz.copy(), self.disc.copy())


def true_points(coords: pd.DataFrame, stacks: Sequence[CachedStack]) -> StudyPoints:
    """Label points of one study (coordinates in package vocabulary) -> patient-space points.

    ``coords`` are the study's rows of :func:`spinegrade.rsna.normalize_coordinates`;
    ``stacks`` all cached stacks of the study. A label whose series or instance is not in the
    cache is skipped (the point stays NaN): training then derives or skips that target.
    """
    points = StudyPoints()
    for row in coords.itertuples(index=False):
        if points.get(row.condition, row.level) is not None:
            continue  # a cell labelled on two series: the first label wins
        try:
            stack = find_stack(stacks, int(row.series_id), int(row.instance_number))
        except KeyError:
            continue
        points.set(
            row.condition, row.level, stack.label_to_patient(row.instance_number, row.x, row.y)
        )
    return points


def add_disc_points(
    points: StudyPoints, discs: pd.DataFrame, stacks: Sequence[CachedStack]
) -> StudyPoints:
    """``points`` with the labelled disc centres of one study (rows: series_id, instance_number,
    level in package vocabulary, x, y) mapped to patient space; unknown series are skipped."""
    out = points.copy()
    for row in discs.itertuples(index=False):
        try:
            stack = find_stack(stacks, int(row.series_id), int(row.instance_number))
        except KeyError:
            continue
        xyz = stack.label_to_patient(row.instance_number, row.x, row.y)
        out.disc[LEVELS.index(row.level)] = xyz
    return out


# The targets of a point table (oof_points.csv): a short name per StudyPoints row, then the disc.
POINT_TARGETS: dict[str, str] = {
    CONDITIONS[0]: "canal",
    CONDITIONS[1]: "left_foramen",
    CONDITIONS[2]: "right_foramen",
    CONDITIONS[3]: "left_recess",
    CONDITIONS[4]: "right_recess",
}
DISC_TARGET = "disc_centre"
POINT_COLUMNS: tuple[str, ...] = ("study_id", "level", "target", "x_mm", "y_mm", "z_mm")


def point_rows(study_id: int, points: StudyPoints) -> list[dict]:
    """One row per located point of a study (LPS mm), level-major; unknown points are left out."""
    rows = []
    for j, level in enumerate(LEVELS):
        found = [(POINT_TARGETS[c], points.xyz[i, j]) for i, c in enumerate(CONDITIONS)]
        for target, p in [*found, (DISC_TARGET, points.disc[j])]:
            if np.isfinite(p).all():
                values = (study_id, level, target, *map(float, p))
                rows.append(dict(zip(POINT_COLUMNS, values, strict=True)))
    return rows
