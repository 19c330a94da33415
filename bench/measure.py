"""What bench/bench_oof.py and bench/gpu_rehearsal.py share: a phantom, timed training and
inference of one fold's networks, and the projection to the full RSNA set.

Not a library module: benches import it from this folder (``sys.path`` holds the script's
folder). Timings never pass or fail anything.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from spinegrade.config import Config
from spinegrade.training.optim import make_optimizer
from spinegrade.util.runtime import Runtime, to_device

# The real training set: 1,975 studies, 5 folds (395 validation, 1,580 training studies a fold).
RSNA_STUDIES = 1975
RSNA_FOLDS = 5
CROPS_PER_STUDY = 25  # 5 levels x (1 spinal + 2 foraminal + 2 subarticular)
SAGITTAL_TASKS = 2  # localiser networks: canal on Sagittal T2, foramina on Sagittal T1


def prepare_phantom(
    work: Path, n_studies: int, cache_size: int, workers: int, cache_mm: float = 0.0
) -> tuple[Path, Path]:
    """``work/data`` (phantom, RSNA layout) and ``work/cache``; reused when already there.

    Writing and reading DICOM needs pydicom; with a cache made elsewhere (copied into
    ``work/cache`` with ``work/data``'s CSVs) neither is imported.
    """
    data, cache = work / "data", work / "cache"
    if (cache / "index.csv").is_file() and (data / "train.csv").is_file():
        return data, cache
    try:
        from spinegrade.phantom.generate import generate_dataset
        from spinegrade.preprocessing.build import preprocess_dataset
    except ImportError as err:
        raise SystemExit(
            f"making the phantom needs pydicom ({err}); install it (pure Python: carry its wheel, "
            "see README 'GPU rehearsal') or put a prepared data/ and cache/ in {work}"
        ) from err
    if not (data / "train.csv").is_file():
        generate_dataset(data, n_studies, 0, seed=0, workers=workers, overwrite=True)
    preprocess_dataset(data, cache, workers=workers, size=cache_size, mm=cache_mm, progress=False)
    return data, cache


def load_fold(data: Path, cache: Path, cfg: Config):
    """Studies, labels, localiser samples and fit offsets of the phantom (every study)."""
    from spinegrade.data.studies import load_studies
    from spinegrade.localization.derived import fit_offsets
    from spinegrade.localization.samples import build_localizer_samples
    from spinegrade.rsna import load_dataset, normalize_coordinates

    ds = load_dataset(data)
    coords = normalize_coordinates(ds.coordinates)
    ids = ds.labels["study_id"].tolist()
    studies = load_studies(cache, ids, ds.labels, coords, progress=False)
    samples = build_localizer_samples({s: (d.stacks, d.points) for s, d in studies.items()}, cfg)
    offsets = fit_offsets([d.points for d in studies.values()])
    return studies, ds.labels, samples, offsets


@dataclass
class TrainTiming:
    rows_per_s: float  # crops (grader) or stacks (localiser) a second, forward + backward + step
    stall_frac: float  # share of the wall time spent waiting for the next batch
    steps: int
    rows: int
    seconds: float


def time_training(
    model: nn.Module,
    dataset,
    collate,
    loss_fn,
    runtime: Runtime,
    batch: int,
    steps: int,
    cfg: Config,
    lr: float,
    warmup: int = 3,
) -> TrainTiming:
    """``steps`` timed optimiser steps after ``warmup`` (AMP, channels-last weights, workers).

    The device is synchronised after every step, so the time spent in ``next(loader)`` is time
    the device had nothing to do: that share of the wall clock is the data-loader stall.
    """
    model.to(runtime.device).train()
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, lr, cfg.optim)
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.amp_dtype == torch.float16)
    loader = DataLoader(
        dataset, batch_size=batch, shuffle=True, collate_fn=collate, drop_last=True,
        num_workers=runtime.num_workers, pin_memory=runtime.device.type == "cuda",
        persistent_workers=runtime.num_workers > 0,
    )  # fmt: skip
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    wait = rows = 0
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(runtime)
            wait, rows, t0 = 0.0, 0, time.perf_counter()
        tw = time.perf_counter()
        b = next(batches)
        wait += time.perf_counter() - tw
        b = to_device(b, runtime)
        with runtime.autocast():
            loss = loss_fn(model, b)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        _sync(runtime)
        rows += len(next(v for v in b.values() if torch.is_tensor(v)))
    secs = time.perf_counter() - t0
    return TrainTiming(rows / secs, wait / secs, steps, rows, secs)


def _sync(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


@contextmanager
def _time_calls(module, name: str, runtime: Runtime) -> Iterator[list[float]]:
    """``[seconds, calls]`` spent in ``module.name`` (called through the module attribute) while
    the block runs: a part of one timed pass, measured inside it, not in a pass of its own."""
    inner = getattr(module, name)
    spent = [0.0, 0]

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            _sync(runtime)
            spent[0] += time.perf_counter() - t
            spent[1] += 1

    setattr(module, name, timed)
    try:
        yield spent
    finally:
        setattr(module, name, inner)


def time_oof(models, stacks: dict, runtime: Runtime, batch: int, workers: int, old: bool = False):
    """Seconds a study and graded crops a second of out-of-fold grading (``old``: one study
    at a time through ``predict_study``, as before batching); ``preds`` holds the predictions.

    The localiser's seconds are timed inside the same pass (its calls wrapped), so the grading
    seconds (the pass less them) are never negative; they used to be the pass less a separately
    timed localiser pass, which could leave ~0 or less and blow the grading rate up. With no crop
    graded or no grading time left, the rate is NaN and said so on stderr: nothing is projected
    from it.
    """
    import spinegrade.inference.fold_models as inference
    import spinegrade.localization.localize as localize

    # What each path calls to localise: predict_study its module's localize_study, and
    # predict_studies spinegrade.localization.localize.localize_studies (imported when it runs).
    module, name = (inference, "localize_study") if old else (localize, "localize_studies")
    _sync(runtime)
    t0 = time.perf_counter()
    with _time_calls(module, name, runtime) as loc:
        if old:
            preds = {sid: inference.predict_study(models, st) for sid, st in stacks.items()}
        else:
            preds = inference.predict_studies(
                models, stacks, runtime, batch_size=batch, workers=workers
            )
    _sync(runtime)
    secs = time.perf_counter() - t0
    if loc[1] == 0 and any(stacks.values()):
        raise RuntimeError(
            f"the localiser was not timed: {module.__name__}.{name} is no longer what "
            "predict_study(ies) calls; update bench/measure.py"
        )
    loc_s = loc[0]
    grade_s = secs - loc_s
    views = 1 + models.crops.tta
    crops = sum(int(p.graded.sum()) for p in preds.values()) * views
    if crops and grade_s > 0:
        grade_rate = crops / grade_s  # crops cut and graded a second
    else:
        grade_rate = math.nan
        print(f"time_oof: {crops} crops graded in {grade_s:.3f} s besides the localiser: grading "
              "rate not measured (NaN), nothing projected from it", file=sys.stderr)  # fmt: skip
    n = len(stacks)
    # An untrained localiser leaves cells ungraded; a trained one finds all 25 of a study: a
    # projection from the measured rates, not a measurement.
    full = loc_s / n + CROPS_PER_STUDY * views / grade_rate
    return {"s_per_study": secs / n, "crops_per_s": crops / secs, "seconds": secs, "studies": n,
            "localize_s_per_study": loc_s / n, "grade_s": grade_s, "grade_crops_per_s": grade_rate,
            "s_per_study_all_cells": full, "preds": preds}  # fmt: skip


def project_fold(cfg: Config, grader: TrainTiming, loc: TrainTiming, oof_s_per_study: float,
                 val_crops_per_s: float) -> dict:  # fmt: skip
    """Seconds of one fold of the full RSNA set, from measured rates (training, per-epoch
    validation, OOF); and of all five folds."""
    n_val = RSNA_STUDIES // RSNA_FOLDS
    n_train = RSNA_STUDIES - n_val
    t, c = cfg.train, cfg.localizer
    grader_s = t.epochs * n_train * CROPS_PER_STUDY / grader.rows_per_s
    # Validation every eval_every epochs: the val crops once (no TTA) through the grader.
    val_s = (t.epochs / max(1, t.eval_every)) * n_val * CROPS_PER_STUDY / val_crops_per_s
    loc_s = c.epochs * SAGITTAL_TASKS * n_train / loc.rows_per_s
    oof_s = n_val * oof_s_per_study
    fold = grader_s + val_s + loc_s + oof_s
    return {
        "fold_s": round(fold, 1), "grader_train_s": round(grader_s, 1),
        "grader_val_s": round(val_s, 1), "localizer_train_s": round(loc_s, 1),
        "oof_s": round(oof_s, 1), "oof_frac_of_training": round(oof_s / (grader_s + loc_s), 4),
        "five_folds_min": round(RSNA_FOLDS * fold / 60, 1), "n_train": n_train, "n_val": n_val,
    }  # fmt: skip


def threads_for_cpu(threads: int | None) -> None:
    """CPU runs: a fixed thread count (figures comparable on a shared machine)."""
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def peak_gpu_mib(runtime: Runtime) -> float | None:
    if runtime.device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(runtime.device) / 2**20, 1)


def crops_cut_per_s(studies, points, cfg: Config, n: int = 40) -> float:
    """Single-process speed of cutting jittered training crops (what each loader worker does)."""
    from spinegrade.data.grader_dataset import GraderDataset

    ds = GraderDataset(list(studies), points, "foraminal", cfg.crops, augment=True, seed=0)
    t0 = time.perf_counter()
    rows = sum(int((ds[i % len(ds)]["labels"] >= 0).sum()) for i in range(n))
    return rows / (time.perf_counter() - t0) if rows else float(np.nan)


def fold_models(cfg: Config, grader: nn.Module, nets: dict, offsets, labels, train, runtime):
    """FoldModels from one grader network (used for all three groups: the same architecture,
    so the same speed) and the two sagittal localiser networks."""
    from spinegrade.evaluation.metrics import best_constant_probs
    from spinegrade.inference.fold_models import FoldModels
    from spinegrade.localization.localizer import Localizer

    for net in nets.values():
        net.to(runtime.device).eval()
    c = cfg.localizer
    localizer = Localizer(nets, offsets, c.image_size, c.max_slices, c.zoom, c.fuse_mm)
    fallback = best_constant_probs(labels[labels["study_id"].isin(train)])
    graders = {group: grader.to(runtime.device).eval() for group in cfg.train.groups}
    return FoldModels(localizer, graders, fallback, cfg.crops, cfg.train.prior_mix)
