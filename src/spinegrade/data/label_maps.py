"""Label maps on a cached stack's grid, for training the localiser's segmentation head.

The maps' layout and checks are :mod:`spinegrade.rsna.label_maps`. The cache resizes each slice
in-plane only, so a cached pixel takes the class of the source pixel under its centre;
:data:`UNKNOWN` marks slices without a map, which the loss ignores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spinegrade.preprocessing.cache import CachedStack
from spinegrade.rsna.label_maps import LABEL_MAPS_DIR, read_png

UNKNOWN = 255  # a cached pixel whose slice has no map: ignored by the loss


def stack_labels(data_dir: str | Path, stack: CachedStack) -> np.ndarray | None:
    """The label maps of one cached stack on its cached grid: uint8 (D, H, W), :data:`UNKNOWN`
    on slices without a map; None when none of its slices has one."""
    folder = Path(data_dir) / LABEL_MAPS_DIR / str(stack.study_id) / str(stack.series_id)
    if not folder.is_dir():
        return None
    d, h, w = stack.volume.shape
    h0, w0 = stack.orig_shape
    # The source pixel under each cached pixel's centre (the cache only resizes in-plane).
    xs, ys = stack.cached_to_orig_xy(np.arange(w), np.arange(h))
    cols = np.clip(np.rint(xs), 0, w0 - 1).astype(np.int64)
    rows = np.clip(np.rint(ys), 0, h0 - 1).astype(np.int64)
    out = np.full((d, h, w), UNKNOWN, dtype=np.uint8)
    found = False
    for i, number in enumerate(stack.instance_numbers.tolist()):
        path = folder / f"{int(number)}.png"
        if path.is_file():
            out[i] = read_png(path, (h0, w0))[rows[:, None], cols[None, :]]
            found = True
    return out if found else None
