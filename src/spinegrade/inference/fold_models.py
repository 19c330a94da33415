"""Fold models -> graded study: what out-of-fold evaluation and prediction share.

A trained fold is rebuilt from its folder (:func:`load_fold_models`: safetensors weights, JSON
sidecars and ``fallback.json``, never a pickle). :func:`predict_study` localises the disc levels,
cuts the crops there and grades them (with optional test-time jitter); targets no series can show
get the fold's training fallback. Cross-validation calls it on each fold's validation studies,
prediction on new studies with every fold.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from spinegrade.config import CropConfig, load_config
from spinegrade.data.crops import make_crops
from spinegrade.inference.run_folder import grader_file
from spinegrade.localization.derived import fusion_lead
from spinegrade.localization.localize import localize_study
from spinegrade.localization.localizer import Localizer
from spinegrade.localization.points import StudyPoints
from spinegrade.models.grader import GraderMembers
from spinegrade.preprocessing.cache import CachedStack
from spinegrade.task import LEVELS, RSNA_2024, Task, dataset_task
from spinegrade.util.runtime import Runtime


@dataclass
class FoldModels:
    """Everything one fold needs to predict a study: localise + crop + grade (+ fallback)."""

    localizer: Localizer
    graders: dict[str, nn.Module]  # group -> SpineGrader (or its ONNX Runtime twin, see engine)
    fallback: np.ndarray  # (columns, classes) probabilities for targets that cannot be graded
    crops: CropConfig
    prior_mix: float = 0.0  # weight of the fallback mixed into every graded prediction
    # What its networks learned from: role ("localizer", "grader") -> kinds of the sources
    # ("phantom", "real"); empty = not recorded (older runs). See :func:`learned_from`.
    training_data: dict[str, list[str]] = field(default_factory=dict)
    task: Task = RSNA_2024  # what the graders grade (the run's task.yaml)
    engine: str = "torch"  # what runs the networks: "torch", or "onnx" (ONNX Runtime)
    # What each network learned from ("localizer_spinal", "grader_spinal", ...: kinds, as
    # ``training_data`` per role); see :func:`net_kinds`.
    net_data: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class StudyPrediction:
    """One study graded by one fold."""

    probs: np.ndarray  # (columns, classes) in the task's column order ((25, 3) for RSNA)
    points: StudyPoints
    graded: np.ndarray  # bool (columns,): False where the fallback was used


def column_probs(logits: torch.Tensor, columns: Sequence[str], task: Task) -> np.ndarray:
    """A grader's logits (B, T, K) for crops of ``columns`` -> probabilities (B, task.n_classes):
    each column's own output over its condition's grades, zero beyond them (RSNA: output 0)."""
    if task.is_rsna:
        return logits[:, 0].float().softmax(-1).cpu().numpy()
    out = np.zeros((len(columns), task.n_classes))
    for i, col in enumerate(columns):
        c = task.column_condition(col)
        row = logits[i, task.head_of(c.name), : len(c.grades)].float().softmax(-1)
        out[i, : len(c.grades)] = row.cpu().numpy()
    return out


def grade_crops(
    graders: Mapping[str, nn.Module],
    crops: Mapping[str, np.ndarray],
    batch_size: int = 64,
    task: Task = RSNA_2024,
) -> dict[str, np.ndarray]:
    """Crops by label column -> class probabilities by label column (eval mode, no grad)."""
    return _grade_views(graders, task, [(0, [crops])], None, batch_size).get(0, {})


def predict_study(
    models: FoldModels, stacks: Mapping[str, Sequence[CachedStack]]
) -> StudyPrediction:
    """One study with one fold's models; used by out-of-fold evaluation and by prediction.

    With ``crops.tta`` > 0 every target is also graded on that many jittered crops (the training
    jitter: shifts, +-slices, zoom, rotation) and the probabilities are averaged, which
    marginalises over the localiser's few-millimetre errors instead of betting on one crop.
    Graded probabilities are then shrunk towards the training prior by ``prior_mix``: graders
    trained on a few dozen studies are overconfident, and one confident miss of a Severe cell
    (weight 4) costs more than many slightly hedged hits gain.
    """
    points = localize_study(models.localizer, stacks) if stacks else StudyPoints()
    return grade_study(models, stacks, points)


def grade_study(
    models: FoldModels,
    stacks: Mapping[str, Sequence[CachedStack]],
    points: StudyPoints,
    views: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> StudyPrediction:
    """Grade a study at given points (localised, or true ones to measure the localiser's cost).

    ``views``: the study's :func:`crop_views` at ``points`` with ``models.crops``, when the caller
    has cut them already (folds that grade at the same points with the same crop settings see
    the same crops, so an ensemble cuts them once); by default they are cut here.
    """
    if views is None:
        views = crop_views(stacks, points, models.crops, models.task) if stacks else []
    return grade_studies(models, {0: views}, {0: points})[0]


def grade_studies(
    models: FoldModels,
    views: Mapping[int, Sequence[Mapping[str, np.ndarray]]],
    points: Mapping[int, StudyPoints],
    batch_size: int = 64,
    runtime: Runtime | None = None,
) -> dict[int, StudyPrediction]:
    """:func:`grade_study` of many studies at once: every study of ``points`` (study -> points),
    graded on its :func:`crop_views` (study -> views; a study without them gets the fallback).

    Each group's grader sees ``batch_size`` crops of several studies and views a forward pass,
    which uses the cores better than one study's handful; the probabilities are the same up to
    float rounding (a batch only shares the pass).
    """
    graded = _grade_views(models.graders, models.task, views.items(), runtime, batch_size)
    return {sid: _mix(models, graded.get(sid, {}), p) for sid, p in points.items()}


def _mix(models: FoldModels, graded: Mapping[str, np.ndarray], points: StudyPoints):
    """Graded columns shrunk towards the fallback by ``prior_mix``; the fallback elsewhere."""
    probs = models.fallback.copy()
    mask = np.zeros(len(models.task.columns), dtype=bool)
    for j, col in enumerate(models.task.columns):
        if col in graded:
            mixed = (1.0 - models.prior_mix) * graded[col] + models.prior_mix * models.fallback[j]
            probs[j], mask[j] = mixed, True
    return StudyPrediction(probs, points, mask)


def _grade_views(
    graders: Mapping[str, nn.Module],
    task: Task,
    views: Iterable[tuple[int, Sequence[Mapping[str, np.ndarray]]]],
    runtime: Runtime | None,
    batch_size: int,
) -> dict[int, dict[str, np.ndarray]]:
    """(study, its crop views) as they come -> study -> column -> probabilities, the mean over the
    centred crops and the ``crops.tta`` jittered ones; crops of many studies share a batch."""
    from spinegrade.models.registry import device_of

    if runtime is None:
        nets = list(graders.values())
        runtime = Runtime(device_of(nets[0]) if nets else torch.device("cpu"))
    queues = {g: _GroupQueue(m, batch_size, runtime, task) for g, m in graders.items()}
    sums: dict[tuple[int, str], np.ndarray] = {}
    n_views: dict[int, int] = {}
    for sid, study_views in views:
        n_views[sid] = len(study_views)
        for view in study_views:
            for col, crop in view.items():
                queue = queues.get(task.column_condition(col).group)
                if queue is not None:
                    queue.add((sid, col), crop, sums)
    for queue in queues.values():
        queue.flush(sums)
    graded: dict[int, dict[str, np.ndarray]] = {sid: {} for sid in n_views}
    for (sid, col), total in sums.items():
        graded[sid][col] = total / n_views[sid]
    return graded


def crop_views(
    stacks: Mapping[str, Sequence[CachedStack]],
    points: StudyPoints,
    cfg: CropConfig,
    task: Task = RSNA_2024,
) -> list[dict[str, np.ndarray]]:
    """The centred crops of a study and ``cfg.tta`` jittered sets (seeded per study)."""
    rng = np.random.default_rng(0)  # the same jitters for every study and run
    views = [make_crops(stacks, points, cfg, task=task)]
    return views + [make_crops(stacks, points, cfg, rng=rng, task=task) for _ in range(cfg.tta)]


# --------------------------------------------------------------------- many studies at once


class _StudyViews(Dataset):
    """Item i: (study id, :func:`crop_views` of study i), cut in DataLoader worker processes."""

    def __init__(
        self,
        items: Sequence[tuple[int, Mapping, StudyPoints]],
        cfg: CropConfig,
        task: Task = RSNA_2024,
    ) -> None:
        self.items, self.cfg, self.task = list(items), cfg, task

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, list[dict[str, np.ndarray]]]:
        sid, stacks, points = self.items[i]
        return sid, (crop_views(stacks, points, self.cfg, self.task) if stacks else [])


class _GroupQueue:
    """Crops of one grader's group from many studies, graded ``batch_size`` at a time."""

    def __init__(
        self, model: nn.Module, batch_size: int, runtime: Runtime, task: Task = RSNA_2024
    ) -> None:
        self.model, self.batch_size, self.runtime = model.eval(), batch_size, runtime
        self.task = task
        self.keys: list[tuple[int, str]] = []
        self.crops: list[np.ndarray] = []

    def add(self, key: tuple[int, str], crop: np.ndarray, sums: dict) -> None:
        self.keys.append(key)
        self.crops.append(crop)
        if len(self.keys) >= self.batch_size:
            self.flush(sums)

    @torch.no_grad()
    def flush(self, sums: dict[tuple[int, str], np.ndarray]) -> None:
        if not self.keys:
            return
        device = self.runtime.device
        x = torch.from_numpy(np.stack(self.crops)).to(device, non_blocking=True)
        lv = [LEVELS.index(self.task.column_level(c)) for _, c in self.keys]
        with self.runtime.autocast():
            logits = self.model(x, torch.tensor(lv, device=device))
        probs = column_probs(logits, [c for _, c in self.keys], self.task)
        for key, p in zip(self.keys, probs, strict=True):
            sums[key] = sums.get(key, 0.0) + p
        self.keys, self.crops = [], []


def predict_studies(
    models: FoldModels,
    studies: Mapping[int, Mapping[str, Sequence[CachedStack]]],
    runtime: Runtime | None = None,
    batch_size: int = 64,
    workers: int = 0,
) -> dict[int, StudyPrediction]:
    """:func:`predict_study` for many studies, batched across them (the same numbers up to float
    rounding; under autocast on CUDA they are bf16/fp16 numbers).

    The localiser decodes every study (:func:`spinegrade.localization.localize.localize_studies`,
    batched forward passes), ``workers`` DataLoader processes cut each study's crop views, and each
    group's grader sees ``batch_size`` crops of several studies a forward pass: on a GPU the
    per-study batches of 5-10 crops would leave it mostly idle.
    """
    from spinegrade.localization.localize import localize_studies
    from spinegrade.models.registry import device_of

    if runtime is None:
        nets = [*models.graders.values(), *models.localizer.nets.values()]
        runtime = Runtime(device_of(nets[0]) if nets else torch.device("cpu"))
    points = localize_studies(models.localizer, studies, batch_size=max(1, batch_size // 8))
    items = [(sid, studies[sid], points[sid]) for sid in studies]
    ctx = "fork" if workers and "fork" in mp.get_all_start_methods() else None
    loader = DataLoader(
        _StudyViews(items, models.crops, models.task), batch_size=None, num_workers=workers,
        multiprocessing_context=ctx,
    )  # fmt: skip
    graded = _grade_views(models.graders, models.task, loader, runtime, batch_size)
    return {sid: _mix(models, graded.get(sid, {}), points[sid]) for sid in studies}


def load_fold_models(
    fold_dir: str | Path, device: str = "cpu", engine: str = "torch"
) -> FoldModels:
    """Rebuild a trained fold from its folder (weights + sidecars + JSON, no pickles).

    ``engine`` "onnx": the networks are the fold's checked ONNX exports, run by ONNX Runtime on
    the CPU (:func:`spinegrade.models.onnx.load_onnx`, which refuses an export older than its
    weights); "torch": the safetensors weights in torch on ``device``.
    """
    from spinegrade.models.registry import load_model

    def load(path: Path):
        if engine == "onnx":
            from spinegrade.models.onnx import load_onnx

            return load_onnx(path)
        net = load_model(path, device=device)[0]
        # Convolution kernels in channels-last order: oneDNN's (CPU) and cuDNN's fast layout.
        # The same numbers up to float rounding (~1e-7); the 5-fold ensemble of the quick recipe
        # predicts ~20% faster on 2 CPU cores (BENCHMARKS.md, "Prediction latency").
        return net.to(memory_format=torch.channels_last)

    fold_dir = Path(fold_dir)
    cfg = load_config(fold_dir.parent / "config.yaml")
    task = dataset_task(fold_dir.parent)  # the run's task.yaml; older runs graded RSNA
    graders = {}
    for group in task.groups:
        path = grader_file(fold_dir, group)
        # A group the run trains must have its weights: never a silent prior for its targets,
        # nor a member fewer than the run trained (train.members) without a word.
        if group in task.select_groups(cfg.train.groups) or path.is_file():
            members = [load(grader_file(fold_dir, group, k)) for k in range(cfg.train.members)]
            graders[group] = members[0] if len(members) == 1 else GraderMembers(members)
    fallback = _read_fallback(fold_dir / "fallback.json", task)
    localizer = Localizer.load(fold_dir, device, engine)
    if engine != "onnx":
        for net in localizer.nets.values():
            net.to(memory_format=torch.channels_last)  # as the graders' (see load above)
    metrics_path = fold_dir / "metrics.json"  # written last by training; older runs lack it
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    trained_on, per_net = learned_from(metrics), net_kinds(metrics)
    if localizer.fuse_lead is None:  # saved before the lead was: decided as training now does
        localizer.fuse_lead = fusion_lead(localizer_kinds(per_net))
    return FoldModels(
        localizer, graders, fallback, cfg.crops, cfg.train.prior_mix, trained_on, task, engine,
        {net: sorted(kinds) for net, kinds in per_net.items()},
    )  # fmt: skip


def learned_from(metrics: Mapping) -> dict[str, list[str]]:
    """A fold's ``metrics.json`` -> role ("localizer", "grader") -> kinds of data it learned from.

    Folds record per network the studies of each source it learned from (``training_data``) and
    each source's kind (``sources``); folds from before several sources recorded one word for
    the fold ("phantom" or "images"), and older ones nothing (empty result).
    """
    recorded = metrics.get("training_data")
    if not recorded:
        return {}
    if isinstance(recorded, str):
        kinds = ["phantom" if recorded == "phantom" else "real"]
        return {"localizer": kinds, "grader": kinds}
    out: dict[str, set[str]] = {}
    for net, kinds in net_kinds(metrics).items():
        role = "localizer" if net.startswith("localizer") else "grader"
        out.setdefault(role, set()).update(kinds)
    return {role: sorted(kinds) for role, kinds in out.items()}


def net_kinds(metrics: Mapping) -> dict[str, set[str]]:
    """A fold's ``metrics.json`` -> network ("localizer_spinal", "grader_spinal", ...) -> kinds
    of the sources it learned from; empty where the fold recorded none per network."""
    recorded = metrics.get("training_data")
    if not isinstance(recorded, Mapping):
        return {}
    kind_of = {name: s.get("kind", "real") for name, s in metrics.get("sources", {}).items()}
    return {
        net: {kind_of.get(n, "real") for n, c in counts.items() if c}
        for net, counts in recorded.items()
    }


def localizer_kinds(per_net: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """Per-network kinds (:func:`net_kinds`, ``FoldModels.net_data``) -> stage-1 task name
    ("spinal", "foraminal") -> kinds, for the localiser's nets alone."""
    return {
        net.removeprefix("localizer_"): set(kinds)
        for net, kinds in per_net.items()
        if net.startswith("localizer_")
    }


def _read_fallback(path: Path, task: Task = RSNA_2024) -> np.ndarray:
    """A fold's ``fallback.json`` as (columns, classes) probabilities (:func:`write_fallback`)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the fold did not finish training")
    data = json.loads(path.read_text())
    if list(data["columns"]) != list(task.columns):
        raise ValueError(f"{path}: columns do not match the label columns of task {task.name!r}")
    return np.asarray(data["probs"], dtype=np.float64)


def write_fallback(path: Path, probs: np.ndarray, task: Task = RSNA_2024) -> None:
    """Write a fold's fallback (atomically): probabilities keyed by the task's label columns."""
    from spinegrade.util.atomic import write_json

    write_json(path, {"columns": list(task.columns), "probs": probs.tolist()})
