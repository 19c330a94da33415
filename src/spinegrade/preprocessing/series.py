"""One series' stack -> a cached volume: robust intensity window, in-plane grid, uint8."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from spinegrade.io.types import Stack
from spinegrade.preprocessing.cache import CachedStack

_MAX_PERCENTILE_SAMPLES = 1 << 16  # rank error of a 99.5th percentile ~0.03 percentile points


@dataclass(frozen=True)
class CacheParams:
    """What the cached pixels depend on; a study cached with other parameters is redone."""

    size: int = 256  # the longer in-plane side is at most this many pixels
    low_pct: float = 1.0
    high_pct: float = 99.5
    mm: float = 0.0  # finest in-plane spacing kept (mm a pixel); 0 = the native spacing

    @classmethod
    def from_config(cls, data) -> CacheParams:
        """The parameters a run's ``data`` config (:class:`spinegrade.config.DataConfig`) needs."""
        return cls(size=int(data.cache_size), mm=float(data.cache_mm))

    def settings(self) -> dict:
        """The manifest's settings, named as config keys (what a run compares against)."""
        return {
            "data.cache_size": self.size,
            "data.cache_mm": self.mm,
            "low_pct": self.low_pct,
            "high_pct": self.high_pct,
        }

    def grid(self, shape: tuple[int, int], spacing: tuple[float, float]) -> tuple[int, int]:
        """Cached (H, W) of a slice of ``shape`` pixels at ``spacing`` (dy, dx) mm.

        One square spacing for both axes: the native finest spacing, coarsened to ``mm`` and
        until the longer side fits ``size``; never finer than native (no upsampling).
        """
        (h0, w0), (dy0, dx0) = shape, (float(v) for v in spacing)
        step = max(min(dy0, dx0), self.mm, max(h0 * dy0, w0 * dx0) / self.size)
        return max(1, round(h0 * dy0 / step)), max(1, round(w0 * dx0 / step))


# ----------------------------------------------------------------------------- pixels


def resize_volume(volume: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize every slice of a float32 ``(D, H, W)`` volume to ``size`` (H, W; an int: square).

    PIL's bilinear resize widens its triangle filter by the reduction factor, so downsampling is
    antialiased (no aliasing of fine texture such as the disc annulus); it was the fastest good
    method measured here (torch ``interpolate(antialias=True)`` 1.5-2x slower, scipy zoom 5x).
    """
    d, h, w = volume.shape
    th, tw = (size, size) if isinstance(size, int) else size
    if (h, w) == (th, tw):
        return np.ascontiguousarray(volume, dtype=np.float32)
    out = np.empty((d, th, tw), dtype=np.float32)
    for i in range(d):
        img = Image.fromarray(np.ascontiguousarray(volume[i], dtype=np.float32), mode="F")
        out[i] = np.asarray(img.resize((tw, th), Image.Resampling.BILINEAR))
    return out


def robust_range(volumes: Sequence[np.ndarray], low: float, high: float) -> tuple[float, float]:
    """Low and high percentiles of all voxels of a series, from a regular in-plane subsample.

    Taken on the resized volumes (what is stored, and 2-4x fewer voxels to look at); one window
    for all stacks of a series keeps their intensities comparable.
    """
    total = sum(v.size for v in volumes)
    step = max(1, int(np.ceil(np.sqrt(total / _MAX_PERCENTILE_SAMPLES))))
    sample = np.concatenate([v[:, ::step, ::step].ravel() for v in volumes])
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(sample, [low, high])
    return float(lo), float(hi)


def to_uint8(volume: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto 0..255 (clipped, rounded); a constant image gives zeros."""
    if not hi > lo:
        return np.zeros(volume.shape, dtype=np.uint8)
    v = (volume - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    # fmax/fmin rather than clip: they also send NaN to 0 (and infinities to the ends).
    np.fmax(v, 0.0, out=v)
    np.fmin(v, 255.0, out=v)
    v += 0.5  # round half up: values are non-negative here
    return v.astype(np.uint8)


def cache_geometry(
    stack: Stack, size: int | tuple[int, int]
) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Positions of cached voxel (z, 0, 0), cached (dy, dx) spacing and original (rows, cols).

    The resize maps pixel edges onto pixel edges, so cached pixel ``x'`` has its centre at
    original ``x = (x' + 0.5) * W0 / W - 0.5``: voxel (0, 0) lies half a cached pixel minus half
    an original pixel inside the original (0, 0) centre given by ImagePositionPatient.
    """
    h0, w0 = stack.pixels.shape[1:]
    dy0, dx0 = (float(v) for v in stack.pixel_spacing)
    h, w = (size, size) if isinstance(size, int) else size
    sy, sx = h0 / h, w0 / w  # original pixels per cached pixel
    offset = (0.5 * sx - 0.5) * dx0 * np.asarray(stack.row_dir) + (0.5 * sy - 0.5) * dy0 * (
        np.asarray(stack.col_dir)
    )
    positions = np.asarray(stack.positions, dtype=np.float64) + offset
    return positions, (dy0 * sy, dx0 * sx), (int(h0), int(w0))


def cache_series(
    stacks: Sequence[Stack], params: CacheParams, study_id: int, series_id: int, description: str
) -> list[CachedStack]:
    """Turn the stacks of one series into cached stacks; the intensity window is per series."""
    grids = [params.grid(s.pixels.shape[1:], s.pixel_spacing) for s in stacks]
    resized = [resize_volume(s.pixels, g) for s, g in zip(stacks, grids, strict=True)]
    lo, hi = robust_range(resized, params.low_pct, params.high_pct)
    out = []
    for k, (stack, vol) in enumerate(zip(stacks, resized, strict=True)):
        positions, spacing, orig_shape = cache_geometry(stack, grids[k])
        out.append(
            CachedStack(
                volume=to_uint8(vol, lo, hi),
                positions=positions,
                row_dir=np.asarray(stack.row_dir, dtype=np.float64),
                col_dir=np.asarray(stack.col_dir, dtype=np.float64),
                spacing=spacing,
                orig_shape=orig_shape,
                instance_numbers=np.asarray(stack.instance_numbers, dtype=np.int64),
                study_id=int(study_id),
                series_id=int(series_id),
                stack=k,
                description=description or stack.series_description,
                plane=stack.plane,
                direction=stack.direction,
                has_geometry=bool(getattr(stack, "has_geometry", True)),
            )
        )
    return out
