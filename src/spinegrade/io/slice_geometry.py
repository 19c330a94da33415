"""Slice-stack geometry shared by the reader's stacks and the cached stacks."""

from __future__ import annotations

import numpy as np


class SliceGeometry:
    """Mixin for a stack of parallel slices with ``positions`` (D, 3), ``row_dir`` and ``col_dir``.

    The slice normal is ``cross(row_dir, col_dir)``; stacks keep their slices ordered along it, so
    the projections of ImagePositionPatient on it increase with the slice index.
    """

    positions: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal, ``cross(row_dir, col_dir)``; slices are ordered along it."""
        n = np.cross(self.row_dir, self.col_dir)
        return n / np.linalg.norm(n)

    @property
    def slice_positions(self) -> np.ndarray:
        """Position of every slice along the normal (mm), increasing."""
        return self.positions @ self.normal

    @property
    def slice_spacing(self) -> float:
        """Median distance between neighbouring slices along the normal (mm); 0 for one slice."""
        s = self.slice_positions
        return float(np.median(np.diff(s))) if len(s) > 1 else 0.0
