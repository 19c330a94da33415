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
from spinegrade.task import CONDITION_GROUP, CONDITIONS, LABEL_COLUMNS, LEVELS

# Conditions graded by each stage-2 model (left and right share one model: crops are mirrored).
GROUP_CONDITIONS: dict[str, tuple[str, ...]] = {
    g: tuple(c for c in CONDITIONS if CONDITION_GROUP[c] == g)
    for g in ("spinal", "foraminal", "subarticular")
}


def condition_columns(condition: str) -> list[str]:
    """The five label columns of a condition, L1/L2 -> L5/S1."""
    return [f"{condition}_{lv}" for lv in LEVELS]


# ------------------------------------------------------------------------ stage-2 training data


def labelled_conditions(study: StudyData, group: str) -> list[str]:
    """The conditions of ``group`` with a graded cell in ``study`` (none without a series)."""
    if not study.stacks:
        return []
    return [
        condition
        for condition in GROUP_CONDITIONS[group]
        if (study.labels[[LABEL_COLUMNS.index(c) for c in condition_columns(condition)]] >= 0).any()
    ]


class GraderDataset(EpochDataset):
    """One item = the five level crops of one (study, condition) of a stage-2 group.

    Whole studies per item make the any-severe-spinal term of the loss exact (it is a maximum
    over a study's five levels). Crops are centred on ``points`` (true points, with missing
    recesses derived from the canal) and jittered when ``augment``; cells whose point cannot be
    cut are labelled -1 (ignored).
    """

    def __init__(
        self,
        studies: Sequence[StudyData],
        points: Mapping[int, StudyPoints],
        group: str,
        cfg: CropConfig,
        augment: bool,
        seed: int = 0,
    ) -> None:
        self.studies, self.points, self.group, self.cfg = list(studies), points, group, cfg
        self.augment, self.seed = augment, seed
        self.items: list[tuple[int, str]] = [
            (i, condition)
            for i, study in enumerate(self.studies)
            for condition in labelled_conditions(study, group)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s_idx, condition = self.items[i]
        study = self.studies[s_idx]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.augment else None
        columns = condition_columns(condition)
        crops = make_crops(study.stacks, self.points[study.study_id], self.cfg, columns, rng)
        x = np.zeros((len(LEVELS), self.cfg.slices, self.cfg.size, self.cfg.size), np.float32)
        labels = study.labels[[LABEL_COLUMNS.index(c) for c in columns]].copy()
        for j, col in enumerate(columns):
            if col in crops:
                x[j] = crops[col]
            else:
                labels[j] = -1
        if rng is not None and self.group == "spinal" and self.cfg.flip_lr and rng.random() < 0.5:
            # The canal is left/right symmetric: reversing the slice order is a mirror image.
            x = np.ascontiguousarray(x[:, ::-1])
        return {"x": x, "labels": labels, "study": np.full(len(LEVELS), study.study_id)}


def collate_levels(batch: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Flatten (item, level) into rows; rows with no label (no crop) are dropped."""
    x = np.concatenate([b["x"] for b in batch])
    labels = np.concatenate([b["labels"] for b in batch])
    study = np.concatenate([b["study"] for b in batch])
    level = np.tile(np.arange(len(LEVELS)), len(batch))
    keep = labels >= 0
    if not keep.any():  # keep one row so the batch is well-formed; its label stays ignored
        keep[0] = True
    return {
        "x": torch.from_numpy(x[keep]),
        "labels": torch.from_numpy(labels[keep]).long(),
        "level": torch.from_numpy(level[keep]).long(),
        "study": torch.from_numpy(study[keep]).long(),
    }
