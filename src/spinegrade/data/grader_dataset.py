"""The stage-2 training dataset: crops around true points, jittered.

All chosen stacks are preloaded: crops are cut on the fly (about 0.5 ms each), so every epoch sees
fresh shifts, slice offsets, zooms and rotations without storing augmented copies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from spinegrade.config import CropConfig
from spinegrade.data.crops import make_crops
from spinegrade.data.epoch import EpochDataset
from spinegrade.data.studies import StudyData
from spinegrade.localization.points import StudyPoints
from spinegrade.task import LEVELS, RSNA_2024, Task

# ------------------------------------------------------------------------ stage-2 training data


def labelled_conditions(study: StudyData, group: str, task: Task = RSNA_2024) -> list[str]:
    """The conditions of ``group`` with a graded cell in ``study`` (none without a series)."""
    if not study.stacks:
        return []
    out = []
    for condition in task.group_conditions(group):
        cells = [task.column_index(c) for c in task.condition_columns(condition)]
        if (study.labels[cells] >= 0).any():
            out.append(condition)
    return out


def crop_bundles(conditions: Sequence[str], task: Task) -> list[tuple[str, ...]]:
    """``conditions`` gathered by the crop they are read on (series, view, anchor, side).

    SPIDER's five disc conditions are all read on one sagittal T2 crop centred on the disc, so one
    crop teaches all five outputs; RSNA's conditions each have a crop of their own (a side or an
    anchor apart), so each is a bundle of one. Order of first appearance is kept.
    """
    bundles: dict[tuple, list[str]] = {}
    for name in conditions:
        c = task.condition(name)
        bundles.setdefault((c.series, c.view, c.anchor, c.side), []).append(name)
    return [tuple(b) for b in bundles.values()]


class GraderDataset(EpochDataset):
    """One item = the five level crops of one study for a bundle of conditions of a stage-2 group
    read on the same crop (:func:`crop_bundles`; one condition for RSNA).

    Whole studies per item make the any-severe-spinal term of the loss exact (it is a maximum
    over a study's five levels). Crops are centred on ``points`` (true points, with missing
    recesses derived from the canal; the labelled disc centre for disc conditions) and jittered
    when ``augment``; cells whose point cannot be cut are labelled -1 (ignored). Labels are
    (level, condition of the bundle); each also carries its condition's output of the group's
    network (``head``) and its number of grades.
    """

    def __init__(
        self,
        studies: Sequence[StudyData],
        points: Mapping[int, StudyPoints],
        group: str,
        cfg: CropConfig,
        augment: bool,
        seed: int = 0,
        task: Task = RSNA_2024,
    ) -> None:
        self.studies, self.points, self.group, self.cfg = list(studies), points, group, cfg
        self.augment, self.seed, self.task = augment, seed, task
        bundles = crop_bundles(task.group_conditions(group), task)
        self.items: list[tuple[int, tuple[str, ...]]] = []
        for i, study in enumerate(self.studies):
            labelled = set(labelled_conditions(study, group, task))
            self.items += [(i, b) for b in bundles if labelled.intersection(b)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s_idx, bundle = self.items[i]
        study = self.studies[s_idx]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.augment else None
        task = self.task
        columns = task.condition_columns(bundle[0])  # one crop a level serves the whole bundle
        crops = make_crops(
            study.stacks, self.points[study.study_id], self.cfg, columns, rng, task=task
        )
        x = np.zeros((len(LEVELS), self.cfg.slices, self.cfg.size, self.cfg.size), np.float32)
        labels = np.stack(
            [study.labels[[task.column_index(c) for c in task.condition_columns(name)]]
             for name in bundle], axis=1,
        )  # fmt: skip
        for j, col in enumerate(columns):
            if col in crops:
                x[j] = crops[col]
            else:
                labels[j] = -1
        c = task.condition(bundle[0])
        symmetric = c.side is None and c.view == "sagittal"
        if rng is not None and symmetric and self.cfg.flip_lr and rng.random() < 0.5:
            # The canal (and the disc) is left/right symmetric: reversing the slice order of a
            # sagittal crop is a mirror image.
            x = np.ascontiguousarray(x[:, ::-1])
        n = len(LEVELS)
        heads = [task.head_of(name) for name in bundle]
        grades = [len(task.condition(name).grades) for name in bundle]
        return {
            "x": x, "labels": labels, "study": np.full(n, study.study_id),
            "head": np.tile(heads, (n, 1)), "grades": np.tile(grades, (n, 1)),
        }  # fmt: skip


def collate_levels(batch: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Flatten (item, level) into rows, labels (rows, conditions of the bundle); rows with no
    label (no crop) are dropped."""
    x = np.concatenate([b["x"] for b in batch])
    k = max(b["labels"].shape[1] for b in batch)  # bundles of one group may differ in size

    def padded(key: str, fill: int) -> np.ndarray:
        return np.concatenate([np.pad(b[key], ((0, 0), (0, k - b[key].shape[1])),
                                      constant_values=fill) for b in batch])  # fmt: skip

    labels = padded("labels", -1)
    study = np.concatenate([b["study"] for b in batch])
    level = np.tile(np.arange(len(LEVELS)), len(batch))
    keep = (labels >= 0).any(axis=1)
    if not keep.any():  # keep one row so the batch is well-formed; its label stays ignored
        keep[0] = True
    out = {
        "x": torch.from_numpy(x[keep]),
        "labels": torch.from_numpy(labels[keep]).long(),
        "level": torch.from_numpy(level[keep]).long(),
        "study": torch.from_numpy(study[keep]).long(),
    }
    if "head" in batch[0]:  # a padded cell's label is -1: its head and grades are never read
        out["head"] = torch.from_numpy(padded("head", 0)[keep]).long()
        out["grades"] = torch.from_numpy(padded("grades", 2)[keep]).long()
    return out
