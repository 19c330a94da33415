"""The label maps of a training folder: disc, vertebra and canal drawn on each slice of a series.

A real set may come with a label map per slice (SPIDER's segmentations, a hospital's own), in
``train_label_maps/<study_id>/<series_id>/<InstanceNumber>.png``: 8-bit PNGs on the slice's own
pixel grid, one class per value as :data:`LABEL_CLASSES` numbers them, and a ``label_maps.json``
at the folder's root naming those classes. The localiser learns them beside its points
(``localizer.seg_weight``): five clicked points a spine teach little of what a disc looks like,
a drawn disc, vertebra and canal on every slice teach much more, and where the lowest vertebra
ends (the sacrum is not drawn as a vertebra) is what names L5/S1.

This module is the layout's contract (the files, their classes, their checks);
:mod:`spinegrade.data.label_maps` reads them onto a cached stack's grid for training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from spinegrade.task import LABEL_CLASSES

LABEL_MAPS_DIR = "train_label_maps"
LABEL_MAPS_FILE = "label_maps.json"


class LabelMapError(ValueError):
    """A training folder's label maps are not as :mod:`spinegrade.rsna.label_maps` lays them out."""


def classes_json() -> str:
    """The text of ``label_maps.json`` for maps numbered as :data:`LABEL_CLASSES`."""
    return json.dumps({"classes": {str(i): c for i, c in enumerate(LABEL_CLASSES)}}, indent=1)


def has_label_maps(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds label maps, after checking they use our classes."""
    data_dir = Path(data_dir)
    meta = data_dir / LABEL_MAPS_FILE
    if not (data_dir / LABEL_MAPS_DIR).is_dir():
        return False
    try:
        classes = json.loads(meta.read_text())["classes"]
        named = tuple(classes[str(i)] for i in range(len(classes)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LabelMapError(
            f"{meta}: missing or unreadable ({exc}); a folder with {LABEL_MAPS_DIR}/ names its "
            f"classes there, e.g. {classes_json()!s}"
        ) from exc
    if named != LABEL_CLASSES:
        raise LabelMapError(
            f"{meta}: classes {list(named)}; the localiser learns {list(LABEL_CLASSES)} (values "
            f"0-{len(LABEL_CLASSES) - 1}): renumber the maps, or move {LABEL_MAPS_DIR}/ aside to "
            "train without them"
        )
    return True


def read_png(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """One label map as uint8 (rows, columns), checked against our classes and ``shape``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise LabelMapError(
                    f"{path}: a {im.mode} image; a label map is 8-bit single-channel (one class "
                    f"value per pixel, {dict(enumerate(LABEL_CLASSES))})"
                )
            arr = np.array(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise LabelMapError(f"{path}: not a readable PNG ({exc}); restore or remove it") from exc
    if shape is not None and arr.shape != tuple(shape):
        raise LabelMapError(
            f"{path}: {arr.shape[0]} x {arr.shape[1]} pixels, its slice {shape[0]} x {shape[1]}; "
            "a label map lies on its slice's own pixel grid"
        )
    if int(arr.max(initial=0)) >= len(LABEL_CLASSES):
        raise LabelMapError(
            f"{path}: value {int(arr.max())}; label maps hold 0-{len(LABEL_CLASSES) - 1} "
            f"({dict(enumerate(LABEL_CLASSES))})"
        )
    return arr
