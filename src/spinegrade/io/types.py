"""Plain data returned by the DICOM reader: stacks of slices with their patient-space geometry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spinegrade.io.slice_geometry import SliceGeometry


@dataclass
class Stack(SliceGeometry):
    """One geometrically consistent stack of parallel slices, ordered along the slice normal.

    Patient coordinates are DICOM LPS millimetres. ``row_dir`` is the direction of increasing
    column index (the first ImageOrientationPatient triplet), ``col_dir`` the direction of
    increasing row index (the second triplet), ``normal = cross(row_dir, col_dir)``. Slices are
    sorted so that ``positions @ normal`` increases.
    """

    pixels: np.ndarray  # float32, (D, H, W), RescaleSlope/Intercept applied, MONOCHROME1 inverted
    positions: (
        np.ndarray
    )  # float64, (D, 3): ImagePositionPatient of every slice (centre of pixel 0,0)
    row_dir: np.ndarray  # float64, (3,)
    col_dir: np.ndarray  # float64, (3,)
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) in mm, i.e. (dy, dx)
    instance_numbers: np.ndarray  # int64, (D,), in geometric order
    files: list[Path]  # source file of every slice, in geometric order
    plane: str  # "sagittal" | "axial" | "coronal" (from the normal's dominant LPS axis)
    direction: str  # where increasing slice index runs in the patient, e.g. "R->L", "F->H"
    series_description: str = ""
    # 0-based frame of every slice within its file (0 for single-frame files; enhanced multi-frame
    # files give one slice per frame, so ``files`` repeats and this tells the frames apart).
    frame_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # False when the files carry no patient geometry (no ImagePositionPatient/Orientation or
    # PixelSpacing): slices are then in InstanceNumber/frame order on a nominal grid, and points
    # cannot be mapped to other series.
    has_geometry: bool = True

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]


@dataclass
class SkippedFile:
    path: Path
    reason: str


@dataclass
class SeriesRead:
    """Everything read from one series folder."""

    folder: Path
    stacks: list[Stack]
    skipped: list[SkippedFile] = field(default_factory=list)
    series_instance_uid: str = ""
