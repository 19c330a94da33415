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


class GraderDataset(EpochDataset):
    """One item = the five level crops of one (study, condition) of a stage-2 group.

    Whole studies per item make the any-severe-spinal term of the loss exact (it is a maximum
    over a study's five levels). Crops are centred on ``points`` (true points, with missing
    recesses derived from the canal; the labelled disc centre for disc conditions) and jittered
    when ``augment``; cells whose point cannot be cut are labelled -1 (ignored). Each row also
    carries its condition's output of the group's network (``head``) and its number of grades.
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
        self.items: list[tuple[int, str]] = [
            (i, condition)
            for i, study in enumerate(self.studies)
            for condition in labelled_conditions(study, group, task)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s_idx, condition = self.items[i]
        study = self.studies[s_idx]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.augment else None
        task = self.task
        columns = task.condition_columns(condition)
        crops = make_crops(
            study.stacks, self.points[study.study_id], self.cfg, columns, rng, task=task
        )
        x = np.zeros((len(LEVELS), self.cfg.slices, self.cfg.size, self.cfg.size), np.float32)
        labels = study.labels[[task.column_index(c) for c in columns]].copy()
        for j, col in enumerate(columns):
            if col in crops:
                x[j] = crops[col]
            else:
                labels[j] = -1
        c = task.condition(condition)
        symmetric = c.side is None and c.view == "sagittal"
        if rng is not None and symmetric and self.cfg.flip_lr and rng.random() < 0.5:
            # The canal (and the disc) is left/right symmetric: reversing the slice order of a
            # sagittal crop is a mirror image.
            x = np.ascontiguousarray(x[:, ::-1])
        n = len(LEVELS)
        return {
            "x": x, "labels": labels, "study": np.full(n, study.study_id),
            "head": np.full(n, task.head_of(condition)), "grades": np.full(n, len(c.grades)),
        }  # fmt: skip


def collate_levels(batch: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Flatten (item, level) into rows; rows with no label (no crop) are dropped."""
    x = np.concatenate([b["x"] for b in batch])
    labels = np.concatenate([b["labels"] for b in batch])
    study = np.concatenate([b["study"] for b in batch])
    level = np.tile(np.arange(len(LEVELS)), len(batch))
    keep = labels >= 0
    if not keep.any():  # keep one row so the batch is well-formed; its label stays ignored
        keep[0] = True
    out = {
        "x": torch.from_numpy(x[keep]),
        "labels": torch.from_numpy(labels[keep]).long(),
        "level": torch.from_numpy(level[keep]).long(),
        "study": torch.from_numpy(study[keep]).long(),
    }
    if "head" in batch[0]:
        out["head"] = torch.from_numpy(np.concatenate([b["head"] for b in batch])[keep]).long()
        out["grades"] = torch.from_numpy(np.concatenate([b["grades"] for b in batch])[keep]).long()
    return out
