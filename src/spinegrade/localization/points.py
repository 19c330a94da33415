"""A study's points in patient space (LPS mm), per target and level, and the labelled ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from spinegrade.preprocessing.cache import CachedStack, find_stack
from spinegrade.task import CONDITIONS, LEVELS

# ----------------------------------------------------------------------------------- points


@dataclass
class StudyPoints:
    """One 3D point (LPS mm) per condition and level; NaN where unknown.

    ``xyz[i, j]`` is the point of ``CONDITIONS[i]`` at ``LEVELS[j]``: the disc centre in the canal
    for spinal stenosis, the foramen for foraminal narrowing, the recess for subarticular stenosis.
    """

    xyz: np.ndarray = field(
        default_factory=lambda: np.full((len(CONDITIONS), len(LEVELS), 3), np.nan)
    )

    def get(self, condition: str, level: str) -> np.ndarray | None:
        """The point, or None when it is unknown."""
        p = self.xyz[CONDITIONS.index(condition), LEVELS.index(level)]
        return None if np.isnan(p).any() else p

    def set(self, condition: str, level: str, point: Sequence[float] | np.ndarray) -> None:
        self.xyz[CONDITIONS.index(condition), LEVELS.index(level)] = np.asarray(point, float)

    def copy(self) -> StudyPoints:
        return StudyPoints(self.xyz.copy())


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
