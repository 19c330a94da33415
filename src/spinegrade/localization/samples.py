"""Stage-1 training samples: a canonical volume and its level targets, from labelled points."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from spinegrade.config import Config
from spinegrade.localization.frames import (
    SagittalFrame,
    canonical_labels,
    canonical_volume,
    sagittal_frame,
)
from spinegrade.localization.points import StudyPoints
from spinegrade.localization.tasks import LocalizerTask, configured_tasks
from spinegrade.preprocessing.cache import CachedStack

# ----------------------------------------------------------------------------- training data


@dataclass
class LocalizerSample:
    """One sagittal stack with its targets in full-resolution canonical coordinates."""

    stack: CachedStack
    frame: SagittalFrame  # whole field of view
    zyx: np.ndarray  # float64 (T, 3) canonical (slice, y, x) of each target, full resolution
    valid: np.ndarray  # bool (T,)
    points: np.ndarray  # float64 (T, 3) true LPS points (NaN where unknown), for evaluation
    # uint8 (D, H, W) label maps on the cached grid (data.label_maps), None where none are drawn
    labels: np.ndarray | None = None

    def view(self, frame: SagittalFrame) -> dict[str, np.ndarray]:
        """Network input and targets of this sample seen through ``frame`` (e.g. a zoom); with
        label maps also ``seg``, uint8 (n_slices, size, size) on the input's pixels."""
        z, y, x = frame.full_to_input(*self.zyx.T)
        inside = (y >= 0) & (y < frame.size) & (x >= 0) & (x < frame.size)
        item = {
            "volume": canonical_volume(self.stack, frame),
            "xy": np.stack([x, y], axis=-1).astype(np.float32),
            "z": np.rint(z).astype(np.float32),
            "valid": self.valid & inside,
        }
        if self.labels is not None:
            item["seg"] = canonical_labels(self.labels, frame)
        return item


def localizer_sample(
    stack: CachedStack,
    points: StudyPoints,
    task: LocalizerTask,
    size: int,
    max_slices: int,
    labels: np.ndarray | None = None,
) -> LocalizerSample:
    """Targets of ``task`` from a study's true points; points outside the stack are invalid.
    ``labels``: the stack's label maps on its cached grid, if drawn."""
    frame = sagittal_frame(stack, size, max_slices)
    t = len(task.targets)
    zyx, valid = np.zeros((t, 3)), np.zeros(t, bool)
    lps = np.full((t, 3), np.nan)
    h, w = frame.inplane_hw()
    for i, (condition, level) in enumerate(task.targets):
        p = points.get(condition, level)
        if p is None:
            continue
        z, y, x = (float(v) for v in frame.to_full(*stack.patient_to_voxel(p)))
        zc = z - frame.z0
        if -0.5 <= zc <= frame.n_slices - 0.5 and 0 <= y < h and 0 <= x < w:
            zyx[i], valid[i], lps[i] = (z, y, x), True, p
    return LocalizerSample(stack, frame, zyx, valid, lps, labels)


# ----------------------------------------------------------------------------------- inference


def build_localizer_samples(
    studies: Mapping[int, tuple[Mapping[str, Sequence[CachedStack]], StudyPoints]],
    cfg: Config,
    label_maps: Mapping[int, Mapping[tuple[int, int], np.ndarray]] | None = None,
) -> dict[str, dict[int, LocalizerSample]]:
    """Targets of every study, per task (made once, shared by all folds; volumes not copied).

    ``label_maps``: study -> (series_id, stack) -> label maps (:class:`StudyData.label_maps
    <spinegrade.data.studies.StudyData>`), given to the samples of those stacks."""
    c = cfg.localizer
    tasks = configured_tasks(cfg)
    out: dict[str, dict[int, LocalizerSample]] = {name: {} for name in tasks}
    for study_id, (stacks, points) in studies.items():
        for name, task in tasks.items():
            cand = stacks.get(task.description)
            if cand:
                key = (int(cand[0].series_id), int(cand[0].stack))
                maps = (label_maps or {}).get(study_id, {}).get(key)
                sample = localizer_sample(cand[0], points, task, c.image_size, c.max_slices, maps)
                if sample.valid.any():
                    out[name][study_id] = sample
    return out
