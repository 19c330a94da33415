"""Prediction: a run folder's fold ensemble on new studies -> submission.csv (+ per-study reports).

``predict(run_dir, input_dir, out_csv)`` accepts either an RSNA test layout (``test_images/`` +
``test_series_descriptions.csv``) or any folder of raw DICOM files (see
:mod:`spinegrade.io.discover`). The input is never written to: raw folders are presented to the
preprocess stage as a layout of symbolic links inside the work (cache) folder, and all derived data
goes to that cache. Every fold's localiser and grader run on every study and their probabilities
are averaged. A target no series can show (a missing or unreadable series) gets the training
prior, with a warning naming the study; every study gets its 25 rows, in the sample submission's
order.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.evaluation.grades import predictions_frame
from spinegrade.inference.ensemble import Predictor
from spinegrade.inference.inputs import (
    SPLIT,
    STUDIES_CSV,
    PreparedInput,
    default_work_dir,
    name_study_folder,
    prepare_input,
    study_folders,
    write_studies_csv,
)
from spinegrade.task import RSNA_2024, Task
from spinegrade.util.atomic import write_csv

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- submission


def missing_series_warning(study_id: int, present: set[str], task: Task = RSNA_2024) -> str | None:
    """The warning for a study lacking a series type its task reads (None when it has all)."""
    missing = sorted({c.series for c in task.conditions} - present)
    if not missing:
        return None
    lost = [c for c in task.columns if task.column_condition(c).series in missing]
    return (
        f"study {study_id}: no usable {', '.join(missing)} series; {len(lost)} of its "
        f"{len(task.columns)} targets are predicted from the views it has or the training prior"
    )


# ----------------------------------------------------------------------------------- driver


@dataclass
class PredictResult:
    """What :func:`predict` did: the submission, where things are, per-study warnings, timings."""

    submission_path: Path
    submission: pd.DataFrame
    study_ids: list[int]
    folds: list[int]
    device: str
    input_kind: str
    engine: str  # what graded, with its version, e.g. "onnxruntime 1.32.0"
    work_dir: Path
    report_dir: Path | None = None
    index_html: Path | None = None
    studies_path: Path | None = None  # studies.csv: study id -> input folder and series
    warnings: dict[int, list[str]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # Model wall time per study and its CPU time (all threads): a batch's time shared out among
    # its studies (see _predict_all).
    per_study_s: list[float] = field(default_factory=list)
    per_study_cpu_s: list[float] = field(default_factory=list)
    graded_per_study: list[int] = field(default_factory=list)  # targets a model saw
    task: Task = RSNA_2024  # what the run grades (the submission's columns)
    weights_init: list[str] = field(default_factory=list)  # where the backbones started training
    model_notes: list[str] = field(default_factory=list)  # e.g. a phantom-trained run's caution


# A path starts the text or follows a space, bracket, quote or separator: "Sagittal T2/STIR", a
# DICOM value "0\0\1" and a folder relative to INPUT ("ward/[patient]/exam1") are not paths.
_PATH = re.compile(r"(?<![^\s(\"'=:,])(?:[A-Za-z]:)?(?:[/\\][^\s/\\:;,'\"()]+)+[/\\]?")


def scrub_paths(text: str) -> str:
    """Replace file paths in a message by their last part (folder names may carry patient names)."""
    return _PATH.sub(lambda m: "…/" + re.split(r"[/\\]", m.group(0).rstrip("/\\"))[-1], text)


def study_warnings(
    study_id: int,
    stacks: dict,
    graded: np.ndarray,
    failures: list[dict],
    inherited: list[str],
    task: Task = RSNA_2024,
) -> list[str]:
    """Warnings of one study: guessed series types, unreadable or missing series, fallbacks."""
    # Discovery names the study's folder: "study 12 (ward/case1): ...".
    out = [w for w in inherited if w.startswith((f"study {study_id}:", f"study {study_id} ("))]
    for f in failures:
        if int(f["study_id"]) == study_id:
            reason = scrub_paths(str(f["reason"]))[:400]
            if f.get("status") == "ok":  # read, with files left out or without geometry
                out.append(f"study {study_id}: series {f['series_id']}: {reason}")
            else:
                out.append(
                    f"study {study_id}: series {f['series_id']} could not be cached ({reason})"
                )
    missing = missing_series_warning(study_id, {d for d, v in stacks.items() if v}, task)
    if missing:
        out.append(missing)
    present = {d for d, v in stacks.items() if v}
    unlocated = [
        c
        for j, c in enumerate(task.columns)
        if not graded[j] and task.column_condition(c).series in present
    ]
    if unlocated:
        out.append(
            f"study {study_id}: {len(unlocated)} target(s) could not be located in their series "
            f"(e.g. {unlocated[0]}) and use the training prior"
        )
    return out


def predict(
    run_dir: Path | str,
    input_dir: Path | str,
    out_csv: Path | str,
    report_dir: Path | str | None = None,
    folds: list[int] | None = None,
    cache_dir: Path | str | None = None,
    device: str = "auto",
    workers: int = 1,
    progress: bool = True,
    strict: bool = False,
    predictor: Predictor | None = None,
    engine: str = "auto",
    batch_studies: int = 8,
) -> PredictResult:
    """Predict every study of ``input_dir`` with the fold ensemble of ``run_dir``.

    Writes ``out_csv`` (RSNA: 25 rows a study, the competition's row order, rows summing to 1;
    another task: a row per condition and level, a probability column per grade it names),
    ``studies.csv`` beside it (which input folder and series each study id stands for, see
    :data:`STUDIES_COLUMNS`) and, with ``report_dir``, the per-study reports and ``index.html``
    (with each study's input folder). ``cache_dir`` is the work
    folder (default: ``.spinegrade_cache/<input hash>`` beside ``out_csv``); it is never inside
    the input. ``predictor``: an ensemble already loaded from ``run_dir`` (a service grading
    study after study loads it once). ``engine``: what runs the networks (``auto``: ONNX Runtime
    when the run has checked ONNX exports and the ``[onnx]`` extra is installed, else torch; see
    :func:`.ensemble.resolve_engine`). ``batch_studies``: studies localised and graded together
    (their stacks are held in memory at once).

    Raises ValueError (after writing the outputs, for inspection) when every study fell back to
    the training prior, or, with ``strict``, when any target of any study did.
    """
    from spinegrade.inference.run_folder import load_run_config
    from spinegrade.preprocessing.build import preprocess_dataset
    from spinegrade.preprocessing.guard import refuse_other_cache

    t0 = time.perf_counter()
    out_csv, input_dir = Path(out_csv), Path(input_dir)
    if out_csv.name == STUDIES_CSV:
        raise ValueError(
            f"--out {out_csv}: {STUDIES_CSV} is written beside the submission; name it otherwise"
        )
    work = Path(cache_dir) if cache_dir else default_work_dir(out_csv, input_dir)
    # The cache grid must be the one the models were trained on; a cache folder made for other
    # settings is the user's: refused, never rebuilt in place.
    if (Path(run_dir) / "config.yaml").is_file():  # not a run folder: the Predictor says so
        refuse_other_cache(work / "cache", load_run_config(run_dir).data, run_dir)
    if predictor is None:  # fail fast, before preprocessing
        predictor = Predictor.from_run_dir(run_dir, folds, device, engine)
    data_cfg = load_run_config(run_dir).data
    t_load = time.perf_counter()
    prepared = prepare_input(input_dir, work)
    summary = preprocess_dataset(
        prepared.data_dir, work / "cache", split=SPLIT, workers=workers, size=data_cfg.cache_size,
        mm=data_cfg.cache_mm, progress=progress,
    )  # fmt: skip
    t_pre = time.perf_counter()
    result = PredictResult(
        out_csv, pd.DataFrame(), prepared.study_ids, predictor.folds, predictor.device,
        prepared.kind, predictor.engine_name, work, Path(report_dir) if report_dir else None,
    )  # fmt: skip
    result.weights_init = predictor.describe_init()
    result.model_notes = predictor.describe_training()
    result.task = predictor.task
    noted = prepared.in_input_terms(summary.failures + summary.read_notes)
    preds = _predict_all(
        predictor, prepared, work / "cache", noted, result, progress, workers, batch_studies
    )
    result.submission = predictions_frame({p.study_id: p.probs for p in preds}, result.task)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out_csv, result.submission)
    result.studies_path = write_studies_csv(prepared.studies, out_csv.with_name(STUDIES_CSV))
    if result.report_dir is not None:
        from spinegrade.reporting.report import write_index_html

        title = f"spinegrade report: {len(preds)} studies, {len(predictor.folds)}-fold ensemble"
        folders = study_folders(prepared.studies)
        lines = [f"graded by {result.engine}", *result.weights_init]
        result.index_html = write_index_html(
            result.report_dir, preds, title, folders, lines, result.model_notes
        )
    t_end = time.perf_counter()
    result.timings = {
        "load_models_s": round(t_load - t0, 2),
        "preprocess_s": round(t_pre - t_load, 2),
        "predict_and_report_s": round(t_end - t_pre, 2),
        "total_s": round(t_end - t0, 2),
    }
    _check_fallbacks(result, strict)
    return result


class FallbackError(ValueError):
    """Every study (or, with ``--strict``, any target) fell back to the training prior.

    ``result`` is what was predicted: its per-study warnings say why (the service shows them).
    """

    def __init__(self, message: str, result: PredictResult | None = None) -> None:
        super().__init__(message)
        self.result = result


def _check_fallbacks(result: PredictResult, strict: bool) -> None:
    """A run whose models graded nothing is an error, not a submission of priors."""
    ids = result.study_ids
    prior_only = [s for s, n in zip(ids, result.graded_per_study, strict=True) if n == 0]
    n_targets = len(result.task.columns)
    some_prior = [s for s, n in zip(ids, result.graded_per_study, strict=True) if n < n_targets]
    written = f"{result.submission_path} was written for inspection"
    if ids and len(prior_only) == len(ids):
        raise FallbackError(
            f"every study ({len(ids)}) fell back to the training prior: no model graded any "
            f"target (first warnings: {result.warnings.get(ids[0], [])[:2]}); {written}. Check "
            "that the input holds lumbar MRI series the run was trained on",
            result,
        )
    if strict and some_prior:
        raise FallbackError(
            f"--strict: {len(some_prior)} of {len(ids)} studies use the training prior for some "
            f"targets (e.g. study {some_prior[0]}: {result.warnings.get(some_prior[0], [])[:2]}); "
            f"{written}",
            result,
        )


def _predict_all(
    predictor: Predictor,
    prepared: PreparedInput,
    cache: Path,
    failures: list[dict],
    result: PredictResult,
    progress: bool,
    workers: int = 1,
    batch_studies: int = 8,
) -> list:
    """Predict (and report) ``batch_studies`` studies at a time: each batch's localisation and
    grading share the network passes (:meth:`.Predictor.predict_many`), and memory holds one
    batch's stacks.

    With ``workers`` > 1 (CPU only), that many single-threaded processes each predict a batch at
    a time (the batches then split the studies evenly among them), every worker loading the
    run's models once; the outputs are the same as one process's, in the same order. One
    process already runs a batch's folds side by side (:func:`fold_map`), so workers pay off
    only with more cores than folds (BENCHMARKS.md, "Prediction latency").
    """
    from spinegrade.util.progress import progress_bar

    job = _StudyJob(
        cache, (cache / "index.csv").is_file(), failures, prepared.warnings, result.report_dir,
        result.task,
    )  # fmt: skip
    ids = prepared.study_ids
    parallel = workers > 1 and len(ids) > 1 and predictor.device == "cpu"
    size = max(1, batch_studies)
    if parallel:  # every worker gets a share, however few the studies
        size = min(size, -(-len(ids) // workers))
    batches = [ids[i : i + size] for i in range(0, len(ids), size)]
    bar = progress_bar(total=len(ids), desc="predicting", unit="study", enabled=progress)
    done = []
    if parallel:
        from spinegrade.util.parallel import process_pool

        spawn = multiprocessing.get_context("spawn")  # never fork a process that holds torch
        run = (predictor.run_dir, predictor.folds, predictor.engine)
        with process_pool(min(workers, len(batches)), spawn) as pool:
            for out in pool.map(_predict_in_worker, batches, [run] * len(batches),
                                [job] * len(batches)):  # fmt: skip
                done += out
                bar.update(len(out))
    else:
        for batch in batches:
            done += _predict_batch(predictor, batch, job)
            bar.update(len(batch))
    bar.close()
    preds = []
    folders = study_folders(prepared.studies)
    for pred, wall_s, cpu_s, graded in done:
        result.per_study_s.append(wall_s)
        result.per_study_cpu_s.append(cpu_s)
        result.graded_per_study.append(graded)
        warns = [name_study_folder(scrub_paths(w), pred.study_id, folders) for w in pred.warnings]
        for w in warns:
            log.warning(w)
        result.warnings[pred.study_id] = pred.warnings = warns
        preds.append(pred)
    return preds


@dataclass
class _StudyJob:
    """What predicting one study needs besides the ensemble (picklable, for worker processes)."""

    cache: Path
    has_index: bool
    failures: list[dict]
    input_warnings: dict
    report_dir: Path | None
    task: Task = RSNA_2024


def _predict_batch(predictor: Predictor, sids: list[int], job: _StudyJob) -> list[tuple]:
    """Studies ``sids`` together: per study (StudyPrediction, its share of the model's wall s and
    CPU s, targets graded), in order; never raises.

    A batch that fails is predicted again study by study, so that one bad study gets the prior
    and a warning while the others are graded.
    """
    from spinegrade.data.studies import load_studies

    t, c = time.perf_counter(), time.process_time()
    stacks: dict[int, dict] = {}
    errors: dict[int, list[str]] = {sid: [] for sid in sids}
    for sid in sids:  # one study whose files cannot be loaded must not take the batch down
        try:
            stacks[sid] = (
                load_studies(job.cache, [sid], split=SPLIT, progress=False)[sid].stacks
                if job.has_index
                else {}
            )
        except Exception as exc:
            stacks[sid] = {}
            errors[sid].append(f"study {sid}: prediction failed ({type(exc).__name__}: {exc})")
    ok = {sid: st for sid, st in stacks.items() if not errors[sid]}
    try:
        ens = predictor.predict_many(ok) if len(ok) > 1 else {}
    except Exception:  # which study? each on its own below
        ens = {}
    for sid in ok:
        if sid in ens:
            continue
        try:
            ens[sid] = predictor.predict_many({sid: ok[sid]})[sid]
        except Exception as exc:  # one bad study must not stop the batch: it gets the prior
            stacks[sid] = {}
            errors[sid].append(f"study {sid}: prediction failed ({type(exc).__name__}: {exc})")
    wall_s, cpu_s = (time.perf_counter() - t) / len(sids), (time.process_time() - c) / len(sids)
    return [
        _finish_study(predictor, sid, stacks[sid], ens.get(sid), errors[sid], job, wall_s, cpu_s)
        for sid in sids
    ]


def _finish_study(
    predictor: Predictor,
    sid: int,
    stacks: dict,
    ens,
    errors: list[str],
    job: _StudyJob,
    wall_s: float,
    cpu_s: float,
) -> tuple:
    """One study's (StudyPrediction, wall s, CPU s, targets graded), its report written."""
    from spinegrade.data.studies import used_series
    from spinegrade.reporting.report import StudyPrediction

    if ens is None:
        stacks, ens = {}, predictor.prior_prediction()
    warns = errors + study_warnings(
        sid, stacks, ens.graded, job.failures, job.input_warnings, job.task
    )
    source = ["model" if g else "prior" for g in ens.graded]
    pred = StudyPrediction(
        sid, ens.probs, source, ens.points, warns, used_series(stacks), job.task, ens.discs
    )
    if job.report_dir is not None:
        try:
            _report_study(predictor, pred, stacks, job.report_dir)
        except Exception as exc:  # the submission matters more than one figure
            warns.append(f"study {sid}: report failed ({type(exc).__name__}: {exc})")
    return pred, wall_s, cpu_s, int(ens.graded.sum())


_WORKER_ENSEMBLE: dict[tuple, Predictor] = {}  # a worker process's ensemble, loaded once


def _predict_in_worker(sids: list[int], run: tuple[Path, list[int], str], job: _StudyJob):
    """:func:`_predict_batch` in a worker process: one thread, the run's models loaded once."""
    import torch

    key = (str(run[0]), tuple(run[1]), run[2])
    if key not in _WORKER_ENSEMBLE:
        torch.set_num_threads(1)  # before loading: ONNX Runtime's sessions take torch's count
        _WORKER_ENSEMBLE[key] = Predictor.from_run_dir(Path(run[0]), list(run[1]), "cpu", run[2])
    return _predict_batch(_WORKER_ENSEMBLE[key], sids, job)


def _report_study(predictor: Predictor, pred, stacks: dict, report_dir: Path) -> None:
    """Cut the crops at the ensemble's points and write the study's report folder."""
    from spinegrade.data.crops import make_crops
    from spinegrade.localization.points import StudyPoints
    from spinegrade.reporting.report import ReportInputs, write_study_report

    # Only targets the ensemble graded are shown: a crop for a prior-filled target would suggest
    # the model saw something it did not.
    task = pred.task
    graded = [c for c, s in zip(task.columns, pred.source, strict=True) if s == "model"]
    points = StudyPoints(pred.points.copy())
    if pred.discs is not None:
        points.disc = pred.discs.copy()
    crops = (
        make_crops(stacks, points, predictor.crop_config, columns=graded, task=task)
        if stacks
        else {}
    )
    inputs = ReportInputs(stacks=stacks, crops=crops, saliency_fn=predictor.saliency)
    info = {"folds": predictor.folds, "device": predictor.device, "init": predictor.init}
    info["task"] = task.name
    info["engine"] = predictor.engine_name
    info["training_data"] = predictor.training_data or "not recorded"
    info["notes"] = predictor.describe_training()
    write_study_report(report_dir, pred, inputs, info)
