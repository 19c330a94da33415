"""Stage 2 input: per level (and side) a short stack of slices cut around a 3D point.

Points live in patient space (DICOM LPS mm), so a level found on one series can be cut from any
other series of the study: the spinal canal from the sagittal T2, the foramina from the sagittal T1
and the subarticular recesses from whichever axial stack passes closest to the level.

Every crop is resampled to a fixed physical field of view (mm) in a canonical orientation, so the
grader always sees the same anatomy the same way up, whatever the scanner's pixel spacing or
ImageOrientationPatient:

* sagittal crops: columns run anterior -> posterior (+Y), rows head -> feet (-Z), slices run
  medial -> lateral for the foramina (towards the side being graded), left-going for the canal;
* axial crops: columns run towards the graded side (lateral), rows anterior -> posterior (+Y).

Mirroring the right side onto the left orientation makes "side" disappear from the image, so one
foraminal and one subarticular model learn from both sides (twice the data); the side labels swap
exactly as a left/right flip demands.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from spinegrade.config import CropConfig
from spinegrade.localization.points import StudyPoints
from spinegrade.preprocessing.cache import CachedStack, project_point
from spinegrade.task import AX_T2, LPS_HEAD, LPS_LEFT, LPS_POSTERIOR, RSNA_2024, Task

# ------------------------------------------------------------------------------ crop geometry


@dataclass(frozen=True)
class CropView:
    """Which series a condition is graded on and how its crop is oriented (LPS directions)."""

    description: str
    field_mm: float
    want_x: np.ndarray  # patient direction of increasing crop column
    want_y: np.ndarray  # patient direction of increasing crop row
    want_slice: np.ndarray  # patient direction of increasing crop slice


def crop_view(condition: str, cfg: CropConfig, task: Task = RSNA_2024) -> CropView:
    """The canonical view of ``condition`` of ``task`` (see module doc); right sides are mirrored.

    The field of view follows the anchor: the canal gets ``spinal_mm``, the disc centre
    ``disc_mm`` (unset: ``spinal_mm``), a foramen ``foraminal_mm``, a recess ``subarticular_mm``.
    """
    c = task.condition(condition)
    side = -1.0 if c.side == "right" else 1.0
    if c.anchor.endswith("recess"):
        field_mm = cfg.subarticular_mm
    elif c.anchor.endswith("foramen"):
        field_mm = cfg.foraminal_mm
    elif c.anchor == "disc_centre" and cfg.disc_mm is not None:
        field_mm = cfg.disc_mm
    else:
        field_mm = cfg.spinal_mm
    if c.view == "axial":  # lateral to the right of the image, posterior down
        return CropView(c.series, field_mm, side * LPS_LEFT, LPS_POSTERIOR, LPS_HEAD)
    # Sagittal: standard display (anterior left, head up); slices go lateral on the graded side.
    return CropView(c.series, field_mm, LPS_POSTERIOR, -LPS_HEAD, side * LPS_LEFT)


def _inplane_axes(stack: CachedStack, want_x: np.ndarray, want_y: np.ndarray):
    """Pixel steps ``(dy, dx)`` per mm along the crop's x and y directions.

    The crop axes follow the stack's own row/column directions (no resampling across an oblique
    slice), signed and swapped to match the wanted patient directions as closely as possible.
    """
    dy, dx = stack.spacing
    axes = {
        "x": (stack.row_dir, np.array([0.0, 1.0 / dx])),
        "y": (stack.col_dir, np.array([1.0 / dy, 0.0])),
    }
    dots = {k: (float(v @ want_x), float(v @ want_y)) for k, (v, _) in axes.items()}
    along_x = "x" if abs(dots["x"][0]) >= abs(dots["y"][0]) else "y"
    along_y = "y" if along_x == "x" else "x"
    ex = axes[along_x][1] * (1.0 if dots[along_x][0] >= 0 else -1.0)
    ey = axes[along_y][1] * (1.0 if dots[along_y][1] >= 0 else -1.0)
    return ex, ey


@dataclass(frozen=True)
class Jitter:
    """A random perturbation of one training crop (stage-1 errors, scanner variation)."""

    dz: int = 0  # slices
    shift_mm: tuple[float, float] = (0.0, 0.0)  # along the crop's (x, y)
    scale: float = 1.0  # >1 zooms out
    angle_deg: float = 0.0  # in-plane rotation


def sample_jitter(cfg: CropConfig, field_mm: float, rng: np.random.Generator) -> Jitter:
    """Random shifts (in-plane and +-slices), zoom and rotation from the crop config."""
    shift = rng.uniform(-1.0, 1.0, size=2) * cfg.shift_frac * field_mm
    return Jitter(
        dz=int(rng.integers(-cfg.slice_jitter, cfg.slice_jitter + 1)),
        shift_mm=(float(shift[0]), float(shift[1])),
        scale=float(np.exp(rng.uniform(-1.0, 1.0) * np.log1p(cfg.scale_jitter))),
        angle_deg=float(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)),
    )


def point_in_stack(stack: CachedStack, point: np.ndarray, margin: float = 0.5) -> bool:
    """Whether ``point`` lies within the stack's slab (``margin`` slices) and in-plane field."""
    z, y, x = (float(v) for v in stack.patient_to_voxel(point))
    d, h, w = stack.volume.shape
    return -margin <= z <= d - 1 + margin and 0 <= y <= h - 1 and 0 <= x <= w - 1


def extract_crop(
    stack: CachedStack,
    center: np.ndarray,
    view: CropView,
    *,
    size: int,
    n_slices: int,
    slice_step: int = 1,
    jitter: Jitter | None = None,
) -> np.ndarray:
    """Cut ``n_slices`` x ``size`` x ``size`` around ``center`` (LPS) in the canonical view.

    The centre slice is the stack's slice nearest to ``center`` (clamped into the slab); slices
    beyond the stack, and pixels beyond the image, are zero. Values are the cached
    intensities scaled to [0, 1] (float32).
    """
    jitter = jitter or Jitter()
    zc, yc, xc = (float(v) for v in stack.patient_to_voxel(center))
    ex, ey = _inplane_axes(stack, view.want_x, view.want_y)
    sign = 1 if float(stack.normal @ view.want_slice) >= 0 else -1
    mm_per_px = view.field_mm * jitter.scale / size
    g = (np.arange(size) - (size - 1) / 2.0) * mm_per_px
    gx, gy = np.meshgrid(g, g, indexing="xy")  # gx varies along columns, gy along rows
    a = np.deg2rad(jitter.angle_deg)
    rx = np.cos(a) * gx - np.sin(a) * gy + jitter.shift_mm[0]
    ry = np.sin(a) * gx + np.cos(a) * gy + jitter.shift_mm[1]
    rows = yc + rx * ex[0] + ry * ey[0]
    cols = xc + rx * ex[1] + ry * ey[1]
    out = np.zeros((n_slices, size, size), dtype=np.float32)
    depth = stack.volume.shape[0]
    # A point projected onto an axial stack may lie a few mm beyond its slab (the stacks are
    # angled per disc and cover ~3 slices): centre on the nearest slice the stack has, so the
    # crop shows the level instead of a block of zeros.
    z0 = int(np.clip(np.rint(zc), 0, depth - 1)) + sign * jitter.dz
    for k in range(n_slices):
        z = z0 + sign * (k - n_slices // 2) * slice_step
        if 0 <= z < depth:
            ndimage.map_coordinates(
                stack.volume[z], [rows, cols], order=1, cval=0.0, output=out[k], prefilter=False
            )
    out *= 1.0 / 255.0
    return out


def normalize_crop(crop: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per crop: MRI intensities have no absolute scale across scanners."""
    mean, std = float(crop.mean()), float(crop.std())
    return ((crop - mean) / max(std, 1e-3)).astype(np.float32)


# ------------------------------------------------------------------------------- study crops


def locate_in_series(
    stacks: Mapping[str, Sequence[CachedStack]],
    description: str,
    point: np.ndarray,
    max_distance_mm: float,
) -> CachedStack | None:
    """The stack of ``description`` to cut ``point`` from, or None when none shows it.

    Axial series hold several stacks (angled per disc): the nearest slice plane among stacks whose
    footprint contains the point wins. Sagittal stacks must contain the point.
    """
    candidates = list(stacks.get(description, []))
    if not candidates:
        return None
    if description == AX_T2:
        idx, _, _, _, dist = project_point(point, candidates)
        return candidates[idx] if dist <= max_distance_mm else None
    inside = [s for s in candidates if point_in_stack(s, point)]
    return inside[0] if inside else None


def make_crops(
    stacks: Mapping[str, Sequence[CachedStack]],
    points: StudyPoints,
    cfg: CropConfig,
    columns: Sequence[str] | None = None,
    rng: np.random.Generator | None = None,
    task: Task = RSNA_2024,
) -> dict[str, np.ndarray]:
    """Normalised crops ``(S, size, size)`` by label column, for the columns that can be cut.

    A column is absent when its point is unknown or no series of the right type shows it; the
    caller then predicts the training prior for it. ``rng`` enables training jitter.
    """
    out: dict[str, np.ndarray] = {}
    for column in task.columns if columns is None else columns:
        condition, level = task.column_condition(column), task.column_level(column)
        point = points.anchor(condition.anchor, level)
        if point is None:
            continue
        view = crop_view(condition.name, cfg, task)
        stack = locate_in_series(stacks, view.description, point, cfg.max_project_mm)
        if stack is None:
            continue
        jitter = sample_jitter(cfg, view.field_mm, rng) if rng is not None else None
        crop = extract_crop(
            stack, point, view, size=cfg.size, n_slices=cfg.slices, slice_step=cfg.slice_step,
            jitter=jitter,
        )  # fmt: skip
        out[column] = normalize_crop(crop)
    return out
