"""Studies in memory, and the stage-2 training dataset (crops around true points, jittered).

A study's series are chosen once (:func:`select_stacks`): per sagittal description the series
the coordinates were labelled on, else the one covering the spine best, and every stack of every
axial series (the projection picks the stack that passes through a level, so a second axial
series covering the upper discs is used, not wasted).
All chosen stacks are preloaded: crops are cut on the fly (about 0.5 ms each), so every epoch sees
fresh shifts, slice offsets, zooms and rotations without storing augmented copies.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from spinegrade.cache import CachedStack, load_stack, read_index
from spinegrade.config import CropConfig, LocalizerAugmentConfig
from spinegrade.constants import (
    AX_T2,
    CONDITION_GROUP,
    CONDITIONS,
    LABEL_COLUMNS,
    LEVELS,
    SERIES_DESCRIPTIONS,
)
from spinegrade.crops import StudyPoints, make_crops, true_points
from spinegrade.localize import LocalizerSample, SagittalFrame
from spinegrade.progress import progress_bar
from spinegrade.train import EpochDataset

log = logging.getLogger(__name__)

# Conditions graded by each stage-2 model (left and right share one model: crops are mirrored).
GROUP_CONDITIONS: dict[str, tuple[str, ...]] = {
    g: tuple(c for c in CONDITIONS if CONDITION_GROUP[c] == g)
    for g in ("spinal", "foraminal", "subarticular")
}


def condition_columns(condition: str) -> list[str]:
    """The five label columns of a condition, L1/L2 -> L5/S1."""
    return [f"{condition}_{lv}" for lv in LEVELS]


@dataclass
class StudyData:
    """One training study: chosen stacks, true points (patient space) and labels."""

    study_id: int
    stacks: dict[str, list[CachedStack]]
    points: StudyPoints
    labels: np.ndarray  # int64 (25,): 0/1/2, -1 where the cell is empty


def select_stacks(
    stacks: Sequence[CachedStack], labelled: Collection[int] = ()
) -> dict[str, list[CachedStack]]:
    """Description -> stacks to use, first = the one to read.

    Real studies can hold two sagittal T1 or T2 series (a repeat after motion, a truncated
    scout). Per sagittal description one series is kept: the one the coordinates were labelled
    on (``labelled`` series ids, in training), else the one that covers the lumbar spine best
    (:func:`series_coverage`). Axial series all stay (a second series often covers the upper
    discs), labelled ones first, then by cranio-caudal coverage.
    """
    labelled = {int(s) for s in labelled}
    out: dict[str, list[CachedStack]] = {}
    for desc in SERIES_DESCRIPTIONS:
        by_series: dict[int, list[CachedStack]] = {}
        for s in stacks:
            if s.description == desc:
                by_series.setdefault(int(s.series_id), []).append(s)
        if not by_series:
            continue

        def rank(sid: int, by_series=by_series) -> tuple:
            return (sid not in labelled, -series_coverage(by_series[sid]), sid)

        order = sorted(by_series, key=rank)
        if desc == AX_T2:
            out[desc] = [s for sid in order for s in by_series[sid]]
        else:
            out[desc] = sorted(by_series[order[0]], key=lambda s: -s.volume.shape[0])
    return out


def series_coverage(stacks: Sequence[CachedStack]) -> float:
    """Millimetres a series spans through its slices, summed over its stacks.

    Sagittal slices step left-right, so this is the width across the spine (foramina on both
    sides need it); axial slices step head-feet, so it is the cranio-caudal reach over the five
    discs. A truncated repeat spans less than the full series.
    """
    total = 0.0
    for s in stacks:
        d = len(s.positions)
        if d == 0:
            continue
        span = float(np.linalg.norm(s.positions[-1] - s.positions[0])) if d > 1 else 0.0
        total += span * d / max(d - 1, 1)  # + one slice gap: a single slice still covers some
    return total


def used_series(stacks: Mapping[str, Sequence[CachedStack]]) -> dict[str, list[int]]:
    """Description -> the series ids a study was read from, in the order they are used."""
    return {d: list(dict.fromkeys(int(s.series_id) for s in v)) for d, v in stacks.items() if v}


def load_studies(
    cache_dir: str | Path,
    study_ids: Sequence[int],
    labels: pd.DataFrame | None = None,
    coordinates: pd.DataFrame | None = None,
    split: str = "train",
    progress: bool = True,
) -> dict[int, StudyData]:
    """Load the chosen stacks (and, for training, true points and labels) of ``study_ids``.

    ``coordinates`` are the rows of :func:`spinegrade.rsna.normalize_coordinates`. Studies
    with no usable cached stack are still returned (empty ``stacks``): they get prior predictions.
    """
    from spinegrade.rsna import label_matrix

    cache_dir = Path(cache_dir)
    index = read_index(cache_dir)
    index = index[(index["split"] == split) & (index["status"] == "ok")]
    paths = index.groupby("study_id")["path"].apply(list).to_dict()
    codes = {}
    if labels is not None:
        codes = dict(zip(labels["study_id"].astype(int), label_matrix(labels), strict=True))
    by_study = dict(iter(coordinates.groupby("study_id"))) if coordinates is not None else {}
    out: dict[int, StudyData] = {}
    for sid in progress_bar(
        study_ids, "loading studies", unit="study", enabled=progress, leave=False
    ):
        sid = int(sid)
        all_stacks = [load_stack(cache_dir / p) for p in paths.get(sid, [])]
        coords = by_study.get(sid)
        pts = true_points(coords, all_stacks) if coords is not None else StudyPoints()
        lab = codes.get(sid, np.full(len(LABEL_COLUMNS), -1, dtype=np.int64))
        # Training reads the series the labels were drawn on; prediction the best-covering one.
        labelled = () if coords is None else coords["series_id"].astype(int).tolist()
        chosen = select_stacks(all_stacks, labelled)
        out[sid] = StudyData(sid, chosen, pts, np.asarray(lab, dtype=np.int64))
    missing = [s for s, d in out.items() if not d.stacks]
    if missing:
        log.warning(
            "%d studies have no cached stack (e.g. %s): they get prior predictions; check "
            "index.csv (status/reason) in %s",
            len(missing),
            missing[:5],
            cache_dir,
        )
    return out


# ------------------------------------------------------------------------ stage-2 training data


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
        self.items: list[tuple[int, str]] = []
        for i, study in enumerate(self.studies):
            for condition in GROUP_CONDITIONS[group]:
                cols = [LABEL_COLUMNS.index(c) for c in condition_columns(condition)]
                if (study.labels[cols] >= 0).any() and study.stacks:
                    self.items.append((i, condition))

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


# ------------------------------------------------------------------------ stage-1 training data


NO_LOCALIZER_AUGMENT = LocalizerAugmentConfig(
    **{f.name: 0.0 for f in dataclasses.fields(LocalizerAugmentConfig)}
)


class LocalizerDataset(EpochDataset):
    """Sagittal stacks seen whole or zoomed (as the two looks of prediction), augmented.

    A zoomed view is centred near the middle of the targets with a random offset of up to
    ``shift_frac`` of the window and a +-15 % scale change, so the second look of prediction,
    centred on the first look's estimate, sees what training showed it. With ``aug`` (see
    :class:`~spinegrade.config.LocalizerAugmentConfig`) a whole look is also rescaled, stretched,
    shifted and rotated, and every look gets scanner-like intensity changes: real series differ
    from the phantom's in field of view, spine position, contrast, noise and shading, and the
    network must find discs by what they look like, not where they sit in the image.
    """

    def __init__(
        self,
        samples: Sequence[LocalizerSample],
        augment: bool,
        zoom: float = 0.0,
        zoom_prob: float = 0.5,
        shift_frac: float = 0.1,
        seed: int = 0,
        aug: LocalizerAugmentConfig | None = None,
        fine: float = 0.0,
    ) -> None:
        self.samples, self.augment, self.seed = list(samples), augment, seed
        self.zoom, self.zoom_prob, self.shift_frac = zoom, zoom_prob, shift_frac
        self.aug = aug if aug is not None else NO_LOCALIZER_AUGMENT
        self.fine = fine

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s = self.samples[i]
        if not self.augment:
            return s.view(s.frame)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        frame = s.frame
        if 0 < self.fine < 1 and s.valid.any() and rng.random() < 1 / 3:
            # The close look of prediction: centred on one level, off by up to the zoomed
            # look's typical error (a third of the window's half).
            j = int(rng.choice(np.flatnonzero(s.valid)))
            frac = self.fine * rng.uniform(0.85, 1.15)
            side = frame.field()[2]
            cy, cx = s.zyx[j, 1:] + rng.uniform(-1, 1, 2) * frac * side / 6
            frame = frame.zoomed(float(cy), float(cx), frac)
        elif 0 < self.zoom < 1 and rng.random() < self.zoom_prob:
            frac = self.zoom * rng.uniform(0.85, 1.15)
            side = frame.field()[2]
            ys, xs = s.zyx[s.valid, 1], s.zyx[s.valid, 2]
            cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
            cy += rng.uniform(-1, 1) * self.shift_frac * frac * side
            cx += rng.uniform(-1, 1) * self.shift_frac * frac * side
            frame = _stretched(frame.zoomed(cy, cx, frac), rng, self.aug.aspect)
        else:
            frame = _whole_look(s, rng, self.aug)
        item = s.view(frame)
        a = self.aug
        if a.rotate_deg > 0:
            _rotate(item, rng.uniform(-a.rotate_deg, a.rotate_deg))
        item["volume"] = _intensity(item["volume"], rng, a)
        return item


def _stretched(frame: SagittalFrame, rng: np.random.Generator, aspect: float) -> SagittalFrame:
    """The same window with its height/width ratio changed by up to ``aspect`` (same centre)."""
    if aspect <= 0 or frame.window is None:
        return frame
    y0, x0, lh, lw = frame.window
    r = float(np.exp(rng.uniform(-1, 1) * np.log1p(aspect)))
    nh, nw = max(8, round(lh * np.sqrt(r))), max(8, round(lw / np.sqrt(r)))
    return dataclasses.replace(
        frame, window=(round(y0 + (lh - nh) / 2), round(x0 + (lw - nw) / 2), nh, nw)
    )


def _whole_look(
    s: LocalizerSample, rng: np.random.Generator, a: LocalizerAugmentConfig
) -> SagittalFrame:
    """A rescaled, stretched, shifted window of the whole field that keeps every target in view.

    Up to 8 draws; if none keeps the labelled levels inside (with a 4% margin), the plain frame.
    """
    frame = s.frame
    if a.scale <= 0 and a.aspect <= 0 and a.shift <= 0:
        return frame
    fy, fx, side, _ = frame.field()  # the square field: proportions kept
    ys, xs = s.zyx[s.valid, 1], s.zyx[s.valid, 2]
    for _ in range(8):
        k = float(np.exp(rng.uniform(-1, 1) * np.log1p(a.scale)))
        r = float(np.exp(rng.uniform(-1, 1) * np.log1p(a.aspect)))
        lh, lw = max(8, round(side * k * np.sqrt(r))), max(8, round(side * k / np.sqrt(r)))
        cy = fy + side / 2 + rng.uniform(-1, 1) * a.shift * side
        cx = fx + side / 2 + rng.uniform(-1, 1) * a.shift * side
        y0, x0 = round(cy - lh / 2), round(cx - lw / 2)
        my, mx = 0.04 * lh, 0.04 * lw
        if (
            (ys >= y0 + my).all() and (ys <= y0 + lh - my).all()
            and (xs >= x0 + mx).all() and (xs <= x0 + lw - mx).all()
        ):  # fmt: skip
            return dataclasses.replace(frame, window=(y0, x0, lh, lw))
    return frame


def _rotate(item: dict[str, np.ndarray], degrees: float) -> None:
    """Rotate the volume and its target points in-plane about the image centre (in place)."""
    vol = torch.from_numpy(item["volume"])[None]  # (1, S, H, W): slices as channels
    size = vol.shape[-1]
    t = np.deg2rad(degrees)
    c, sn = float(np.cos(t)), float(np.sin(t))
    theta = torch.tensor([[[c, -sn, 0.0], [sn, c, 0.0]]], dtype=vol.dtype)
    grid = F.affine_grid(theta, list(vol.shape), align_corners=False)
    item["volume"] = F.grid_sample(vol, grid, align_corners=False)[0].numpy()
    # affine_grid maps output -> input: p_in = R p_out, so targets move by R^T (normalised coords).
    half = size / 2
    u, v = (item["xy"][:, 0] + 0.5) / half - 1, (item["xy"][:, 1] + 0.5) / half - 1
    uo, vo = c * u + sn * v, -sn * u + c * v
    xy = np.stack([(uo + 1) * half - 0.5, (vo + 1) * half - 0.5], axis=-1).astype(np.float32)
    inside = (xy >= 0).all(-1) & (xy < size).all(-1)
    item["xy"], item["valid"] = xy, item["valid"] & inside


def _intensity(vol: np.ndarray, rng: np.random.Generator, a: LocalizerAugmentConfig) -> np.ndarray:
    """Scanner-like intensity changes of a (S, H, W) look in [0, 1]."""
    from scipy.ndimage import gaussian_filter

    if a.blur > 0:  # thicker slices, smoother reconstructions
        sigma = rng.uniform(0, a.blur)
        if sigma > 0.3:
            vol = gaussian_filter(vol, (0, sigma, sigma), mode="nearest")
    if a.bias > 0:  # receive-coil shading: a smooth field from a 3 x 3 grid of log gains
        coarse = torch.from_numpy(rng.normal(0, a.bias, (1, 1, 3, 3)).astype(np.float32))
        field = F.interpolate(coarse, size=vol.shape[-2:], mode="bicubic", align_corners=True)
        vol = vol * np.exp(field[0, 0].numpy())
    if a.contrast > 0:  # about mid-grey, so the background stays dark
        vol = (vol - 0.5) * np.exp(rng.uniform(-1, 1) * np.log1p(a.contrast)) + 0.5
    else:  # the mild jitter every look gets (with everything off: the draws of before #12)
        vol = vol * rng.uniform(0.8, 1.2)
    vol = vol + rng.uniform(-0.1, 0.1)
    if a.noise > 0:
        vol = vol + rng.normal(0, rng.uniform(0, a.noise), vol.shape)
    vol = np.clip(vol, 0, 1)
    g = np.exp(rng.uniform(-1, 1) * a.gamma) if a.gamma > 0 else rng.uniform(0.8, 1.25)
    return (vol**g).astype(np.float32)


def collate_stacks(batch: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Pad stacks at the end of the slice axis; ``mask`` marks real slices."""
    depth = max(b["volume"].shape[0] for b in batch)
    size = batch[0]["volume"].shape[-1]
    vol = torch.zeros(len(batch), depth, size, size)
    mask = torch.zeros(len(batch), depth, dtype=torch.bool)
    for i, b in enumerate(batch):
        d = b["volume"].shape[0]
        vol[i, :d] = torch.from_numpy(b["volume"])
        mask[i, :d] = True
    out = {"volume": vol, "mask": mask}
    for key in ("xy", "z", "valid"):
        out[key] = torch.from_numpy(np.stack([b[key] for b in batch]))
    return out
