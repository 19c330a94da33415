"""Cross-validation: train every fold of a run folder, predict out of fold, merge and score.

:func:`cross_validate` trains the folds that are not done, one after the other in this process
(GPU, DDP) or side by side in spawned CPU processes, each through :func:`run_fold`; once every
fold exists, :func:`merge_run` writes the run's ``oof.csv`` and ``cv.json``. The run folder's
layout and config guard are in :mod:`spinegrade.inference.run_folder`, the stage trainers in
:mod:`spinegrade.training.stages`, and the grading of a study, shared with prediction, in
:mod:`spinegrade.inference.fold_models`.

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
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from spinegrade.config import Config, ConfigError
from spinegrade.data.grader_dataset import labelled_conditions
from spinegrade.data.sources import (
    DISCS_FILE,
    TrainingTables,
    configured_sources,
    graded_ids,
    group_counts,
    load_tables,
    load_training_studies,
)
from spinegrade.data.studies import StudyData
from spinegrade.evaluation import grades as grade_scores
from spinegrade.evaluation.anatomy import score_case
from spinegrade.evaluation.metrics import score_frames
from spinegrade.inference.fold_models import FoldModels, predict_studies, write_fallback
from spinegrade.inference.run_folder import (
    ensure_folds,
    fold_dir,
    fold_done,
    grader_file,
    load_run_config,
    write_or_check_config,
    write_or_check_task,
)
from spinegrade.localization.derived import derive_points, fit_offsets, fusion_lead
from spinegrade.localization.errors import point_errors, summarize_errors
from spinegrade.localization.localizer import Localizer
from spinegrade.localization.points import POINT_COLUMNS, StudyPoints, point_rows
from spinegrade.localization.samples import LocalizerSample, build_localizer_samples
from spinegrade.localization.tasks import configured_tasks
from spinegrade.models.grader import GraderMembers
from spinegrade.models.weights import (
    init_source,
    require_pretrained,
    summarize_init,
    weights_complete,
)
from spinegrade.preprocessing.guard import check_cache
from spinegrade.rsna import load_folds
from spinegrade.task import CONDITIONS, RSNA_2024, Task
from spinegrade.training.engine import JsonlLog
from spinegrade.training.init_from import check_init_from
from spinegrade.training.stages import grader_stage, train_grader, train_localizer
from spinegrade.util.atomic import crash_point, write_csv, write_json
from spinegrade.util.runtime import Runtime, fault_point, setup_runtime

log = logging.getLogger(__name__)

# Member k of a group's graders trains from the fold's seed + k * this (member 0: the fold's own).
MEMBER_SEED_STRIDE = 10_007


# ------------------------------------------------------------------------------------ all folds


def _require_disc_centres(tables: TrainingTables, cfg: Config) -> None:
    """Stop before training when a condition's crops are centred on the disc and no folder
    labels a disc centre: the localiser learns where a disc centre lies from its canal point
    only from labelled ones, so prediction could place none of those crops."""
    task = tables.task
    graded = set(task.select_groups(cfg.train.groups))
    on_disc = [c.name for c in task.conditions if c.anchor == "disc_centre" and c.group in graded]
    if on_disc and tables.discs is None:
        raise ValueError(
            f"task {task.name!r} centres the crops of {', '.join(on_disc)} on the disc centre, "
            f"but no data folder labels disc centres ({DISCS_FILE}, as `spinegrade import "
            "spider` writes): add them to a training folder, or anchor those conditions on "
            "the canal in the task's task.yaml"
        )


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
    # Pretrained weights or a clear error now, not after minutes of loading data; then the cache
    # must be the one this config asks for. All before anything is written or trained.
    require_pretrained(cfg)
    check_init_from(cfg, folds_to_run, run_dir, data_dir)  # *.init_from: runs whose nets fit
    configured_tasks(cfg)
    if cfg.train.members < 1:
        raise ConfigError(f"train.members={cfg.train.members}: a group needs one grader or more")
    check_cache(cache_dir, cfg.data, data_dir)
    for extra in configured_sources(cfg)[1:]:
        check_cache(extra.cache_dir, cfg.data, extra.data_dir)
    runtime = setup_runtime(cfg.train)
    try:
        return _cross_validate(
            data_dir, cache_dir, Path(run_dir), cfg, folds_to_run, runtime, progress
        )
    finally:
        runtime.close()


def _cross_validate(
    data_dir, cache_dir, run_dir: Path, cfg: Config, folds_to_run, runtime: Runtime, progress: bool
) -> dict | None:
    """The body of :func:`cross_validate`, once the runtime (and any process group) is set up."""
    cfg.data.data_dir, cfg.data.cache_dir = (
        str(Path(data_dir).resolve()),
        str(Path(cache_dir).resolve()),
    )
    cfg.data.sources = [
        {k: str(Path(v).resolve()) for k, v in entry.items()} for entry in cfg.data.sources
    ]
    if runtime.is_main:
        write_or_check_config(cfg, run_dir)
    tables = load_tables(configured_sources(cfg))
    _require_disc_centres(tables, cfg)
    if runtime.is_main:
        write_or_check_task(tables.task, run_dir)
    folds = ensure_folds(run_dir, tables.labels, cfg, runtime, tables.studies, tables.task)
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
    tables = load_tables(configured_sources(cfg))
    folds = load_folds(Path(run_dir) / "folds.csv")
    # Label maps only where they are learnt: the chosen stack of each series a localiser reads.
    read = [t.description for t in configured_tasks(cfg).values()]
    studies = load_training_studies(
        tables, progress=progress, label_maps=read if cfg.localizer.seg_weight > 0 else ()
    )
    loc_samples = build_localizer_samples(
        {s: (d.stacks, d.points) for s, d in studies.items()}, cfg,
        {s: d.label_maps for s, d in studies.items() if d.label_maps},
    )  # fmt: skip
    for k in todo:
        if runtime.is_main:
            log.info("fold %d: training (%s)", k, fold_dir(run_dir, k))
        metrics = run_fold(cfg, k, folds, studies, loc_samples, tables, Path(run_dir), runtime)
        if metrics is not None:
            secs = metrics["timing"]["total_s"]
            if metrics["oof"] is None:
                log.info("fold %d: localisation only (no grades) in %.0f s", k, secs)
            else:
                log.info("fold %d: OOF score %.4f in %.0f s", k, metrics["oof"]["score"], secs)


# The CPU fold pool lives here rather than in a module of its own: a spawned fold process has to
# reach run_fold, so a separate module would import cv while cv imports it.


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

    from spinegrade.util.parallel import process_pool
    from spinegrade.util.progress import progress_bar

    threads = max(1, (os.cpu_count() or 1) // workers)
    log.info("training folds %s in %d processes x %d thread(s)", todo, workers, threads)
    with (
        process_pool(workers, mp.get_context("spawn")) as pool,
        progress_bar(total=len(todo), desc="folds", unit="fold", enabled=progress) as bar,
    ):
        futures = {
            pool.submit(_fold_process, (data_dir, cache_dir, run_dir, cfg, [k], threads)): k
            for k in todo
        }
        for fut in as_completed(futures):
            k = futures[fut]
            fut.result()
            path = fold_dir(run_dir, k) / "metrics.json"
            oof = json.loads(path.read_text())["oof"] if path.is_file() else None
            score = oof["score"] if oof else None
            log.info("fold %d: done%s", k, "" if score is None else f" (OOF score {score:.4f})")
            bar.update(1)


def _fold_process(args) -> None:
    """Entry point of a fold-training process (spawned: a fresh interpreter, one fold)."""
    data_dir, cache_dir, run_dir, cfg, todo, threads = args
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from spinegrade.util.progress import ENV_VAR

    os.environ[ENV_VAR] = "0"  # bars of parallel folds would interleave
    runtime = setup_runtime(cfg.train, threads=threads)
    _train_here(data_dir, cache_dir, run_dir, cfg, todo, runtime, progress=False)


# ------------------------------------------------------------------------------------- one fold


def run_fold(
    cfg: Config,
    fold: int,
    folds: pd.DataFrame,
    studies: Mapping[int, StudyData],
    loc_samples: Mapping[str, Mapping[int, object]],
    tables: TrainingTables,
    run_dir: Path,
    runtime: Runtime,
) -> dict | None:
    """Train (or resume) one fold and write its out-of-fold predictions and metrics.

    A grader is trained only when the fold's training studies hold labels of its group: a run
    on localisation-only data (an imported real set without grades) trains the localiser, and
    its studies add nothing to (and take nothing from) the graders of a mixed run.
    """
    out = fold_dir(run_dir, fold)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seed = cfg.seed * 100 + fold
    train_ids = [int(s) for s in folds.loc[folds["fold"] != fold, "study_id"] if int(s) in studies]
    val_ids = [int(s) for s in folds.loc[folds["fold"] == fold, "study_id"] if int(s) in studies]
    log_fn = JsonlLog(out / "log.jsonl", enabled=runtime.is_main)
    log_fn({"event": "runtime", **runtime.describe()})  # how this (part of the) fold trained
    ckpt = out / "checkpoints"
    timing: dict[str, float] = {}

    source_of = tables.source_of()
    real = {s for s in train_ids if tables.kinds[source_of[s]] == "real"}
    localizer = _stage1(
        cfg, out, ckpt, train_ids, val_ids, studies, loc_samples, runtime, log_fn, seed, fold, real
    )
    timing["localizer_s"] = round(time.perf_counter() - t0, 1)
    # Training crops: true points; recesses without a label come from the canal + offsets.
    points = {s: derive_points(studies[s].points, localizer.offsets) for s in train_ids + val_ids}
    graders: dict[str, nn.Module] = {}
    taught: dict[str, list[int]] = {}  # network -> training studies whose labels it learned from
    task = tables.task
    for group in task.select_groups(cfg.train.groups):
        taught[f"grader_{group}"] = [
            s for s in train_ids if labelled_conditions(studies[s], group, task)
        ]
        if not taught[f"grader_{group}"]:
            log.info("fold %d: no %s grades among the training studies; no %s grader", fold,
                     group, group)  # fmt: skip
            continue
        t1 = time.perf_counter()
        members, trained = [], False
        for k in range(cfg.train.members):
            model, fresh = _grader_member(
                cfg, group, k, out, ckpt, train_ids, val_ids, studies, points, runtime, log_fn,
                seed, fold, task,
            )  # fmt: skip
            members.append(model)
            trained |= fresh
        graders[group] = members[0] if len(members) == 1 else GraderMembers(members)
        if trained:  # a resumed fold's finished graders took no training time
            timing[f"grader_{group}_s"] = round(time.perf_counter() - t1, 1)
    runtime.barrier("waiting for every rank to finish training")
    labels = tables.labels
    train_wide = labels[labels["study_id"].isin(train_ids)]
    fallback = grade_scores.best_constant_probs(train_wide, task)
    if runtime.is_main:
        write_fallback(out / "fallback.json", fallback, task)
    t2 = time.perf_counter()
    models = FoldModels(localizer, graders, fallback, cfg.crops, cfg.train.prior_mix, task=task)
    # Every rank grades its share of the validation studies; rank 0 gathers and writes.
    part = _grade_oof(models, runtime.shard(val_ids), studies, runtime, cfg)
    fault_point("oof", runtime)
    parts = runtime.gather(part, "gathering the out-of-fold predictions")
    if not runtime.is_main:
        return None
    metrics = _write_oof(parts, fold, val_ids, labels, out, source_of, task)
    timing["oof_s"] = round(time.perf_counter() - t2, 1)
    timing["total_s"] = round(time.perf_counter() - t0, 1)
    metrics.update(
        {"fold": fold, "n_train": len(train_ids), "n_val": len(val_ids), "timing": timing,
         "runtime": {**runtime.describe(), "steps_per_epoch": _steps_per_epoch(out)}}
    )  # fmt: skip
    # Where each network started: ImageNet (hub id or file + sha256), another run or random.
    nets = {f"localizer_{k}": v for k, v in localizer.nets.items()}
    nets.update({f"grader_{g}": m for g, m in graders.items()})
    metrics["init"] = {name: init_source(net) for name, net in nets.items()}
    # What each network learned from, per source (studies whose labels it trained on), and what
    # kind each source is: predictions carry a caution for networks that saw phantoms only
    # (their localisers misname levels on real spines; BENCHMARKS.md, "Real anatomy").
    for name, samples in loc_samples.items():
        if f"localizer_{name}" in nets:
            taught[f"localizer_{name}"] = [s for s in train_ids if s in samples]
    n_train, n_val = group_counts(source_of, train_ids), group_counts(source_of, val_ids)
    metrics["sources"] = {
        src.name: {"kind": src.kind, "train": n_train.get(src.name, 0),
                   "val": n_val.get(src.name, 0)}
        for src in tables.sources
    }  # fmt: skip
    metrics["training_data"] = {
        net: group_counts(source_of, ids) for net, ids in taught.items() if net in nets
    }
    crash_point("fold_metrics")
    write_json(out / "metrics.json", metrics)  # last: it marks the fold complete
    shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


def _stage1(
    cfg,
    out,
    ckpt,
    train_ids,
    val_ids,
    studies,
    loc_samples,
    runtime,
    log_fn,
    seed,
    fold,
    real: set[int] = frozenset(),
) -> Localizer:
    """Train (or reload) the fold's localiser.

    Real studies (``real``) are shown ``localizer.real_repeat`` times an epoch: a few dozen real
    spines beside a hundred phantoms are what teaches the nets real anatomy.
    """
    # What each net learns from decides which point leads the canal/foramina consensus (a task
    # with no training sample trains no net, and its empty kinds count as no net).
    lead = fusion_lead({t: {"real" if s in real else "phantom" for s in train_ids if s in m}
                        for t, m in loc_samples.items()})  # fmt: skip
    if (out / "localizer_geometry.json").is_file():
        loaded = Localizer.load(out, str(runtime.device))
        if loaded.fuse_lead is None:  # saved before the lead was recorded
            loaded.fuse_lead = lead
        return loaded
    offsets = fit_offsets([studies[s].points for s in train_ids])

    def pick(ids: list[int], repeat: int = 1) -> dict[str, list[LocalizerSample]]:
        times = {s: repeat if s in real else 1 for s in ids}
        return {t: [m[s] for s in ids if s in m for _ in range(times[s])]
                for t, m in loc_samples.items()}  # fmt: skip

    nets = train_localizer(
        cfg, pick(train_ids, cfg.localizer.real_repeat), pick(val_ids), runtime, ckpt, log_fn,
        seed, fold,
    )  # fmt: skip
    c = cfg.localizer
    localizer = Localizer(
        nets, offsets, c.image_size, c.max_slices, c.zoom, c.fuse_mm, c.decoder, c.fine, c.vote_mm,
        lead,
    )  # fmt: skip
    if runtime.is_main:
        localizer.save(out, meta={"config": cfg.to_dict()})
    return localizer


def _grader_member(
    cfg: Config,
    group: str,
    member: int,
    out: Path,
    ckpt: Path,
    train_ids,
    val_ids,
    studies,
    points,
    runtime: Runtime,
    log_fn,
    seed: int,
    fold: int,
    task: Task,
) -> tuple[nn.Module, bool]:
    """Member ``member`` of ``group``'s graders of a fold and whether it was trained now: read
    back when its weights are complete (a resumed fold), else trained from its own seed and
    saved. Member 0 keeps the fold's seed, checkpoint folder and file, so a run of one member is
    what runs always were."""
    path = grader_file(out, group, member)
    if weights_complete(path):
        from spinegrade.models.registry import load_model

        return load_model(path, device=str(runtime.device))[0], False
    from spinegrade.models.weights import save_weights

    model = train_grader(
        cfg, group, [studies[s] for s in train_ids], [studies[s] for s in val_ids], points,
        runtime, ckpt / grader_stage(group, member), log_fn, seed + MEMBER_SEED_STRIDE * member,
        fold, task, member,
    )  # fmt: skip
    if runtime.is_main:
        meta = {"fold": fold, "group": group, "config": cfg.to_dict()}
        save_weights(model, path, meta=meta | ({"member": member} if member else {}))
    return model, True


def _grade_oof(models: FoldModels, ids, studies, runtime: Runtime, cfg: Config) -> dict:
    """Out-of-fold probabilities, localiser errors and fallback count of ``ids`` (one rank's)."""
    preds = predict_studies(
        models, {sid: studies[sid].stacks for sid in ids}, runtime,
        batch_size=cfg.train.eval_batch_size, workers=runtime.num_workers,
    )  # fmt: skip
    probs, errors, points, n_fallback = {}, [], [], 0
    for sid, pred in preds.items():
        study = studies[sid]
        probs[sid] = pred.probs
        n_fallback += int((~pred.graded & (study.labels >= 0)).sum())
        errors += _with_level_names(
            point_errors(sid, pred.points, study.points, study.stacks), pred.points, study.points
        )
        points += point_rows(sid, pred.points)
    return {"probs": probs, "errors": errors, "points": points, "fallback": n_fallback}


def _steps_per_epoch(out: Path) -> dict[str, int]:
    """Optimiser steps an epoch of each stage, from the fold's log (stages resumed included)."""
    steps: dict[str, int] = {}
    path = out / "log.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if "steps" in rec and "stage" in rec:
            steps[rec["stage"]] = int(rec["steps"])
    return steps


def _write_oof(
    parts: Sequence[dict],
    fold: int,
    val_ids,
    labels,
    out: Path,
    source_of: Mapping[int, str],
    task: Task = RSNA_2024,
) -> dict:
    """Out-of-fold predictions (predicted points), points, localiser errors, fold metrics.

    The grading score covers the validation studies with grades; ``oof`` is None when none has
    any (a localisation-only fold). Localiser errors are summarised overall and per source.
    """
    probs: dict[int, object] = {}
    for p in parts:
        dup = set(probs) & set(p["probs"])
        if dup:  # sharding guarantees one grade a study; a second would bias the score
            raise RuntimeError(f"fold {fold}: studies {sorted(dup)[:5]} were graded twice")
        probs.update(p["probs"])
    missing = set(val_ids) - set(probs)
    if missing:
        raise RuntimeError(f"fold {fold}: validation studies {sorted(missing)[:5]} not graded")
    probs = {sid: probs[sid] for sid in val_ids}
    order = {sid: i for i, sid in enumerate(val_ids)}
    errors = sorted((e for p in parts for e in p["errors"]), key=lambda e: order[e["study_id"]])
    located = sorted((r for p in parts for r in p["points"]), key=lambda r: order[r["study_id"]])
    n_fallback = sum(p["fallback"] for p in parts)
    oof = grade_scores.predictions_frame(probs, task)
    write_csv(out / "oof.csv", oof)
    err = pd.DataFrame(errors, columns=ERROR_COLUMNS)
    err.insert(0, "fold", fold)
    err.insert(2, "source", err["study_id"].map(source_of))
    write_csv(out / "localizer_errors.csv", err)
    pts = pd.DataFrame(located, columns=list(POINT_COLUMNS))
    pts["fold"] = fold
    write_csv(out / "oof_points.csv", pts)
    return {
        "oof": _score_graded(labels[labels["study_id"].isin(val_ids)], oof, task),
        "localizer": summarize_errors(errors),
        "localizer_by_source": _errors_by_source(err),
        "levels_by_source": _levels_by_source(err),
        "fallback_cells": n_fallback,
    }


# Columns of localizer_errors.csv (point_errors' rows; fold and source are added in front, and
# plane_mm / named_as where the study's true disc centres are known, see _with_level_names).
ERROR_COLUMNS = (
    "study_id", "condition", "level", "group", "error_mm", "slice_ok", "plane_mm", "named_as"
)  # fmt: skip


def _with_level_names(rows: list[dict], pred: StudyPoints, true: StudyPoints) -> list[dict]:
    """Canal rows of a study with labelled disc centres (imported real sets) get the located
    point's distance to its disc's mid-plane (the disc's own plane where the true canal point
    is known) and the disc it is nearest (``evaluation.anatomy``): whether the report would
    name the level right, beside the 3D error."""
    if not np.isfinite(true.disc).all():
        return rows
    named = {r["level"]: r for r in score_case(pred.xyz[0], true.disc, true.xyz[0])}
    for row in rows:
        if row["condition"] == CONDITIONS[0] and named[row["level"]]["found"]:
            row["plane_mm"] = named[row["level"]]["dist_mm"]
            row["named_as"] = named[row["level"]]["nearest"]
    return rows


def _levels_by_source(err: pd.DataFrame) -> dict[str, dict]:
    """Per source with labelled discs: canal points within 5 / 10 mm of their disc's mid-plane,
    and levels named as another disc (or not found), out of fold."""
    out = {}
    rows = err[err["condition"] == CONDITIONS[0]]
    for name, g in rows.groupby("source", sort=False):
        if g["plane_mm"].isna().all():  # no labelled discs (set with named_as)
            continue
        scored = g[g["plane_mm"].notna() | g["error_mm"].isna()]  # unfound levels count too
        a = scored["plane_mm"].abs()
        out[str(name)] = {
            "n": len(scored),
            "median_mm": float(a.median()),
            "within_5mm": float((a <= 5).mean()),
            "within_10mm": float((a <= 10).mean()),
            "misnamed": int((scored["named_as"] != scored["level"]).sum()),
        }
    return out


def _score_graded(labels: pd.DataFrame, oof: pd.DataFrame, task: Task = RSNA_2024) -> dict | None:
    """The task's metric on the studies that have grades (None when none has any)."""
    graded = graded_ids(labels, task)
    if not graded:
        return None
    return _score(labels[labels["study_id"].isin(graded)], _rows_of(oof, graded), task)


def _score(wide: pd.DataFrame, predictions: pd.DataFrame, task: Task) -> dict:
    """RSNA's competition metric, or another task's per-condition scores."""
    if task.is_rsna:
        return score_frames(wide, predictions)
    return grade_scores.score_grades(wide, predictions, task)


def _rows_of(oof: pd.DataFrame, study_ids) -> pd.DataFrame:
    """The submission rows (``row_id`` = ``{study_id}_...``) of ``study_ids``."""
    return oof[oof["row_id"].str.partition("_")[0].astype(int).isin(study_ids)]


def _errors_by_source(err: pd.DataFrame) -> dict[str, dict]:
    """:func:`summarize_errors` per source (a mixed run: how it does on real spines)."""
    return {
        str(name): summarize_errors(g[["group", "error_mm", "slice_ok"]].to_dict("records"))
        for name, g in err.groupby("source", sort=False)
    }


# ---------------------------------------------------------------------------------------- merge


def merge_run(run_dir: str | Path, data_dir: str | Path | None = None) -> dict:
    """Merge the folds of a run: oof.csv, oof_points.csv, localizer_errors.csv, cv.json (returned).

    cv.json holds the OOF metric terms and score, the uniform, class-prior and best-constant
    baselines on the same folds (priors learned on each fold's training part), the localiser's
    errors (overall and per source), the studies per source and per-fold results. (On the
    phantom, the demo adds the Bayes limit beside them.) The scores cover the studies with
    grades; a run whose data have none (localisation only) has ``oof`` and ``baselines`` None.
    ``data_dir`` replaces the run's first data folder (moved since training).
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if data_dir is not None:
        cfg.data.data_dir = str(data_dir)
    folds = load_folds(run_dir / "folds.csv")
    all_folds = sorted(int(k) for k in folds["fold"].unique())
    missing = [k for k in all_folds if not fold_done(run_dir, k)]
    if missing:
        raise FileNotFoundError(
            f"{run_dir}: folds {missing} are not complete (no metrics.json); run "
            f"`spinegrade train DATA --cache CACHE --out {run_dir} --folds "
            f"{' '.join(map(str, missing))}`"
        )
    tables = load_tables(configured_sources(cfg))
    labels = tables.labels
    labels = labels[labels["study_id"].isin(folds["study_id"])].reset_index(drop=True)
    oof = pd.concat([pd.read_csv(fold_dir(run_dir, k) / "oof.csv") for k in all_folds])
    oof = oof.sort_values("row_id", kind="stable").reset_index(drop=True)
    write_csv(run_dir / "oof.csv", oof)
    errors = pd.concat(
        [pd.read_csv(fold_dir(run_dir, k) / "localizer_errors.csv") for k in all_folds]
    )
    write_csv(run_dir / "localizer_errors.csv", errors)
    point_parts = [fold_dir(run_dir, k) / "oof_points.csv" for k in all_folds]
    if all(p.is_file() for p in point_parts):  # runs from before oof_points.csv lack them
        write_csv(run_dir / "oof_points.csv", pd.concat([pd.read_csv(p) for p in point_parts]))
    per_fold = [json.loads((fold_dir(run_dir, k) / "metrics.json").read_text()) for k in all_folds]
    graded = set(tables.graded_ids())
    task = tables.task
    cv = {
        "config": cfg.name,
        "task": task.name,
        "n_studies": len(labels),
        "n_folds": len(all_folds),
        "sources": _source_summary(tables, folds, graded),
        "oof": None,
        "baselines": None,
        "localizer": summarize_errors(errors.to_dict("records")),
        "localizer_by_source": (
            _errors_by_source(errors) if "source" in errors.columns else None
        ),
        "levels_by_source": _levels_by_source(errors) if "plane_mm" in errors.columns else None,
        "per_fold": [
            {"fold": m["fold"], **(m["oof"] or {}), "time_s": m["timing"]["total_s"],
             "init": m.get("init")}
            for m in per_fold
        ],
        "fallback_cells": int(sum(m["fallback_cells"] for m in per_fold)),
        "train_time_s": round(sum(m["timing"]["total_s"] for m in per_fold), 1),
        "init": summarize_init(m.get("init") for m in per_fold),
    }  # fmt: skip
    if graded:
        cv["oof"], cv["baselines"] = _oof_and_baselines(labels, oof, folds, all_folds, graded, task)
    write_json(run_dir / "cv.json", cv)
    return cv


def _oof_and_baselines(
    labels, oof, folds, all_folds, graded: set[int], task: Task = RSNA_2024
) -> tuple[dict, dict]:
    """The OOF score and the three constant baselines on the graded studies (same folds)."""
    scored = labels[labels["study_id"].isin(graded)].reset_index(drop=True)
    prior, best = [], []
    for k in all_folds:
        val = [s for s in folds.loc[folds["fold"] == k, "study_id"] if s in graded]
        train_wide = scored[~scored["study_id"].isin(val)]
        g = grade_scores
        prior.append(g.constant_frame(val, g.prior_probs(train_wide, task), task))
        best.append(g.constant_frame(val, g.best_constant_probs(train_wide, task), task))
    ids = scored["study_id"].tolist()
    uniform = grade_scores.constant_frame(ids, grade_scores.uniform_probs(task), task)
    return _score(scored, _rows_of(oof, graded), task), {
        "uniform": _score(scored, uniform, task),
        "prior": _score(scored, pd.concat(prior), task),
        "best_constant": _score(scored, pd.concat(best), task),
    }


def _source_summary(
    tables: TrainingTables, folds: pd.DataFrame, graded: set[int]
) -> dict[str, dict]:
    """Per source: its kind, folder, studies, graded studies and studies per fold."""
    fold_of = folds.set_index("study_id")["fold"]
    out = {}
    for src in tables.sources:
        ids = [s for s in tables.source_ids(src.name) if s in fold_of.index]
        out[src.name] = {
            "kind": src.kind,
            "data_dir": str(src.data_dir),
            "studies": len(ids),
            "graded": sum(s in graded for s in ids),
            "per_fold": [int((fold_of.loc[ids] == k).sum()) for k in sorted(set(fold_of))],
        }
    return out
