"""Stage 1: where are the disc levels? 3D points per level from the sagittal series.

* Sagittal T2/STIR -> the five disc-level points in the spinal canal (mid-sagittal slice).
* Sagittal T1 -> the ten neural foramina (left and right, L1/L2..L5/S1).
* Axial T2 -> no network: the recesses are the spinal point plus a per-level, per-side offset in
  patient space (learned from the training fold), then projected into the nearest axial stack.
  Axial series are often stacks angled per disc; patient space makes that transparent.

Every sagittal stack is first put in a canonical frame (anterior left, head up, slices running
towards the patient's left), so the network never has to learn a scanner's orientation
conventions, and "left foramen" means "higher slice" in every input. Network outputs go back
through the same frame to cached voxels and then to patient coordinates (LPS mm).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spinegrade.cache import CachedStack, project_point
from spinegrade.config import Config, ConfigError
from spinegrade.constants import (
    AX_T2,
    CONDITION_GROUP,
    CONDITION_SERIES,
    CONDITIONS,
    LEVELS,
    LPS_HEAD,
    LPS_LEFT,
    LPS_POSTERIOR,
    SAG_T1,
    SAG_T2,
)
from spinegrade.crops import StudyPoints

SPINAL, LEFT_FOR, RIGHT_FOR = CONDITIONS[0], CONDITIONS[1], CONDITIONS[2]
LEFT_SUB, RIGHT_SUB = CONDITIONS[3], CONDITIONS[4]


@dataclass(frozen=True)
class LocalizerTask:
    """One stage-1 network: which series it reads and which (condition, level) points it finds."""

    name: str
    description: str
    targets: tuple[tuple[str, str], ...]


LOCALIZER_TASKS: dict[str, LocalizerTask] = {
    "spinal": LocalizerTask("spinal", SAG_T2, tuple((SPINAL, lv) for lv in LEVELS)),
    "foraminal": LocalizerTask(
        "foraminal", SAG_T1, tuple((c, lv) for c in (LEFT_FOR, RIGHT_FOR) for lv in LEVELS)
    ),
}


def configured_tasks(cfg: Config) -> dict[str, LocalizerTask]:
    """The stage-1 tasks ``cfg.localizer.tasks`` asks for; a clear error for an unknown name."""
    names = list(cfg.localizer.tasks)
    unknown = [n for n in names if n not in LOCALIZER_TASKS]
    if unknown or not names:
        raise ConfigError(
            f"localizer.tasks={names!r}: give one or more of {sorted(LOCALIZER_TASKS)}"
        )
    return {n: t for n, t in LOCALIZER_TASKS.items() if n in names}


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


def canonical_volume(stack: CachedStack, frame: SagittalFrame) -> np.ndarray:
    """The network input of a stack: float32 (n_slices, size, size) in [0, 1]."""
    v = stack.volume.transpose(0, 2, 1) if frame.transpose else stack.volume
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
    t = torch.from_numpy(np.ascontiguousarray(v)).float()[None]
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


# ----------------------------------------------------------------------------- training data


@dataclass
class LocalizerSample:
    """One sagittal stack with its targets in full-resolution canonical coordinates."""

    stack: CachedStack
    frame: SagittalFrame  # whole field of view
    zyx: np.ndarray  # float64 (T, 3) canonical (slice, y, x) of each target, full resolution
    valid: np.ndarray  # bool (T,)
    points: np.ndarray  # float64 (T, 3) true LPS points (NaN where unknown), for evaluation

    def view(self, frame: SagittalFrame) -> dict[str, np.ndarray]:
        """Network input and targets of this sample seen through ``frame`` (e.g. a zoom)."""
        z, y, x = frame.full_to_input(*self.zyx.T)
        inside = (y >= 0) & (y < frame.size) & (x >= 0) & (x < frame.size)
        return {
            "volume": canonical_volume(self.stack, frame),
            "xy": np.stack([x, y], axis=-1).astype(np.float32),
            "z": np.rint(z).astype(np.float32),
            "valid": self.valid & inside,
        }


def localizer_sample(
    stack: CachedStack, points: StudyPoints, task: LocalizerTask, size: int, max_slices: int
) -> LocalizerSample:
    """Targets of ``task`` from a study's true points; points outside the stack are invalid."""
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
    return LocalizerSample(stack, frame, zyx, valid, lps)


# ----------------------------------------------------------------------------- the localiser

# How the five level maps become five named points (see decode_levels): "ordered" gives each level
# its best peak, head to feet and apart; "chain" names consecutive discs as a run.
DECODERS: tuple[str, ...] = ("ordered", "chain")


@dataclass
class Localizer:
    """The stage-1 models of one fold plus the learned patient-space offsets."""

    nets: dict[str, nn.Module]  # task name -> LevelLocalizer
    offsets: dict[str, np.ndarray]  # see fit_offsets
    image_size: int
    max_slices: int
    zoom: float = 0.0  # second, zoomed look (fraction of the field of view); 0 = one look
    fuse_mm: float = 0.0  # canal/foramina consensus tolerance (see fuse_level_points); 0 = off
    decoder: str = "ordered"  # level naming, see DECODERS
    fine: float = 0.0  # third, close look per level (fraction of the field of view); 0 = off

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"localizer decoder {self.decoder!r}: use one of {list(DECODERS)}")

    def save(self, folder: Path, meta: dict | None = None) -> None:
        """``localizer_{task}.safetensors`` (+ sidecar), then ``localizer_geometry.json``.

        The geometry file, written last and atomically, commits the localiser; it lists the tasks
        whose nets were saved so that :meth:`load` can refuse a fold with one missing.
        """
        from spinegrade.atomic import write_json
        from spinegrade.weights import save_weights

        folder.mkdir(parents=True, exist_ok=True)
        for name, net in self.nets.items():
            path = folder / f"localizer_{name}.safetensors"
            save_weights(net, path, meta={**(meta or {}), "task": name})
        geometry = {
            "image_size": self.image_size,
            "max_slices": self.max_slices,
            "zoom": self.zoom,
            "fuse_mm": self.fuse_mm,
            "decoder": self.decoder,
            "fine": self.fine,
            "offsets": {k: v.tolist() for k, v in self.offsets.items()},
            "tasks": sorted(self.nets),
        }
        write_json(folder / "localizer_geometry.json", geometry)

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> Localizer:
        """Rebuild from :meth:`save`'s files (safetensors + JSON only)."""
        from spinegrade.models.registry import load_model

        geometry_path = Path(folder) / "localizer_geometry.json"
        if not geometry_path.is_file():
            raise FileNotFoundError(
                f"{geometry_path} is missing: the fold's localiser was not trained"
            )
        geometry = json.loads(geometry_path.read_text())
        nets = {}
        # Runs older than the "tasks" entry: the nets present are the nets trained.
        tasks = geometry.get("tasks")
        for name in LOCALIZER_TASKS if tasks is None else tasks:
            path = Path(folder) / f"localizer_{name}.safetensors"
            if tasks is not None or path.is_file():
                nets[name] = load_model(path, device=device)[0]  # missing: an error naming it
        offsets = {k: np.asarray(v, dtype=np.float64) for k, v in geometry["offsets"].items()}
        return cls(
            nets, offsets, int(geometry["image_size"]), int(geometry["max_slices"]),
            float(geometry.get("zoom", 0.0)), float(geometry.get("fuse_mm", 0.0)),
            str(geometry.get("decoder", "ordered")), float(geometry.get("fine", 0.0)),
        )  # fmt: skip


def fit_offsets(points: Sequence[StudyPoints]) -> dict[str, np.ndarray]:
    """Median patient-space offsets learned from true points of the training studies.

    ``subarticular`` (2, 5, 3): recess minus canal point per side (left, right) and level: the
    recesses sit just lateral and posterior of the canal centre. ``spinal_from_foramina`` (5, 3):
    canal point minus the midpoint of the two foramina, used when the T2 series is missing.
    Levels without examples fall back to the median over levels (then zero).
    """
    xyz = np.stack([p.xyz for p in points]) if points else np.full((0, 5, 5, 3), np.nan)
    spinal = xyz[:, 0]
    sub = np.stack([xyz[:, 3] - spinal, xyz[:, 4] - spinal], axis=1)  # (N, 2, 5, 3)
    mid = 0.5 * (xyz[:, 1] + xyz[:, 2])
    return {
        "subarticular": _robust_median(sub, axis=0),
        "spinal_from_foramina": _robust_median(spinal - mid, axis=0),
    }


def _robust_median(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():  # all-NaN slices are expected (levels never labelled)
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(values, axis=axis)
        overall = np.nanmedian(values.reshape(-1, 3), axis=0) if values.size else np.zeros(3)
    overall = np.where(np.isnan(overall), 0.0, overall)
    return np.where(np.isnan(med), overall, med)


def fuse_level_points(
    points: StudyPoints, offsets: Mapping[str, np.ndarray], tol_mm: float
) -> StudyPoints:
    """Consensus of the canal and the two foramina of each level (height and depth only).

    The spinal network (sagittal T2) and the foraminal network (sagittal T1) look at different
    series, so their mistakes are nearly independent, yet anatomy ties their answers together:
    the two foramina of a level sit beside its disc, at a fixed offset from the canal point
    (``spinal_from_foramina``). Each of the three points thus gives an estimate of the canal's
    cranio-caudal and antero-posterior position; a point farther than ``tol_mm`` from their
    median (typically a level that slid towards its neighbouring disc) is moved onto it. The
    lateral coordinates are kept: the canal lies on the midline, the foramina where the foraminal
    network saw them. Levels missing any of the three points are left as they are.
    """
    out = points.copy()
    if tol_mm <= 0:
        return out
    xyz, off = out.xyz, offsets["spinal_from_foramina"]
    i_canal, i_left, i_right = (CONDITIONS.index(c) for c in (SPINAL, LEFT_FOR, RIGHT_FOR))
    for j in range(len(LEVELS)):
        trio = xyz[[i_canal, i_left, i_right], j]  # (3, 3) LPS
        if np.isnan(trio).any():
            continue
        # LPS axes 1 and 2 are posterior and superior: the level's depth and height. Each
        # foramen of a symmetric pair shares them with the pair's midpoint, so foramen + offset
        # is a canal estimate there; the lateral axis (0) is never touched.
        estimates = trio[:, 1:].copy()
        estimates[1:] += off[j, 1:]
        consensus = np.median(estimates, axis=0)
        far = np.linalg.norm(estimates - consensus, axis=1) > tol_mm
        estimates[far] = consensus
        estimates[1:] -= off[j, 1:]
        xyz[[i_canal, i_left, i_right], j, 1:] = estimates
    return out


def derive_points(points: StudyPoints, offsets: Mapping[str, np.ndarray]) -> StudyPoints:
    """Fill points no network predicts: the canal from the foramina (no T2), the recesses.

    Only NaN points are filled, so true or predicted points always win.
    """
    out = points.copy()
    for j, level in enumerate(LEVELS):
        left, right = out.get(LEFT_FOR, level), out.get(RIGHT_FOR, level)
        if out.get(SPINAL, level) is None and left is not None and right is not None:
            out.set(SPINAL, level, 0.5 * (left + right) + offsets["spinal_from_foramina"][j])
        spinal = out.get(SPINAL, level)
        if spinal is None:
            continue
        for side, condition in enumerate((LEFT_SUB, RIGHT_SUB)):
            if out.get(condition, level) is None:
                out.set(condition, level, spinal + offsets["subarticular"][side, j])
    return out


# ----------------------------------------------------------------------------------- inference


def build_localizer_samples(
    studies: Mapping[int, tuple[Mapping[str, Sequence[CachedStack]], StudyPoints]], cfg: Config
) -> dict[str, dict[int, LocalizerSample]]:
    """Targets of every study, per task (made once, shared by all folds; volumes not copied)."""
    c = cfg.localizer
    tasks = configured_tasks(cfg)
    out: dict[str, dict[int, LocalizerSample]] = {name: {} for name in tasks}
    for study_id, (stacks, points) in studies.items():
        for name, task in tasks.items():
            cand = stacks.get(task.description)
            if cand:
                sample = localizer_sample(cand[0], points, task, c.image_size, c.max_slices)
                if sample.valid.any():
                    out[name][study_id] = sample
    return out


def _local_maxima(prob: np.ndarray, k: int, radius: int) -> list[tuple[int, int]]:
    """Up to ``k`` peaks of a 2D map, each at least ``radius`` cells from the ones before."""
    work, peaks = prob.copy(), []
    for _ in range(k):
        y, x = np.unravel_index(int(np.argmax(work)), work.shape)
        if work[y, x] <= 0:
            break
        peaks.append((int(y), int(x)))
        work[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1] = 0
    return peaks


def _ordered_assignment(score: np.ndarray, ys: np.ndarray, min_gap: float) -> list[int] | None:
    """Best candidate per level, head to feet, each ``min_gap`` below the one above (DP).

    ``score`` (levels, candidates) log-probabilities, ``ys`` candidate rows (canonical y grows
    towards the feet). Returns candidate indices, or None when no ordered choice exists.
    """
    n_lv, n_c = score.shape
    best = np.full((n_lv, n_c), -np.inf)
    back = np.zeros((n_lv, n_c), dtype=np.int64)
    best[0] = score[0]
    for j in range(1, n_lv):
        for c in range(n_c):
            above = [
                p for p in range(n_c) if ys[c] - ys[p] >= min_gap and np.isfinite(best[j - 1, p])
            ]
            if above:
                p = max(above, key=lambda q: best[j - 1, q])
                best[j, c], back[j, c] = best[j - 1, p] + score[j, c], p
    if not np.isfinite(best[-1]).any():
        return None
    path = [int(np.argmax(best[-1]))]
    for j in range(n_lv - 1, 0, -1):
        path.append(int(back[j, path[-1]]))
    return path[::-1]


def _disc_chain(
    inplane: np.ndarray, group: Sequence[int], min_gap: float, window: int
) -> list[tuple[int, int]] | None:
    """Levels named by counting discs: ``len(group)`` neighbouring disc candidates, head to feet.

    Candidates are the peaks of the levels' pooled map ("a disc is here"), at distinct heights
    at least ``1.4 * min_gap`` apart (~21 mm: neighbouring discs are a vertebral body, >= 20 mm,
    apart; a disc and its endplates or the body beside it must not count as two discs).
    Adjacent labels are adjacent discs, so the levels take a run of consecutive candidates, the
    run whose per-level maps agree best. A level thus never
    skips a disc or shares one, and the names follow the order of the discs in the image (the
    whole chain moves together) rather than each level's own guess of its height. None when
    fewer candidates than levels are found.
    """
    pooled = inplane[list(group)].sum(0)
    spacing = 1.4 * min_gap
    peaks = _local_maxima(pooled, 3 * len(group), max(window, int(0.7 * min_gap)))
    if not peaks:
        return None
    floor = 0.02 * pooled[peaks[0]]
    kept: list[tuple[int, int]] = []
    for c in peaks:  # strongest first
        if pooled[c] >= floor and all(abs(c[0] - k[0]) >= spacing for k in kept):
            kept.append(c)
    if len(kept) < len(group):
        return None
    kept.sort()
    score = np.log(np.array([[_window_sum(inplane[j], c, 1) for c in kept] for j in group]) + 1e-12)
    n = len(group)
    totals = [sum(score[i, k + i] for i in range(n)) for k in range(len(kept) - n + 1)]
    k = int(np.argmax(totals))
    return kept[k : k + n]


def decode_levels(
    logits: np.ndarray,
    groups: Sequence[Sequence[int]],
    min_gap: float,
    window: int = 2,
    chain: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joint logits (T, S, h, w) -> (slice, y, x) per target in heatmap cells.

    Each group (the five levels of one side) is decoded together: candidate discs are the peaks
    of every level's in-plane map, and the levels are assigned to distinct candidates in
    head-to-feet order at least ``min_gap`` cells apart (a disc cannot be two levels, and L1/L2
    lies above L2/L3). Without this, a level whose own map is unsure tends to fall onto the
    neighbouring disc, the commonest large error of a heatmap localiser. With ``chain`` the
    levels take consecutive discs (:func:`_disc_chain`), falling back to the ordered assignment
    when too few discs are seen.
    """
    t, s, h, w = logits.shape
    flat = logits.reshape(t, -1)
    prob = np.exp(flat - flat.max(1, keepdims=True))
    prob = (prob / prob.sum(1, keepdims=True)).reshape(t, s, h, w)
    inplane = prob.sum(1)  # (T, h, w): each level's map, slices marginalised
    z, y, x = np.zeros(t), np.zeros(t), np.zeros(t)
    for group in groups:
        run = _disc_chain(inplane, group, min_gap, window) if chain else None
        if run is not None:
            for j, c in zip(group, run, strict=True):
                z[j], y[j], x[j] = _refine(prob[j], c, window)
            continue
        cands = sorted({p for j in group for p in _local_maxima(inplane[j], 3, window)})
        ys = np.array([c[0] for c in cands], dtype=np.float64)
        score = np.log(
            np.array([[_window_sum(inplane[j], c, 1) for c in cands] for j in group]) + 1e-12
        )
        path = _ordered_assignment(score, ys, min_gap)
        for k, j in enumerate(group):
            c = (
                cands[path[k]]
                if path is not None
                else np.unravel_index(np.argmax(inplane[j]), (h, w))
            )
            z[j], y[j], x[j] = _refine(prob[j], c, window)
    return z, y, x


def _window_sum(m: np.ndarray, c: tuple[int, int], r: int) -> float:
    return float(m[max(0, c[0] - r) : c[0] + r + 1, max(0, c[1] - r) : c[1] + r + 1].sum())


def _refine(prob: np.ndarray, c, r: int) -> tuple[float, float, float]:
    """Most probable slice near candidate ``c``, then the probability-weighted point there."""
    y0, x0 = max(0, int(c[0]) - r), max(0, int(c[1]) - r)
    patch = prob[:, y0 : int(c[0]) + r + 1, x0 : int(c[1]) + r + 1]
    z = int(np.argmax(patch.sum((1, 2))))
    p = patch[z] / max(float(patch[z].sum()), 1e-12)
    gy, gx = np.indices(p.shape)
    return float(z), float((p * gy).sum() + y0), float((p * gx).sum() + x0)


def _decode_look(
    heat: np.ndarray,
    look: SagittalFrame,
    groups,
    mm_y: float,
    min_gap_mm: float,
    decoder: str = "ordered",
):
    """Heatmaps (T, S, h, w) of one look -> full-resolution canonical (z, y, x) per target."""
    hh, ww = heat.shape[-2:]
    y0, x0, lh, lw = look.view_window()
    cell_y, cell_x = lh / hh, lw / ww  # full-resolution pixels per heatmap cell
    zc, yc, xc = decode_levels(heat, groups, min_gap_mm / (mm_y * cell_y), chain=decoder == "chain")
    z, y, x = zc + look.z0, (yc + 0.5) * cell_y - 0.5, (xc + 0.5) * cell_x - 0.5
    return z, y + y0, x + x0


# How far a close look may move a level (mm): about a third of the distance between neighbouring
# discs (~35 mm), so that a level refined by it stays on the disc the zoomed look named.
FINE_SEARCH_MM = 12.0


def _decode_fine(
    heat: np.ndarray, group: Sequence[int], look: SagittalFrame, mm_y: float, window: int = 2
) -> tuple[float, float]:
    """A close look's heatmaps (T, S, h, w), centred on one level's estimate -> in-plane (y, x).

    The close look sees two or three discs, and which of them is which level is unsure there;
    the naming was settled by the zoomed look. So the maps of the side's levels (``group``) are
    pooled into "a disc is here", and the point moves to the pooled peak nearest the centre,
    at most :data:`FINE_SEARCH_MM` away, refined there. The slice stays the zoomed look's: that
    look sees the spine's whole width, the close look a few centimetres around one level (on
    the demo's 5 folds, keeping it: right slice of the canal 83 -> 86%, foramina 74 -> 76%).
    """
    s, hh, ww = heat.shape[1:]
    flat = heat[list(group)].reshape(len(group), -1)
    prob = np.exp(flat - flat.max(1, keepdims=True))
    prob = (prob / prob.sum(1, keepdims=True)).sum(0).reshape(s, hh, ww)
    y0, x0, lh, lw = look.view_window()
    cell_y, cell_x = lh / hh, lw / ww
    gy, gx = np.indices((hh, ww))
    r = FINE_SEARCH_MM / (mm_y * cell_y)  # cells (pixels are square in mm)
    near = (gy - (hh - 1) / 2) ** 2 + (gx - (ww - 1) / 2) ** 2 <= r**2
    c = np.unravel_index(int(np.argmax(np.where(near, prob.sum(0), -1.0))), (hh, ww))
    _, yc, xc = _refine(prob, c, window)  # in-plane, on the close look's clearest slice
    return (yc + 0.5) * cell_y - 0.5 + y0, (xc + 0.5) * cell_x - 0.5 + x0


def _run_looks(
    net: nn.Module, stacks: Sequence[CachedStack], looks: Sequence[SagittalFrame], batch_size: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(index, heatmaps (T, S, h, w)) of each (stack, look); looks of one input shape share a pass.

    Volumes are cut a batch at a time and heatmaps handed on as they come, so memory holds one
    batch whatever the number of stacks (a fold of the RSNA set at 256 px: ~400 stacks, each
    with five close looks).
    """
    device = next(net.parameters()).device
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, look in enumerate(looks):  # canonical_volume's shape: (n_slices, size, size)
        by_shape.setdefault((look.n_slices, look.size), []).append(i)
    for idx in by_shape.values():
        for j in range(0, len(idx), batch_size):
            part = idx[j : j + batch_size]
            vols = [canonical_volume(stacks[i], looks[i]) for i in part]
            heat = net.eval()(torch.from_numpy(np.stack(vols)).to(device))["heatmaps"]
            yield from zip(part, heat.float().cpu().numpy(), strict=True)


@torch.no_grad()
def locate_in_stacks(
    net: nn.Module,
    stacks: Sequence[CachedStack],
    frames: Sequence[SagittalFrame],
    zoom: float,
    batch_size: int = 8,
    min_gap_mm: float = 15.0,
    decoder: str = "ordered",
    fine: float = 0.0,
    centres: Sequence[tuple[float, float]] | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Targets' full-resolution canonical (z, y, x) of each stack, each (T,): a whole look, then a
    zoomed one, then (``fine`` > 0) one close look per level.

    The zoomed look is centred on the middle of the first look's points (:func:`_look_centre`),
    so that the top and bottom levels (L1/L2 and L5/S1 lie ~15 cm apart) both stay inside its
    window; ``centres`` (full-resolution canonical (y, x) per stack, e.g. several folds'
    consensus, see :func:`localize_consensus`) replace the whole look. Levels are
    decoded in groups of five (one per side) with :func:`decode_levels`; the close looks only
    refine each level where the zoomed look named it (see :func:`_decode_fine`). Each look's
    volumes of equal shape go through the network ``batch_size`` at a time (the same numbers;
    a batch only shares the pass).
    """
    n_targets = int(net.n_targets)
    groups = [list(range(i, i + len(LEVELS))) for i in range(0, n_targets, len(LEVELS))]
    mm_y = [
        s.spacing[1] if f.transpose else s.spacing[0] for s, f in zip(stacks, frames, strict=True)
    ]
    zoomed = 0 < zoom < 1
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [(np.zeros(0),) * 3] * len(stacks)
    if centres is None or not zoomed:
        for i, h in _run_looks(net, stacks, frames, batch_size):
            found[i] = _decode_look(h, frames[i], groups, mm_y[i], min_gap_mm, decoder)
    if zoomed:
        mids = list(centres) if centres is not None else [_look_centre(f) for f in found]
        looks = [f.zoomed(*c, zoom) for f, c in zip(frames, mids, strict=True)]
        for i, h in _run_looks(net, stacks, looks, batch_size):
            found[i] = _decode_look(h, looks[i], groups, mm_y[i], min_gap_mm, decoder)
    if not 0 < fine < 1:
        return found
    # One close look per level (shared by its left and right targets), centred on the estimate.
    jobs = [(i, [g[lv] for g in groups]) for i in range(len(stacks)) for lv in range(len(LEVELS))]
    close = [
        _close_look(frames[i], found[i], js, fine, single_side=len(groups) == 1) for i, js in jobs
    ]
    out = [tuple(v.copy() for v in f) for f in found]
    for q, h in _run_looks(net, [stacks[i] for i, _ in jobs], close, batch_size):
        i, js = jobs[q]
        for j, g in zip(js, groups, strict=True):
            out[i][1][j], out[i][2][j] = _decode_fine(h, g, close[q], mm_y[i])
    for i in range(len(stacks)):
        _keep_levels_apart(out[i], found[i], groups, min_gap_mm / mm_y[i])
    return out  # type: ignore[return-value]


# Slices each side of the level's slice that a canal's close look reads. The close look moves a
# level in-plane only (its slice is the zoomed look's, see _decode_fine), and the canal lies on
# the midline, so the slices far lateral of it only cost time. Two each side keep the network's
# neighbour channels and some slice context around the canal.
CLOSE_SLICES = 2


def _close_look(
    frame: SagittalFrame,
    found: tuple[np.ndarray, np.ndarray, np.ndarray],
    targets: Sequence[int],
    fine: float,
    single_side: bool,
) -> SagittalFrame:
    """The close look at one level: ``fine`` of the field centred on its ``targets``' points.

    A single-sided task (the canal) reads only the slices near the level's slice; a paired one
    (left and right foramina share the look) keeps the whole stack, as both sides need it.
    """
    z, y, x = (np.asarray(v)[list(targets)] for v in found)
    look = frame.zoomed(float(np.mean(y)), float(np.mean(x)), fine)
    if not single_side or frame.n_slices <= 2 * CLOSE_SLICES + 1:
        return look
    n = 2 * CLOSE_SLICES + 1
    lo, hi = frame.z0, frame.z0 + frame.n_slices - n  # the sub-stack stays inside the frame's
    z0 = int(np.clip(round(float(np.mean(z))) - CLOSE_SLICES, lo, hi))
    return dataclasses.replace(look, z0=z0, n_slices=n)


def _look_centre(found: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Middle (y, x) of a look's located targets: where the next, zoomed look is centred."""
    _, y, x = found
    return float(np.min(y) + np.max(y)) / 2, float(np.min(x) + np.max(x)) / 2


def _keep_levels_apart(fine, coarse, groups, min_gap: float) -> None:
    """Undo close-look moves that put two neighbouring levels on one disc (in place).

    Between two discs, the close looks of both neighbours can snap to the same disc. While a
    pair of neighbouring levels lies less than ``min_gap`` (full-resolution pixels) apart along
    the spine, the level that the close look moved further goes back to its zoomed-look point.
    """
    for g in groups:
        moved = np.hypot(fine[1][g] - coarse[1][g], fine[2][g] - coarse[2][g])
        back = np.zeros(len(g), dtype=bool)
        for _ in range(len(g)):
            ys = fine[1][g]
            bad = [k for k in range(len(g) - 1) if ys[k + 1] - ys[k] < min_gap]
            if not bad:
                break
            k = bad[0]
            cand = [m for m in (k, k + 1) if not back[m]]
            if not cand:
                break
            m = max(cand, key=lambda q: moved[q])
            back[m] = True
            for a in range(3):
                fine[a][g[m]] = coarse[a][g[m]]


def localizer_hits_errors(
    net: nn.Module,
    samples: Sequence[LocalizerSample],
    zoom: float,
    decoder: str = "ordered",
    fine: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-slice flags and errors (mm) of the labelled targets of ``samples`` (concatenated)."""
    hits, errs = [np.zeros(0, dtype=bool)], [np.zeros(0)]
    stacks, frames = [s.stack for s in samples], [s.frame for s in samples]
    located = locate_in_stacks(net, stacks, frames, zoom, decoder=decoder, fine=fine)
    for s, (z, y, x) in zip(samples, located, strict=True):
        lps = s.stack.voxel_to_patient(*s.frame.from_full(z, y, x))
        hits.append((np.rint(z) == np.rint(s.zyx[:, 0]))[s.valid])
        errs.append(np.linalg.norm(lps - s.points, axis=-1)[s.valid])
    return np.concatenate(hits), np.concatenate(errs)


def evaluate_localizer(
    net: nn.Module,
    samples: Sequence[LocalizerSample],
    zoom: float,
    decoder: str = "ordered",
    fine: float = 0.0,
) -> dict[str, float]:
    """Validation as prediction does it: right-slice rate, median and 90th percentile error (mm)."""
    return summarize_hits_errors(*localizer_hits_errors(net, samples, zoom, decoder, fine))


def summarize_hits_errors(hits: np.ndarray, err: np.ndarray) -> dict[str, float]:
    """Slice accuracy, median and 90th percentile error of :func:`localizer_hits_errors`."""
    return {
        "slice_acc": float(hits.mean()),
        "median_mm": float(np.median(err)),
        "p90_mm": float(np.quantile(err, 0.9)),
    }


def localize_study(
    localizer: Localizer, stacks: Mapping[str, Sequence[CachedStack]]
) -> StudyPoints:
    """All 25 points of a study from its chosen stacks (description -> stacks; first = chosen).

    Networks read the sagittal series; the canal from the foramina (no T2) and the recesses come
    from the learned offsets. Points that cannot be found stay NaN (the grader then falls back).
    """
    return localize_studies(localizer, {0: stacks})[0]


# A study's centre of the levels, per localiser task: full-resolution canonical (y, x) of the task's
# chosen stack (see SagittalFrame; these coordinates depend on the stack only, so folds share them).
Centres = Mapping[int, Mapping[str, tuple[float, float]]]


def _task_stacks(
    localizer: Localizer, studies: Mapping[int, Mapping[str, Sequence[CachedStack]]], name: str
) -> list[tuple[int, CachedStack]]:
    """(study, chosen stack) of every study the localiser's ``name`` net can read."""
    task = LOCALIZER_TASKS[name]
    if localizer.nets.get(name) is None:
        return []
    return [(sid, st[task.description][0]) for sid, st in studies.items()
            if st.get(task.description)]  # fmt: skip


def first_look_centres(
    localizer: Localizer,
    studies: Mapping[int, Mapping[str, Sequence[CachedStack]]],
    batch_size: int = 8,
) -> dict[int, dict[str, tuple[float, float]]]:
    """Where each study's zoomed look would be centred: the middle of the whole look's levels."""
    out: dict[int, dict[str, tuple[float, float]]] = {sid: {} for sid in studies}
    for name in LOCALIZER_TASKS:
        todo = _task_stacks(localizer, studies, name)
        if not todo:
            continue
        frames = [sagittal_frame(s, localizer.image_size, localizer.max_slices) for _, s in todo]
        found = locate_in_stacks(
            localizer.nets[name], [s for _, s in todo], frames, 0.0, batch_size,
            decoder=localizer.decoder,
        )  # fmt: skip
        for (sid, _), f in zip(todo, found, strict=True):
            out[sid][name] = _look_centre(f)
    return out


def localize_studies(
    localizer: Localizer,
    studies: Mapping[int, Mapping[str, Sequence[CachedStack]]],
    batch_size: int = 8,
    centres: Centres | None = None,
) -> dict[int, StudyPoints]:
    """:func:`localize_study` for many studies, the network passes batched across studies.

    ``centres`` (study -> task -> (y, x), e.g. :func:`localize_consensus`'s) centre the zoomed
    looks of the tasks every study has one for, in place of each study's own whole look.
    """
    found: dict[int, StudyPoints] = {sid: StudyPoints() for sid in studies}
    for name, task in LOCALIZER_TASKS.items():
        todo = _task_stacks(localizer, studies, name)
        if not todo:
            continue
        frames = [sagittal_frame(s, localizer.image_size, localizer.max_slices) for _, s in todo]
        stacks = [s for _, s in todo]
        given = [(centres or {}).get(sid, {}).get(name) for sid, _ in todo]
        located = locate_in_stacks(
            localizer.nets[name],
            stacks,
            frames,
            localizer.zoom,
            batch_size,
            decoder=localizer.decoder,
            fine=localizer.fine,
            centres=given if all(c is not None for c in given) else None,  # type: ignore[arg-type]
        )
        for (sid, stack), frame, (z, y, x) in zip(todo, frames, located, strict=True):
            lps = stack.voxel_to_patient(*frame.from_full(z, y, x))
            for i, (condition, level) in enumerate(task.targets):
                found[sid].set(condition, level, lps[i])
    return {
        sid: derive_points(
            fuse_level_points(p, localizer.offsets, localizer.fuse_mm), localizer.offsets
        )
        for sid, p in found.items()
    }


def localize_consensus(
    localizers: Sequence[Localizer],
    stacks: Mapping[str, Sequence[CachedStack]],
    map_fn: Callable[..., Iterable[Any]] = map,
) -> StudyPoints:
    """Several folds' localisers on one study -> one point per target.

    The zoomed look names the levels, and it names them by where it is centred more than by
    what it sees: centred on the true middle of the discs, the quick localisers name real
    spines far better than centred on their own whole look (BENCHMARKS.md, "Real anatomy",
    fourth round). So the folds first agree on the centre (the median of their whole looks'
    centres, which outvotes a fold whose whole look slid by a disc), every fold looks there,
    and their points are combined by :func:`consensus_points`. The same number of network
    passes as each fold localising alone. ``map_fn`` runs the folds' looks (e.g. a thread
    pool's ``map``; results in the folds' order, so the points do not depend on it).
    """
    if len(localizers) == 1 or not all(0 < loc.zoom < 1 for loc in localizers):
        return consensus_points(list(map_fn(lambda loc: localize_study(loc, stacks), localizers)))
    own = list(map_fn(lambda loc: first_look_centres(loc, {0: stacks})[0], localizers))
    shared: dict[str, tuple[float, float]] = {}
    for name in LOCALIZER_TASKS:
        cs = [c[name] for c in own if name in c]
        if cs:
            cy, cx = np.median(np.array(cs), axis=0)
            shared[name] = (float(cy), float(cx))

    def look_there(loc: Localizer) -> StudyPoints:
        return localize_studies(loc, {0: stacks}, centres={0: shared})[0]

    return consensus_points(list(map_fn(look_there, localizers)))


def consensus_points(points: Sequence[StudyPoints]) -> StudyPoints:
    """Several folds' points of one study -> one point per target: the per-coordinate median.

    Folds name the discs independently, and the commonest large error on real spines is a fold
    taking a run of levels one disc too high or too low (BENCHMARKS.md, "Real anatomy"). With the
    median, a fold that did so is outvoted when the others agree (a mean would put the point
    between two discs). Targets that no fold located stay NaN.
    """
    xyz = np.stack([p.xyz for p in points])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN targets: NaN, as meant
        return StudyPoints(np.nanmedian(xyz, axis=0))


# ----------------------------------------------------------------------------------- errors


def point_errors(
    study_id: int, pred: StudyPoints, true: StudyPoints, stacks: Mapping[str, Sequence[CachedStack]]
) -> list[dict]:
    """Per labelled point: 3D error (mm) and whether the predicted slice is the labelled one.

    The slice is judged in the series the condition is graded on (sagittal: the chosen stack;
    axial: the nearest stack and slice after projection).
    """
    rows = []
    for condition in CONDITIONS:
        desc = CONDITION_SERIES[condition]
        for level in LEVELS:
            t = true.get(condition, level)
            if t is None:
                continue
            p = pred.get(condition, level)
            row = {
                "study_id": study_id, "condition": condition, "level": level,
                "group": CONDITION_GROUP[condition], "error_mm": np.nan, "slice_ok": False,
            }  # fmt: skip
            if p is not None:
                row["error_mm"] = float(np.linalg.norm(p - t))
                row["slice_ok"] = _same_slice(p, t, stacks.get(desc, []), desc == AX_T2)
            rows.append(row)
    return rows


def _same_slice(p: np.ndarray, t: np.ndarray, stacks: Sequence[CachedStack], axial: bool) -> bool:
    if not stacks:
        return False
    if axial:
        return project_point(p, stacks)[:2] == project_point(t, stacks)[:2]
    zp, zt = stacks[0].patient_to_voxel(p)[0], stacks[0].patient_to_voxel(t)[0]
    return int(np.rint(zp)) == int(np.rint(zt))


def summarize_errors(rows) -> dict[str, dict[str, float]]:
    """Median and 90th percentile error (mm), slice accuracy and misses per point type."""
    import pandas as pd

    df = pd.DataFrame(rows)
    out: dict[str, dict[str, float]] = {}
    if df.empty:
        return out
    for group, g in df.groupby("group", sort=False):
        err = g["error_mm"].dropna()
        out[str(group)] = {
            "n": len(g),
            "median_mm": float(err.median()) if len(err) else float("nan"),
            "p90_mm": float(err.quantile(0.9)) if len(err) else float("nan"),
            "slice_acc": float(g["slice_ok"].mean()),
            "missed": int(g["error_mm"].isna().sum()),
        }
    return out
