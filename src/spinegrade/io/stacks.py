"""Turn decoded slices of one series into :class:`~spinegrade.io.types.Stack` objects.

Grouping order: orientation -> majority shape -> pixel spacing -> position along the normal
(repeats and large gaps split) -> contiguous stacks. The slices are planned first (which slices,
in which order, on which axes); :func:`build_stacks` then casts each slice to float32 once, into
its place, with RescaleSlope/Intercept applied and MONOCHROME1 inverted.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinegrade.io.geometry import (
    cluster_orientations,
    contiguous_runs,
    direction_name,
    level_ids,
    orthonormal_axes,
    plane_name,
    rank_within_levels,
    same_position_tolerance,
)
from spinegrade.io.pixels import assemble
from spinegrade.io.types import SkippedFile, Stack

logger = logging.getLogger("spinegrade.io.dicom")
# What a series read without patient geometry means for the user, and what to do about it.
NO_GEOMETRY_NOTE = (
    "no patient geometry (ImagePositionPatient, ImageOrientationPatient or PixelSpacing "
    "missing): slices in InstanceNumber order on a nominal 1 mm grid, points cannot be mapped "
    "to other series; re-export the series with its geometry"
)


@dataclass
class SliceRecord:
    """One decoded frame with the header values the stacks need (stored values, no rescale)."""

    path: Path
    frame: int  # 0-based frame within the file
    pixels: np.ndarray  # (H, W) stored values, native dtype (often a read-only view)
    position: np.ndarray | None  # ImagePositionPatient (3,)
    row: np.ndarray | None  # first ImageOrientationPatient triplet
    col: np.ndarray | None  # second triplet
    spacing: tuple[float, float] | None  # PixelSpacing (row, col)
    instance: int  # InstanceNumber, -1 when absent
    slope: float
    intercept: float
    invert_sum: float | None  # MONOCHROME1: stored value v shows as (invert_sum - v)
    description: str
    series_uid: str
    step: float | None  # SpacingBetweenSlices or SliceThickness: used only without geometry
    name_key: tuple = ()  # natural sort key of the file name (tie-breaker)

    @property
    def has_geometry(self) -> bool:
        return self.position is not None and self.row is not None and self.spacing is not None

    @property
    def tie_key(self) -> tuple:
        """Order among slices at the same place: InstanceNumber, then file name, then frame."""
        return (self.instance, self.name_key, self.frame)


def skip_unique(
    skipped: list[SkippedFile], paths: Sequence[Path], reason: str, folder: Path
) -> None:
    """Record each file once (a multi-frame file has many slices) and log it."""
    for path in dict.fromkeys(paths):
        skipped.append(SkippedFile(path, reason))
        logger.warning("%s: skipped %s: %s", folder, path.name, reason)


@dataclass
class StackPlan:
    """The slices of one future stack, in geometric order, with its axes."""

    members: list[SliceRecord]
    row: np.ndarray
    col: np.ndarray
    positions: np.ndarray | None = None  # nominal positions when the files carry none
    spacing: tuple[float, float] | None = None
    has_geometry: bool = True


def plan_with_geometry(
    slices: list[SliceRecord],
    skipped: list[SkippedFile],
    folder: Path,
    gap_factor: float,
    angle_tol_deg: float,
) -> list[StackPlan]:
    """Stacks of slices that all carry ImagePositionPatient/Orientation and PixelSpacing."""
    rows = np.array([s.row for s in slices])
    cols = np.array([s.col for s in slices])
    labels = cluster_orientations(rows, cols, angle_tol_deg)
    plans: list[StackPlan] = []
    for lab in range(int(labels.max()) + 1):
        members = [slices[i] for i in np.flatnonzero(labels == lab)]
        members = keep_majority_shape(members, skipped, folder)
        # One stack has one pixel grid: slices with another PixelSpacing form their own groups.
        by_spacing: dict[tuple[float, ...], list[SliceRecord]] = {}
        for s in members:
            key = tuple(round(v, 4) for v in s.spacing)  # type: ignore[union-attr]
            by_spacing.setdefault(key, []).append(s)
        for group in by_spacing.values():
            if _one_position(group, skipped, folder):
                continue
            plans.extend(_split_group(group, gap_factor))
    return plans


def _one_position(group: list[SliceRecord], skipped: list[SkippedFile], folder: Path) -> bool:
    """Skip (and say so) a group of several slices that all lie at one place along the normal.

    That is a header that copied one ImagePositionPatient into every file: the slice order is
    then unknowable and the stack would have no thickness.
    """
    if len(group) < 2:
        return False
    normal = np.cross(group[0].row, group[0].col)  # type: ignore[arg-type]
    d = np.array([s.position @ normal for s in group])  # type: ignore[operator]
    if float(d.max() - d.min()) > 1e-3:
        return False
    pos = ", ".join(f"{v:g}" for v in group[0].position)  # type: ignore[union-attr]
    reason = (
        f"all {len(group)} slices of this plane lie at one position (ImagePositionPatient "
        f"{pos}): their order is unknown; re-export the series with each slice's position"
    )
    skip_unique(skipped, [s.path for s in group], reason, folder)
    return True


def keep_majority_shape(
    members: list[SliceRecord], skipped: list[SkippedFile], folder: Path
) -> list[SliceRecord]:
    """Keep the most common (rows, columns) of a group; skip the other slices with the reason."""
    counts = Counter(s.pixels.shape for s in members)
    if len(counts) == 1:
        return members
    keep = max(counts, key=lambda shp: (counts[shp], shp[0] * shp[1]))
    for shape in counts:
        if shape != keep:
            reason = (
                f"shape {shape[0]}x{shape[1]} differs from the {keep[0]}x{keep[1]} of the other "
                f"{counts[keep]} slice(s) of this orientation"
            )
            paths = [s.path for s in members if s.pixels.shape == shape]
            skip_unique(skipped, paths, reason, folder)
    return [s for s in members if s.pixels.shape == keep]


def _split_group(group: list[SliceRecord], gap_factor: float) -> list[StackPlan]:
    """Order one orientation/shape/spacing group along its normal and cut it into stacks."""
    row, col = orthonormal_axes(
        np.mean([s.row for s in group], axis=0), np.mean([s.col for s in group], axis=0)
    )
    normal = np.cross(row, col)
    pos = np.array([s.position for s in group])
    d = pos @ normal
    order = np.argsort(d, kind="stable")
    levels = level_ids(d[order], same_position_tolerance(d[order]))
    # Within one position the earlier acquisition (lower InstanceNumber) comes first; the
    # level sequence is unchanged by this re-sort, so ``levels`` still lines up with ``order``.
    order = _order_by_level(order, levels, group)
    ranks = rank_within_levels(levels)
    inplane = pos - np.outer(d, normal)
    # A sideways jump of more than ~2 pixels (at least 1 mm) is another, shifted stack.
    tol = max(1.0, 2.0 * max(group[0].spacing))  # type: ignore[arg-type]
    plans = []
    for k in range(int(ranks.max()) + 1):
        idx = order[ranks == k]
        for run in contiguous_runs(d[idx], inplane[idx], gap_factor, tol):
            plans.append(StackPlan([group[i] for i in idx[run]], row, col))
    return plans


def _order_by_level(order: np.ndarray, levels: np.ndarray, group: list[SliceRecord]) -> np.ndarray:
    """Re-sort slices (already sorted along the normal) by (position level, tie key)."""
    keyed = sorted(range(len(order)), key=lambda j: (levels[j], group[order[j]].tie_key))
    return order[np.array(keyed, dtype=np.int64)]


def plan_without_geometry(
    slices: list[SliceRecord], skipped: list[SkippedFile], folder: Path
) -> StackPlan:
    """One stack in InstanceNumber/file/frame order on a nominal grid, for files with no geometry.

    Without ImagePositionPatient the true slice order is unknowable; the acquisition numbering is
    the best guess, and ``has_geometry=False`` tells later stages not to trust patient coordinates.
    """
    logger.warning("%s: %s", folder, NO_GEOMETRY_NOTE)
    members = sorted(keep_majority_shape(slices, skipped, folder), key=lambda s: s.tie_key)
    first = members[0]
    oriented = all(s.row is not None for s in members)
    row, col = (
        orthonormal_axes(first.row, first.col)  # type: ignore[arg-type]
        if oriented
        else (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]))
    )
    step = first.step or 1.0  # header_values keeps only a positive, finite step
    origin = first.position if first.position is not None else np.zeros(3)
    positions = origin + np.outer(np.arange(len(members)) * step, np.cross(row, col))
    spacing = first.spacing or (1.0, 1.0)
    return StackPlan(members, row, col, positions, spacing, has_geometry=False)


def build_stacks(plans: list[StackPlan]) -> list[Stack]:
    """Materialise the plans (float32 pixels, rescaled), stacks in acquisition order."""
    stacks = [_build_stack(plan) for plan in plans]
    # Acquisition order: a multi-stack axial series lists its stacks disc by disc.
    stacks.sort(key=lambda st: (int(st.instance_numbers.min()), float(st.slice_positions[0])))
    return stacks


def _build_stack(plan: StackPlan) -> Stack:
    members = plan.members
    pixels = assemble(
        [s.pixels for s in members],
        [s.slope for s in members],
        [s.intercept for s in members],
        [s.invert_sum for s in members],
    )
    normal = np.cross(plan.row, plan.col)
    positions = plan.positions
    return Stack(
        pixels=pixels,
        positions=positions if positions is not None else np.array([s.position for s in members]),
        row_dir=plan.row,
        col_dir=plan.col,
        pixel_spacing=plan.spacing or members[0].spacing,  # type: ignore[arg-type]
        instance_numbers=np.array([s.instance for s in members], dtype=np.int64),
        files=[s.path for s in members],
        plane=plane_name(normal),
        direction=direction_name(normal),
        series_description=Counter(s.description for s in members).most_common(1)[0][0],
        frame_indices=np.array([s.frame for s in members], dtype=np.int64),
        has_geometry=plan.has_geometry,
    )
