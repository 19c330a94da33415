"""The canonical sagittal frame: anterior left, head up, slices towards the patient's left.

Every sagittal stack is put in this frame before a network sees it, so the network never has to
learn a scanner's orientation conventions, and "left foramen" means "higher slice" in every input.
Network outputs go back through the same frame to cached voxels and then to patient coordinates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from spinegrade.preprocessing.cache import CachedStack
from spinegrade.task import LPS_HEAD, LPS_LEFT, LPS_POSTERIOR

# ------------------------------------------------------------------------------ canonical frame


@dataclass(frozen=True)
class SagittalFrame:
    """Cached voxel <-> canonical network input (anterior left, head up, slices to the left).

    The canonical volume is the cached one, optionally transposed in-plane and flipped per axis
    ("full-resolution canonical" coordinates), cut to at most ``n_slices`` slices from ``z0``,
    then the in-plane ``window`` (y0, x0, height, width in full-resolution canonical pixels; the
    whole image by default, zero outside it) is resized to ``size`` x ``size``.
    """

    depth: int  # cached D
    height: int  # cached H
    width: int  # cached W
    size: int
    transpose: bool
    flip_x: bool
    flip_y: bool
    flip_z: bool
    z0: int
    n_slices: int
    window: tuple[int, int, int, int] | None = None

    def inplane_hw(self) -> tuple[int, int]:
        """(H, W) of the full-resolution canonical image."""
        return (self.width, self.height) if self.transpose else (self.height, self.width)

    def field(self) -> tuple[int, int, int, int]:
        """The whole field of view as a square window (y0, x0, side, side), centred.

        Cached pixels are square in mm, so a square window keeps the anatomy's proportions when
        it is resized to ``size`` x ``size``: a 300 x 240 mm field is padded with zeros, not
        squeezed (a squeezed spine has discs closer together than any the network was shown).
        """
        h, w = self.inplane_hw()
        side = max(h, w)
        return ((h - side) // 2, (w - side) // 2, side, side)

    def view_window(self) -> tuple[int, int, int, int]:
        """The window the network sees: ``window``, or the whole (square) field."""
        return self.window or self.field()

    def to_full(self, z, y, x):
        """Cached voxel -> full-resolution canonical (z, y, x) (floats, vectorised)."""
        z, y, x = (np.asarray(v, dtype=np.float64) for v in (z, y, x))
        if self.transpose:
            y, x = x, y
        h, w = self.inplane_hw()
        y = h - 1 - y if self.flip_y else y
        x = w - 1 - x if self.flip_x else x
        z = self.depth - 1 - z if self.flip_z else z
        return z, y, x

    def from_full(self, z, y, x):
        """Inverse of :meth:`to_full`."""
        z, y, x = (np.asarray(v, dtype=np.float64) for v in (z, y, x))
        h, w = self.inplane_hw()
        z = self.depth - 1 - z if self.flip_z else z
        y = h - 1 - y if self.flip_y else y
        x = w - 1 - x if self.flip_x else x
        return (z, x, y) if self.transpose else (z, y, x)

    def full_to_input(self, z, y, x):
        """Full-resolution canonical -> network input (slice, pixel centre convention)."""
        y0, x0, lh, lw = self.view_window()
        return (
            np.asarray(z) - self.z0,
            (np.asarray(y) - y0 + 0.5) * self.size / lh - 0.5,
            (np.asarray(x) - x0 + 0.5) * self.size / lw - 0.5,
        )

    def input_to_full(self, z, y, x):
        """Network input -> full-resolution canonical."""
        y0, x0, lh, lw = self.view_window()
        return (
            np.asarray(z, dtype=np.float64) + self.z0,
            y0 + (np.asarray(y, dtype=np.float64) + 0.5) * lh / self.size - 0.5,
            x0 + (np.asarray(x, dtype=np.float64) + 0.5) * lw / self.size - 0.5,
        )

    def to_canonical(self, z, y, x):
        """Cached voxel -> network input (z, y, x)."""
        return self.full_to_input(*self.to_full(z, y, x))

    def to_cached(self, z, y, x):
        """Network input (z, y, x) -> cached voxel (inverse of :meth:`to_canonical`)."""
        return self.from_full(*self.input_to_full(z, y, x))

    def zoomed(self, cy: float, cx: float, frac: float) -> SagittalFrame:
        """The same frame looking at ``frac`` of the field of view centred on (cy, cx) (full res).

        A second, zoomed look doubles the in-plane resolution of the network at the same cost:
        the lumbar discs fill a small part of a sagittal field of view (~300 mm).
        """
        side = self.field()[2]
        lh = lw = max(8, round(frac * side))
        window = (round(cy - lh / 2), round(cx - lw / 2), lh, lw)
        return dataclasses.replace(self, window=window)


def sagittal_frame(stack: CachedStack, size: int, max_slices: int) -> SagittalFrame:
    """The canonical frame of a sagittal stack (see :class:`SagittalFrame`)."""
    d, h, w = stack.volume.shape
    # Columns should run posterior, rows towards the feet; pick the in-plane axis for each.
    transpose = abs(stack.row_dir @ LPS_POSTERIOR) < abs(stack.col_dir @ LPS_POSTERIOR)
    col_axis, row_axis = (
        (stack.col_dir, stack.row_dir) if transpose else (stack.row_dir, stack.col_dir)
    )
    n = min(d, max_slices)
    return SagittalFrame(
        depth=d, height=h, width=w, size=size, transpose=bool(transpose),
        flip_x=bool(col_axis @ LPS_POSTERIOR < 0), flip_y=bool(row_axis @ -LPS_HEAD < 0),
        flip_z=bool(stack.normal @ LPS_LEFT < 0), z0=(d - n) // 2, n_slices=n,
    )  # fmt: skip


def _oriented_cut(v: np.ndarray, frame: SagittalFrame) -> np.ndarray:
    """A cached-grid (D, H, W) array in the canonical orientation, cut to the frame's slices and
    window (zeros outside the image), before resizing."""
    v = v.transpose(0, 2, 1) if frame.transpose else v
    if frame.flip_z:
        v = v[::-1]
    if frame.flip_y:
        v = v[:, ::-1]
    if frame.flip_x:
        v = v[:, :, ::-1]
    v = v[frame.z0 : frame.z0 + frame.n_slices]
    window = frame.view_window()
    if window != (0, 0, *v.shape[1:]):
        v = _cut_window(v, window)
    return v


def canonical_labels(labels: np.ndarray, frame: SagittalFrame) -> np.ndarray:
    """Label maps (uint8 (D, H, W) on the cached grid) as the network sees the stack through
    ``frame``: uint8 (n_slices, size, size), each input pixel the class under its centre, and
    background (0) where the window leaves the image, as the image is black there."""
    v = _oriented_cut(labels, frame)
    lh, lw = v.shape[1:]
    rows = np.clip(((np.arange(frame.size) + 0.5) * lh / frame.size).astype(np.int64), 0, lh - 1)
    cols = np.clip(((np.arange(frame.size) + 0.5) * lw / frame.size).astype(np.int64), 0, lw - 1)
    return np.ascontiguousarray(v[:, rows[:, None], cols[None, :]])


def canonical_volume(stack: CachedStack, frame: SagittalFrame) -> np.ndarray:
    """The network input of a stack: float32 (n_slices, size, size) in [0, 1]."""
    v = _oriented_cut(stack.volume, frame)
    # A real copy: a flipped one-slice stack counts as contiguous to numpy (so ascontiguousarray
    # would keep its negative stride) but not to torch; the cached volume is read-only anyway.
    t = torch.from_numpy(np.array(v, dtype=np.float32))[None]
    if t.shape[-2:] != (frame.size, frame.size):
        t = F.interpolate(t, size=(frame.size, frame.size), mode="bilinear", antialias=True)
    return (t[0] / 255.0).clamp(0, 1).numpy()


def _cut_window(v: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
    """``v[:, y0:y0+lh, x0:x0+lw]`` with zeros where the window leaves the image."""
    y0, x0, lh, lw = window
    h, w = v.shape[1:]
    out = np.zeros((v.shape[0], lh, lw), dtype=v.dtype)
    ys, ye, xs, xe = max(y0, 0), min(y0 + lh, h), max(x0, 0), min(x0 + lw, w)
    if ys < ye and xs < xe:
        out[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = v[:, ys:ye, xs:xe]
    return out
