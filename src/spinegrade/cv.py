"""Cross-validation and the run folder: train every fold, predict out-of-fold, merge, score.

Run folder (self-contained: prediction rebuilds everything from it)::

    RUN_DIR/config.yaml            resolved config (data and cache folders included)
    RUN_DIR/folds.csv              study_id,fold (made once, reused by every later call)
    RUN_DIR/fold_K/                one per fold; a fold is complete when metrics.json exists
        localizer_{spinal,foraminal}.safetensors + .json, localizer_geometry.json
        grader_{spinal,foraminal,subarticular}.safetensors + .json
        fallback.json              training-fold constant for targets no series can show
        log.jsonl                  one JSON line per stage and epoch (loss, val metrics, speed)
        oof.csv, localizer_errors.csv, metrics.json
        checkpoints/               per-epoch checkpoints while a stage trains (removed after)
    RUN_DIR/oof.csv, localizer_errors.csv, cv.json   written by :func:`merge_run`

Every out-of-fold number is made the way prediction works: the fold's own localiser finds the
points (never the true ones), the crops are cut there and the fold's graders grade them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from spinegrade.cache import CachedStack
from spinegrade.config import Config, CropConfig, load_config, save_config
from spinegrade.constants import (
    COLUMN_CONDITION,
    COLUMN_LEVEL,
    CONDITION_GROUP,
    LABEL_COLUMNS,
    LEVELS,
    PROB_COLUMNS,
    submission_row_ids,
)
from spinegrade.crops import StudyPoints, make_crops
from spinegrade.datasets import (
    GROUP_CONDITIONS,
    GraderDataset,
    LocalizerDataset,
    StudyData,
    collate_levels,
    collate_stacks,
    load_studies,
)
from spinegrade.localize import (
    LOCALIZER_TASKS,
    Localizer,
    LocalizerSample,
    build_localizer_samples,
    derive_points,
    evaluate_localizer,
    fit_offsets,
    localize_study,
    point_errors,
    summarize_errors,
)
from spinegrade.losses import grading_loss, localizer_loss
from spinegrade.train import FitSpec, JsonlLog, Runtime, fit, setup_runtime

log = logging.getLogger(__name__)
GROUPS_ALL: tuple[str, ...] = tuple(GROUP_CONDITIONS)
# Config keys that say where and how a run executes, not what it trains: they may differ
# between the calls that train the folds of one run folder.
RUNTIME_KEYS = frozenset(
    f"train.{k}"
    for k in ("folds", "fold_workers", "num_workers", "accelerator", "devices", "strategy",
              "amp", "channels_last", "eval_batch_size", "log_every", "eval_every")
)  # fmt: skip


# ------------------------------------------------------------------ per-study inference (shared)


@dataclass
class FoldModels:
    """Everything one fold needs to predict a study: localise + crop + grade (+ fallback)."""

    localizer: Localizer
    graders: dict[str, nn.Module]  # group -> SpineGrader
    fallback: np.ndarray  # (25, 3) probabilities for targets that cannot be graded
    crops: CropConfig
    prior_mix: float = 0.0  # weight of the fallback mixed into every graded prediction


@dataclass
class StudyPrediction:
    probs: np.ndarray  # (25, 3) in LABEL_COLUMNS order
    points: StudyPoints
    graded: np.ndarray  # bool (25,): False where the fallback was used


@torch.no_grad()
def grade_crops(
    graders: Mapping[str, nn.Module], crops: Mapping[str, np.ndarray], batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Crops by label column -> class probabilities (3,) by label column (eval mode, no grad)."""
    out: dict[str, np.ndarray] = {}
    by_group: dict[str, list[str]] = {}
    for col in crops:
        by_group.setdefault(CONDITION_GROUP[COLUMN_CONDITION[col]], []).append(col)
    for group, cols in by_group.items():
        model = graders.get(group)
        if model is None:
            continue
        device = next(model.parameters()).device
        for i in range(0, len(cols), batch_size):
            part = cols[i : i + batch_size]
            x = torch.from_numpy(np.stack([crops[c] for c in part])).to(device)
            level = torch.tensor([LEVELS.index(COLUMN_LEVEL[c]) for c in part], device=device)
            probs = model.eval()(x, level)[:, 0].float().softmax(-1).cpu().numpy()
            out.update(zip(part, probs, strict=True))
    return out


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
    models: FoldModels, stacks: Mapping[str, Sequence[CachedStack]], points: StudyPoints
) -> StudyPrediction:
    """Grade a study at given points (localised, or true ones to measure the localiser's cost)."""
    graded = _graded_tta(models, stacks, points) if stacks else {}
    probs = models.fallback.copy()
    mask = np.zeros(len(LABEL_COLUMNS), dtype=bool)
    for j, col in enumerate(LABEL_COLUMNS):
        if col in graded:
            mixed = (1.0 - models.prior_mix) * graded[col] + models.prior_mix * models.fallback[j]
            probs[j], mask[j] = mixed, True
    return StudyPrediction(probs, points, mask)


def _graded_tta(models: FoldModels, stacks, points: StudyPoints) -> dict[str, np.ndarray]:
    """Mean probabilities over the centred crop and ``crops.tta`` jittered ones (seeded)."""
    rng = np.random.default_rng(0)  # the same jitters for every study and run
    views = [make_crops(stacks, points, models.crops)]
    views += [make_crops(stacks, points, models.crops, rng=rng) for _ in range(models.crops.tta)]
    sums: dict[str, np.ndarray] = {}
    for view in views:
        for col, p in grade_crops(models.graders, view).items():
            sums[col] = sums.get(col, 0.0) + p
    return {col: s / len(views) for col, s in sums.items()}


def load_fold_models(fold_dir: str | Path, device: str = "cpu") -> FoldModels:
    """Rebuild a trained fold from its folder (weights + sidecars + JSON, no pickles)."""
    from spinegrade.models.registry import load_model

    fold_dir = Path(fold_dir)
    cfg = load_config(fold_dir.parent / "config.yaml")
    graders = {}
    for group in GROUPS_ALL:
        path = fold_dir / f"grader_{group}.safetensors"
        if path.is_file():
            graders[group] = load_model(path, device=device)[0]
    fallback = _read_fallback(fold_dir / "fallback.json")
    localizer = Localizer.load(fold_dir, device)
    return FoldModels(localizer, graders, fallback, cfg.crops, cfg.train.prior_mix)


def _read_fallback(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the fold did not finish training")
    data = json.loads(path.read_text())
    if list(data["columns"]) != list(LABEL_COLUMNS):
        raise ValueError(f"{path}: columns do not match the 25 label columns")
    return np.asarray(data["probs"], dtype=np.float64)


def predictions_frame(study_ids: Sequence[int], probs: Mapping[int, np.ndarray]) -> pd.DataFrame:
    """Submission-format table (row_id + 3 probabilities), rows in the sample submission order."""
    rows = submission_row_ids(list(study_ids))
    col_index = {c: j for j, c in enumerate(LABEL_COLUMNS)}
    values = np.stack([probs[int(r.split("_", 1)[0])][col_index[r.split("_", 1)[1]]] for r in rows])
    out = pd.DataFrame(values, columns=list(PROB_COLUMNS))
    out.insert(0, "row_id", rows)
    return out


# ------------------------------------------------------------------------------ stage-1 training


class _LocalizerLoss:
    """``step_loss`` of :func:`spinegrade.train.fit` for the localiser."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = model(batch["volume"], batch["mask"])
        return localizer_loss(out, batch["xy"], batch["z"], batch["valid"], sigma=self.sigma)


def train_localizer(
    cfg: Config,
    samples: Mapping[str, Sequence[LocalizerSample]],
    val_samples: Mapping[str, Sequence[LocalizerSample]],
    runtime: Runtime,
    ckpt_dir: Path | None = None,
    log_fn=None,
    seed: int = 0,
) -> dict[str, nn.Module]:
    """Train one stage-1 network per task (tasks without samples are skipped)."""
    from spinegrade.models.registry import build_localizer

    c = cfg.localizer
    nets: dict[str, nn.Module] = {}
    for name, task in LOCALIZER_TASKS.items():
        if not samples.get(name):
            continue
        torch.manual_seed(seed)  # the initial weights too: a rerun gives the same fold
        net = build_localizer(cfg, n_targets=len(task.targets))
        spec = FitSpec(
            f"localizer_{name}", c.epochs, c.batch_size, c.lr, cfg.optim, c.weight_decay, seed,
            average=cfg.train.weight_average, eval_every=cfg.train.eval_every,
        )  # fmt: skip
        dataset = LocalizerDataset(samples[name], augment=True, zoom=c.zoom, seed=seed)
        val = list(val_samples.get(name, []))

        def evaluate(m: nn.Module, v=val) -> dict[str, float]:
            return evaluate_localizer(m, v, c.zoom)

        ckpt = ckpt_dir / f"localizer_{name}" if ckpt_dir else None
        loss = _LocalizerLoss(c.sigma)
        fit(
            net,
            dataset,
            collate_stacks,
            loss,
            spec,
            runtime,
            ckpt,
            log_fn,
            evaluate if val else None,
        )
        nets[name] = net.eval()
    return nets


# ------------------------------------------------------------------------------ stage-2 training


class _GraderLoss:
    """``step_loss`` for :func:`spinegrade.train.fit`: weighted CE (+ any-severe for spinal)."""

    def __init__(self, cfg: Config, group: str) -> None:
        self.loss, self.any_weight = (
            cfg.loss,
            cfg.loss.any_severe_weight if group == "spinal" else 0.0,
        )

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = model(batch["x"], batch["level"])
        return grading_loss(
            logits, batch["labels"][:, None], study_index=batch["study"],
            any_severe_weight=self.any_weight, class_weights=self.loss.class_weights,
            label_smoothing=self.loss.label_smoothing,
        )  # fmt: skip


def train_grader(
    cfg: Config,
    group: str,
    train: Sequence[StudyData],
    val: Sequence[StudyData],
    points: Mapping[int, StudyPoints],
    runtime: Runtime,
    ckpt_path: Path | None = None,
    log_fn=None,
    seed: int = 0,
) -> nn.Module:
    """Train the stage-2 model of one group on crops around the (jittered) true points."""
    from spinegrade.models.registry import build_grader

    torch.manual_seed(seed)
    model = build_grader(cfg, n_targets=1)
    t = cfg.train
    dataset = GraderDataset(train, points, group, cfg.crops, augment=True, seed=seed)
    if len(dataset) == 0:
        raise ValueError(f"no {group} training crops: check the labels and the cache")
    val_set = GraderDataset(val, points, group, cfg.crops, augment=False)
    items = max(1, t.batch_size // len(LEVELS))  # an item holds the five levels of a study
    spec = FitSpec(
        f"grader_{group}", t.epochs, items, t.lr, cfg.optim, seed=seed, average=t.weight_average,
        eval_every=t.eval_every,
    )  # fmt: skip
    loss = _GraderLoss(cfg, group)
    evaluate = (
        (lambda m: _evaluate_grader(m, val_set, loss, runtime, t.eval_batch_size))
        if len(val_set)
        else None
    )
    fit(model, dataset, collate_levels, loss, spec, runtime, ckpt_path, log_fn, evaluate)
    return model.eval()


def _evaluate_grader(
    model, dataset: GraderDataset, loss, runtime: Runtime, batch_rows: int
) -> dict:
    """Validation loss on crops at the true points (no jitter)."""
    from spinegrade.train import to_device

    per = max(1, batch_rows // len(LEVELS))
    total, weight = 0.0, 0
    for i in range(0, len(dataset), per):
        batch = to_device(
            collate_levels([dataset[k] for k in range(i, min(i + per, len(dataset)))]), runtime
        )
        with runtime.autocast():
            parts = loss(model, batch)
        n = int((batch["labels"] >= 0).sum())
        total, weight = total + float(parts["loss"]) * n, weight + n
    return {"loss": total / max(weight, 1)}


# ------------------------------------------------------------------------------------- one fold


def fold_dir(run_dir: Path, fold: int) -> Path:
    return Path(run_dir) / f"fold_{fold}"


def fold_done(run_dir: Path, fold: int) -> bool:
    return (fold_dir(run_dir, fold) / "metrics.json").is_file()


def run_fold(
    cfg: Config,
    fold: int,
    folds: pd.DataFrame,
    studies: Mapping[int, StudyData],
    loc_samples: Mapping[str, Mapping[int, object]],
    labels: pd.DataFrame,
    run_dir: Path,
    runtime: Runtime,
) -> dict | None:
    """Train (or resume) one fold and write its out-of-fold predictions and metrics."""
    from spinegrade.metrics import best_constant_probs
    from spinegrade.weights import save_weights

    out = fold_dir(run_dir, fold)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seed = cfg.seed * 100 + fold
    train_ids = [int(s) for s in folds.loc[folds["fold"] != fold, "study_id"] if int(s) in studies]
    val_ids = [int(s) for s in folds.loc[folds["fold"] == fold, "study_id"] if int(s) in studies]
    log_fn = JsonlLog(out / "log.jsonl", enabled=runtime.is_main)
    ckpt = out / "checkpoints"
    timing: dict[str, float] = {}

    localizer = _stage1(
        cfg, out, ckpt, train_ids, val_ids, studies, loc_samples, runtime, log_fn, seed
    )
    timing["localizer_s"] = round(time.perf_counter() - t0, 1)
    # Training crops: true points; recesses without a label come from the canal + offsets.
    points = {s: derive_points(studies[s].points, localizer.offsets) for s in train_ids + val_ids}
    graders: dict[str, nn.Module] = {}
    for group in cfg.train.groups:
        t1 = time.perf_counter()
        path = out / f"grader_{group}.safetensors"
        if path.is_file():
            from spinegrade.models.registry import load_model

            graders[group] = load_model(path, device=str(runtime.device))[0]
            continue
        model = train_grader(
            cfg, group, [studies[s] for s in train_ids], [studies[s] for s in val_ids], points,
            runtime, ckpt / f"grader_{group}", log_fn, seed,
        )  # fmt: skip
        if runtime.is_main:
            save_weights(model, path, meta={"fold": fold, "group": group, "config": cfg.to_dict()})
        graders[group] = model
        timing[f"grader_{group}_s"] = round(time.perf_counter() - t1, 1)
    runtime.barrier()
    if not runtime.is_main:
        return None
    train_wide = labels[labels["study_id"].isin(train_ids)]
    fallback = best_constant_probs(train_wide)
    (out / "fallback.json").write_text(
        json.dumps({"columns": list(LABEL_COLUMNS), "probs": fallback.tolist()}, indent=1)
    )
    t2 = time.perf_counter()
    models = FoldModels(localizer, graders, fallback, cfg.crops, cfg.train.prior_mix)
    metrics = _write_oof(models, fold, val_ids, studies, labels, out)
    timing["oof_s"] = round(time.perf_counter() - t2, 1)
    timing["total_s"] = round(time.perf_counter() - t0, 1)
    metrics.update(
        {"fold": fold, "n_train": len(train_ids), "n_val": len(val_ids), "timing": timing}
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


def _stage1(
    cfg, out, ckpt, train_ids, val_ids, studies, loc_samples, runtime, log_fn, seed
) -> Localizer:
    """Train (or reload) the fold's localiser."""
    if (out / "localizer_geometry.json").is_file():
        return Localizer.load(out, str(runtime.device))
    offsets = fit_offsets([studies[s].points for s in train_ids])

    def pick(ids: list[int]) -> dict[str, list[LocalizerSample]]:
        return {t: [m[s] for s in ids if s in m] for t, m in loc_samples.items()}

    nets = train_localizer(cfg, pick(train_ids), pick(val_ids), runtime, ckpt, log_fn, seed)
    c = cfg.localizer
    localizer = Localizer(nets, offsets, c.image_size, c.max_slices, c.zoom, c.fuse_mm)
    if runtime.is_main:
        localizer.save(out, meta={"config": cfg.to_dict()})
    return localizer


def _write_oof(models: FoldModels, fold: int, val_ids, studies, labels, out: Path) -> dict:
    """Out-of-fold predictions (predicted points), localiser errors, fold metrics."""
    from spinegrade.metrics import score_frames

    probs, errors, n_fallback = {}, [], 0
    for sid in val_ids:
        study = studies[sid]
        pred = predict_study(models, study.stacks)
        probs[sid] = pred.probs
        n_fallback += int((~pred.graded & (study.labels >= 0)).sum())
        errors += point_errors(sid, pred.points, study.points, study.stacks)
    oof = predictions_frame(val_ids, probs)
    oof.to_csv(out / "oof.csv", index=False)
    err = pd.DataFrame(errors)
    err.insert(0, "fold", fold)
    err.to_csv(out / "localizer_errors.csv", index=False)
    scores = score_frames(labels[labels["study_id"].isin(val_ids)], oof)
    return {"oof": scores, "localizer": summarize_errors(errors), "fallback_cells": n_fallback}


# ---------------------------------------------------------------------------- all folds, merge


def cross_validate(
    data_dir: str | Path,
    cache_dir: str | Path,
    run_dir: str | Path,
    cfg: Config,
    folds_to_run: Sequence[int] | None = None,
    progress: bool = True,
) -> dict | None:
    """Train the requested folds (default: all) into ``run_dir``; merge when every fold is done.

    Completed folds are skipped and an interrupted one resumes from its checkpoints, so the same
    command can be repeated, or run with ``folds_to_run=[k]`` on different machines sharing the
    run folder (then :func:`merge_run`). Returns the cv.json content once all folds exist.
    """
    from spinegrade.rsna import load_dataset

    runtime = setup_runtime(cfg.train)
    run_dir = Path(run_dir)
    cfg.data.data_dir, cfg.data.cache_dir = (
        str(Path(data_dir).resolve()),
        str(Path(cache_dir).resolve()),
    )
    if runtime.is_main:
        _write_or_check_config(cfg, run_dir)
    ds = load_dataset(data_dir)
    folds = _folds(run_dir, ds.labels, cfg, runtime)
    all_folds = sorted(int(k) for k in folds["fold"].unique())
    wanted = list(folds_to_run if folds_to_run is not None else (cfg.train.folds or all_folds))
    unknown = sorted(set(wanted) - set(all_folds))
    if unknown:
        raise ValueError(
            f"folds {unknown} do not exist in {run_dir / 'folds.csv'} (folds {all_folds})"
        )
    todo = [k for k in wanted if not fold_done(run_dir, k)]
    workers = _fold_workers(cfg, runtime, len(todo))
    if workers > 1:
        _train_in_processes(data_dir, cache_dir, run_dir, cfg, todo, workers, progress)
    elif todo:
        _train_here(data_dir, cache_dir, run_dir, cfg, todo, runtime, progress)
    if runtime.is_main and all(fold_done(run_dir, k) for k in all_folds):
        return merge_run(run_dir)
    return None


def _train_here(data_dir, cache_dir, run_dir, cfg, todo, runtime: Runtime, progress: bool) -> None:
    """Train ``todo`` folds one after the other in this process (GPU, DDP or one CPU worker)."""
    from spinegrade.rsna import load_dataset, load_folds, normalize_coordinates

    ds = load_dataset(data_dir)
    folds = load_folds(Path(run_dir) / "folds.csv")
    coords = normalize_coordinates(ds.coordinates) if ds.coordinates is not None else None
    ids = ds.labels["study_id"].tolist()
    studies = load_studies(cache_dir, ids, ds.labels, coords, progress=progress)
    loc_samples = build_localizer_samples(
        {s: (d.stacks, d.points) for s, d in studies.items()}, cfg
    )
    for k in todo:
        if runtime.is_main:
            log.info("fold %d: training (%s)", k, fold_dir(run_dir, k))
        metrics = run_fold(cfg, k, folds, studies, loc_samples, ds.labels, Path(run_dir), runtime)
        if metrics is not None:
            score, secs = metrics["oof"]["score"], metrics["timing"]["total_s"]
            log.info("fold %d: OOF score %.4f in %.0f s", k, score, secs)


def _fold_workers(cfg: Config, runtime: Runtime, n_todo: int) -> int:
    """Processes that train folds side by side: CPU only (one GPU trains one fold at a time).

    The small CPU models gain almost nothing from a second thread (BENCHMARKS.md), but folds in
    single-threaded processes use every core. Automatic choice: the fewest processes (at least
    one per core) such that no round of folds leaves a core idle, e.g. 5 folds on 2 cores run
    as 3 + 2 (2.5 fold-times), not 2 + 2 + 1 (3 fold-times).
    """
    if runtime.device.type != "cpu" or runtime.distributed or n_todo < 2:
        return 1
    if cfg.train.fold_workers:
        return max(1, min(cfg.train.fold_workers, n_todo))
    cores = os.cpu_count() or 1
    for workers in range(min(cores, n_todo), n_todo + 1):
        if n_todo % workers == 0 or n_todo % workers >= cores:
            return workers
    return n_todo


def _train_in_processes(
    data_dir, cache_dir, run_dir, cfg: Config, todo, workers: int, progress: bool = True
) -> None:
    """Train folds in ``workers`` spawned processes, each with its share of the CPU threads.

    A bar counts folds as they finish. The first failure, Ctrl-C or SIGTERM terminates the other
    folds' processes (a rerun resumes them from their checkpoints).
    """
    import multiprocessing as mp
    from concurrent.futures import as_completed

    from tqdm.auto import tqdm

    from spinegrade.parallel import process_pool

    threads = max(1, (os.cpu_count() or 1) // workers)
    log.info("training folds %s in %d processes x %d thread(s)", todo, workers, threads)
    show = progress and os.environ.get("SPINEGRADE_PROGRESS", "1") != "0"
    with (
        process_pool(workers, mp.get_context("spawn")) as pool,
        tqdm(total=len(todo), desc="folds", unit="fold", disable=not show) as bar,
    ):
        futures = {
            pool.submit(_fold_process, (data_dir, cache_dir, run_dir, cfg, [k], threads)): k
            for k in todo
        }
        for fut in as_completed(futures):
            k = futures[fut]
            fut.result()
            path = fold_dir(run_dir, k) / "metrics.json"
            score = json.loads(path.read_text())["oof"]["score"] if path.is_file() else None
            log.info("fold %d: done%s", k, "" if score is None else f" (OOF score {score:.4f})")
            bar.update(1)


def _fold_process(args) -> None:
    """Entry point of a fold-training process (spawned: a fresh interpreter, one fold)."""
    data_dir, cache_dir, run_dir, cfg, todo, threads = args
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ["SPINEGRADE_PROGRESS"] = "0"  # bars of parallel folds would interleave
    runtime = setup_runtime(cfg.train, threads=threads)
    _train_here(data_dir, cache_dir, run_dir, cfg, todo, runtime, progress=False)


def _write_or_check_config(cfg: Config, run_dir: Path) -> None:
    """Save the resolved config; a run folder keeps one config.

    Only where and how it runs may differ between calls (which folds, devices, workers,
    precision), so folds can be trained on different machines and merged.
    """
    from spinegrade.config import ConfigError

    path = run_dir / "config.yaml"
    if path.is_file():
        old = _flat(load_config(path).to_dict())
        new = _flat(cfg.to_dict())
        keys = sorted((set(old) | set(new)) - RUNTIME_KEYS)
        diff = [k for k in keys if old.get(k) != new.get(k)]
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
            raise ConfigError(
                f"{path} holds a run with another config ({shown}); use the same config and "
                "data to continue it, or a new --out folder"
            )
        return
    save_config(cfg, path)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "backbone_kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _folds(run_dir: Path, labels: pd.DataFrame, cfg: Config, runtime: Runtime) -> pd.DataFrame:
    """The run's folds.csv: made once (seeded, stratified, grouped by study), then reused."""
    from spinegrade.rsna import load_folds, make_folds, save_folds

    path = run_dir / "folds.csv"
    if runtime.is_main and not path.is_file():
        save_folds(make_folds(labels, cfg.data.n_folds, cfg.seed), path)
    runtime.barrier()
    return load_folds(path, labels["study_id"].tolist())


def merge_run(run_dir: str | Path, data_dir: str | Path | None = None) -> dict:
    """Merge the folds of a run: oof.csv, localizer_errors.csv and cv.json (returned).

    cv.json holds the OOF metric terms and score, the uniform, class-prior and best-constant
    baselines on the same folds (priors learned on each fold's training part), the localiser's
    errors, per-fold results, and on synthetic data (``DATA_DIR/truth/train_true_probs.csv``) the
    Bayes limit (the true probabilities reweighted 1/2/4, the best expected score) and the score
    of the raw true probabilities.
    """
    from spinegrade.metrics import (
        best_constant_submission,
        prior_submission,
        score_frames,
        uniform_submission,
    )
    from spinegrade.rsna import load_folds, load_train

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    data_dir = Path(data_dir or cfg.data.data_dir)
    folds = load_folds(run_dir / "folds.csv")
    all_folds = sorted(int(k) for k in folds["fold"].unique())
    missing = [k for k in all_folds if not fold_done(run_dir, k)]
    if missing:
        raise FileNotFoundError(
            f"{run_dir}: folds {missing} are not complete (no metrics.json); run "
            f"`spinegrade train DATA --cache CACHE --out {run_dir} --folds "
            f"{' '.join(map(str, missing))}`"
        )
    labels = load_train(data_dir / "train.csv")
    labels = labels[labels["study_id"].isin(folds["study_id"])].reset_index(drop=True)
    oof = pd.concat([pd.read_csv(fold_dir(run_dir, k) / "oof.csv") for k in all_folds])
    oof = oof.sort_values("row_id", kind="stable").reset_index(drop=True)
    oof.to_csv(run_dir / "oof.csv", index=False)
    errors = pd.concat(
        [pd.read_csv(fold_dir(run_dir, k) / "localizer_errors.csv") for k in all_folds]
    )
    errors.to_csv(run_dir / "localizer_errors.csv", index=False)
    prior, best = [], []
    for k in all_folds:
        val = folds.loc[folds["fold"] == k, "study_id"].tolist()
        train_wide = labels[~labels["study_id"].isin(val)]
        prior.append(prior_submission(train_wide, val))
        best.append(best_constant_submission(train_wide, val))
    per_fold = [json.loads((fold_dir(run_dir, k) / "metrics.json").read_text()) for k in all_folds]
    cv = {
        "config": cfg.name,
        "n_studies": len(labels),
        "n_folds": len(all_folds),
        "oof": score_frames(labels, oof),
        "baselines": {
            "uniform": score_frames(labels, uniform_submission(labels["study_id"].tolist())),
            "prior": score_frames(labels, pd.concat(prior)),
            "best_constant": score_frames(labels, pd.concat(best)),
        },
        # Synthetic data only: the best any model can do, and what the true probabilities score.
        **_truth(data_dir, labels),
        "localizer": summarize_errors(errors.to_dict("records")),
        "per_fold": [
            {"fold": m["fold"], **m["oof"], "time_s": m["timing"]["total_s"]} for m in per_fold
        ],
        "fallback_cells": int(sum(m["fallback_cells"] for m in per_fold)),
        "train_time_s": round(sum(m["timing"]["total_s"] for m in per_fold), 1),
    }
    (run_dir / "cv.json").write_text(json.dumps(cv, indent=1))
    return cv


def _truth(data_dir: Path, labels: pd.DataFrame) -> dict[str, dict | None]:
    from spinegrade.phantom import truth_scores

    truth = truth_scores(labels, data_dir / "truth" / "train_true_probs.csv")
    return {"bayes_limit": truth.get("bayes_limit"), "true_probs": truth.get("true_probs")}


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config of a run folder."""
    return load_config(Path(run_dir) / "config.yaml")
