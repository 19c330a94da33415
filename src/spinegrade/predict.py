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

import contextlib
import hashlib
import logging
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spinegrade.atomic import write_csv
from spinegrade.constants import (
    COLUMN_CONDITION,
    CONDITION_SERIES,
    CONDITIONS,
    LABEL_COLUMNS,
    LEVELS,
)
from spinegrade.submission import submission_frame

log = logging.getLogger(__name__)

SPLIT = "test"
SERIES_CSV = "test_series_descriptions.csv"
LAYOUT_DIR = "layout"  # inside the work folder: symlinks to a raw input, in the RSNA layout
STUDIES_CSV = "studies.csv"  # beside the submission: study id -> input folder and series
# One row per series found. Folders are POSIX paths relative to INPUT ("." for INPUT itself), with
# any component naming the patient shown as "[patient]". series_description is the RSNA type the
# model reads the series as ("" when it is not used, e.g. coronal); type_source says where that
# type came from ("csv" for an RSNA layout, else description / sequence timing / image contrast /
# elimination / plane only / default) and guessed whether it is a guess. dicom_description is the
# header's SeriesDescription (or ProtocolName).
STUDIES_COLUMNS: list[str] = [
    "study_id", "study_folder", "series_id", "series_folder", "series_description",
    "type_source", "guessed", "plane", "n_files", "dicom_description", "note",
]  # fmt: skip


# ------------------------------------------------------------------------------------ input


@dataclass
class PreparedInput:
    """An input folder made ready for ``preprocess_dataset(data_dir, cache, split="test")``."""

    kind: str  # "rsna" | "raw"
    data_dir: Path  # the RSNA-layout root preprocess reads (the input, or the symlink layout)
    series: pd.DataFrame  # study_id, series_id, series_description (typed series only)
    study_ids: list[int]
    warnings: list[str] = field(default_factory=list)
    discovery: pd.DataFrame | None = None  # raw input: every series found and how it was typed
    # studies.csv: which input folder and series each study id stands for (STUDIES_COLUMNS)
    studies: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=STUDIES_COLUMNS))


def is_rsna_test_layout(path: Path) -> bool:
    """True when ``path`` holds ``test_images/`` and ``test_series_descriptions.csv``."""
    return (path / "test_images").is_dir() and (path / SERIES_CSV).is_file()


def default_work_dir(out_csv: Path, input_dir: Path) -> Path:
    """``OUT's folder/.spinegrade_cache/<hash of the input path>``, or a temp folder.

    Hashing the input's absolute path keeps the caches of different inputs apart without writing
    the path itself (folder names can carry patient names). A location inside the input folder is
    never used: the temp folder is taken instead.
    """
    key = hashlib.sha1(str(Path(input_dir).resolve()).encode()).hexdigest()[:12]
    base = Path(out_csv).resolve().parent / ".spinegrade_cache"
    if _inside(base, input_dir):
        base = Path(tempfile.gettempdir()) / "spinegrade_cache"
    return base / key


def _inside(path: Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def prepare_input(input_dir: Path | str, work_dir: Path | str) -> PreparedInput:
    """Recognise the input kind; for raw DICOM folders build the symlink layout in ``work_dir``."""
    from spinegrade.rsna import load_series_descriptions

    input_dir, work_dir = Path(input_dir), Path(work_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(
            f"{input_dir}: no such folder; INPUT is an RSNA test layout (test_images/ + "
            f"{SERIES_CSV}) or a folder of DICOM files"
        )
    if _inside(work_dir, input_dir):
        raise ValueError(
            f"work/cache folder {work_dir} lies inside the input {input_dir}; spinegrade never "
            "writes into its input: choose --cache elsewhere"
        )
    if is_rsna_test_layout(input_dir):
        series = load_series_descriptions(input_dir / SERIES_CSV)
        study_ids = [int(s) for s in pd.unique(series["study_id"])]
        studies = rsna_studies(input_dir, series)
        return PreparedInput("rsna", input_dir, series, study_ids, studies=studies)
    # A raw folder (or a test_images/ without its CSV): group and type series from the headers.
    from spinegrade.io.discover import discover_studies

    found = discover_studies(input_dir)
    layout = build_symlink_layout(found, work_dir / LAYOUT_DIR)
    return PreparedInput(
        "raw",
        layout,
        found.series_descriptions(),
        found.study_ids,
        warnings=list(found.guesses),  # missing series are reported after caching
        discovery=found.table(),
        studies=discovered_studies(found),
    )


def rsna_studies(input_dir: Path, series: pd.DataFrame) -> pd.DataFrame:
    """The studies.csv table of an RSNA layout: its series CSV with folders and file counts."""
    from spinegrade.io.discover import type_from_description

    rows = []
    for sid, ser, desc in series[["study_id", "series_id", "series_description"]].itertuples(
        index=False
    ):
        folder = Path("test_images") / str(sid) / str(ser)
        files = _visible_files(input_dir / folder)
        rows.append(
            {
                "study_id": int(sid),
                "study_folder": folder.parent.as_posix(),
                "series_id": int(ser),
                "series_folder": folder.as_posix(),
                "series_description": desc,
                "type_source": "csv",
                "guessed": False,
                "plane": type_from_description(str(desc))[0] or "unknown",
                "n_files": len(files),
                "dicom_description": "",
                "note": "" if files else "folder missing or empty",
            }
        )
    return _studies_frame(rows)


def discovered_studies(found) -> pd.DataFrame:
    """The studies.csv table of a raw input: every series discovery found, where it lies.

    A study's folder is the deepest folder holding all its files, a series' folder likewise.
    Components that carry the study's patient identifiers are blanked (io.identifiers).
    """
    from spinegrade.io.identifiers import patient_identifiers, redact_folder

    root = Path(found.root)
    by_study: dict[int, list] = {}
    for s in found.series:
        by_study.setdefault(s.study_id, []).append(s)
    rows = []
    for study_id, series in sorted(by_study.items()):
        secrets = patient_identifiers(s.files[0] for s in series if s.files)

        def rel(paths: list[Path], secrets: set[str] = secrets) -> str:
            common = os.path.commonpath([os.path.dirname(os.fspath(p)) for p in paths])
            return redact_folder(Path(os.path.relpath(common, root)).as_posix(), secrets)

        study_folder = rel([f for s in series for f in s.files])
        for s in sorted(series, key=lambda s: s.series_id):
            rows.append(
                {
                    "study_id": study_id,
                    "study_folder": study_folder,
                    "series_id": s.series_id,
                    "series_folder": rel(s.files),
                    "series_description": s.series_description,
                    "type_source": s.type_source,
                    "guessed": bool(s.guessed),
                    "plane": s.plane,
                    "n_files": len(s.files),
                    "dicom_description": redact_folder(s.header_description, secrets),
                    "note": s.note,
                }
            )
    return _studies_frame(rows)


def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]


def _studies_frame(rows: list[dict]) -> pd.DataFrame:
    out = pd.DataFrame(rows, columns=STUDIES_COLUMNS)
    return out.sort_values(["study_id", "series_id"], kind="stable").reset_index(drop=True)


def study_folders(studies: pd.DataFrame) -> dict[int, str]:
    """study_id -> its input folder (relative to INPUT), from a studies.csv table."""
    first = studies.drop_duplicates("study_id")
    return dict(zip(first["study_id"].astype(int), first["study_folder"], strict=True))


def build_symlink_layout(found, layout_dir: Path) -> Path:
    """``layout_dir/test_images/{study}/{series}/{k}.dcm`` links to the user's files + the CSV.

    Links, not copies: the user's files stay where they are and nothing is duplicated. The layout
    is rebuilt on every call (links are cheap; preprocess' resume looks at the linked files' sizes,
    which do not change).
    """
    images = layout_dir / "test_images"
    if images.exists():
        shutil.rmtree(images)  # removes the links only, never their targets
    table = found.series_descriptions()
    for study_id, series_id in table[["study_id", "series_id"]].itertuples(index=False):
        folder = images / str(study_id) / str(series_id)
        folder.mkdir(parents=True, exist_ok=True)
        for k, src in enumerate(found.files_of(int(study_id), int(series_id))):
            _link(Path(src).resolve(), folder / f"{k:05d}.dcm")
    images.mkdir(parents=True, exist_ok=True)
    write_csv(layout_dir / SERIES_CSV, table)
    return layout_dir


def _link(src: Path, dst: Path) -> None:
    """Symbolic link, else a hard link (same disk), else a clear error."""
    try:
        os.symlink(src, dst)
    except OSError:
        try:
            os.link(src, dst)
        except OSError as exc:
            raise ValueError(
                f"cannot link {dst.name} to an input file in the work folder {dst.parent} "
                f"({exc}); put --cache on a file system that allows symbolic links"
            ) from exc


# ------------------------------------------------------------------------------- submission


def missing_series_warning(study_id: int, present: set[str]) -> str | None:
    """The warning for a study lacking one or more series types (None when it has all three)."""
    missing = sorted({s for s in CONDITION_SERIES.values()} - present)
    if not missing:
        return None
    lost = [c for c in LABEL_COLUMNS if CONDITION_SERIES[COLUMN_CONDITION[c]] in missing]
    return (
        f"study {study_id}: no usable {', '.join(missing)} series; {len(lost)} of its 25 targets "
        "are predicted from the views it has or the training prior"
    )


# --------------------------------------------------------------------------------- ensemble


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    return device


def parse_folds(values: list[str] | None) -> list[int] | None:
    """``["0,1", "3"]`` -> ``[0, 1, 3]``; None or empty -> None (all folds)."""
    if not values:
        return None
    out: list[int] = []
    for part in ",".join(values).replace(" ", ",").split(","):
        if not part:
            continue
        if not part.isdigit():
            raise ValueError(f"--folds: {part!r} is not a fold number; e.g. --folds 0,1,2")
        out.append(int(part))
    return sorted(set(out)) or None


def run_folds(run_dir: Path, folds: list[int] | None = None) -> list[int]:
    """The folds of ``run_dir`` to ensemble: ``folds`` if given (each must be complete), else all
    complete ones (an incomplete fold is skipped with a warning)."""
    from spinegrade.rundir import fold_dir, fold_done

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{run_dir}: not a run folder (no config.yaml); train one with `spinegrade train`"
        )
    found = sorted(
        int(p.name.split("_", 1)[1])
        for p in run_dir.glob("fold_*")
        if p.is_dir() and p.name.split("_", 1)[1].isdigit()
    )
    if folds:
        bad = [k for k in folds if not fold_done(run_dir, k)]
        if bad:
            raise ValueError(
                f"{run_dir}: fold(s) {bad} are not trained to completion (no "
                f"{fold_dir(run_dir, bad[0]).name}/metrics.json); pick from {found}"
            )
        return sorted(set(folds))
    done = [k for k in found if fold_done(run_dir, k)]
    for k in sorted(set(found) - set(done)):
        log.warning("%s: fold %d is incomplete and is left out of the ensemble", run_dir, k)
    if not done:
        raise ValueError(
            f"{run_dir}: no completed fold (fold_K/metrics.json); finish `spinegrade train` first"
        )
    return done


@dataclass
class EnsemblePrediction:
    """One study through every fold: mean probabilities, the points graded, what models saw."""

    probs: np.ndarray  # (25, 3), rows sum to 1
    graded: np.ndarray  # bool (25,): some fold's grader saw this target
    points: np.ndarray  # (5, 5, 3) LPS mm, the folds' consensus; NaN where no fold located it


@contextlib.contextmanager
def fold_map(device: str, n_folds: int) -> Iterator[Callable[..., Iterable[Any]]]:
    """``map`` for the folds' share of one study: on CPU, the folds side by side.

    The folds' nets are small, so torch's threads inside one of them leave the cores ~40% idle
    (CPU time 1.2x the wall time on 2 cores). Run instead as many folds at once as torch has
    threads (at most all of them), the threads shared out among them: on the demo run, 2 cores,
    3.5-3.7 -> 2.0 s a study (BENCHMARKS.md, "Prediction latency"). With torch's OpenMP build each
    calling thread runs its own team of that many threads; the count is process-wide, so it is
    set for this block and restored after it. Prediction runs one study at a time (``predict``,
    the service), and worker processes (``--workers``) run single-threaded, so they get plain
    ``map``; so does a GPU.
    """
    import torch

    before = torch.get_num_threads()
    n = min(n_folds, before) if device == "cpu" else 1
    if n <= 1:
        yield map
        return
    torch.set_num_threads(max(1, before // n))  # 2 cores, 5 folds: 2 at a time, 1 thread each
    try:
        with ThreadPoolExecutor(n) as pool:
            yield pool.map  # results in the folds' order, whatever order they finish in
    finally:
        torch.set_num_threads(before)


class Predictor:
    """The fold ensemble of a run folder: every fold localises and grades; probabilities average.

    A target is averaged over the folds that could grade it (a fold whose localiser put the point
    outside every series falls back for that target); when none could, the folds' training
    fallback (best constant per column, learned on each fold's training studies) is used.
    """

    def __init__(self, run_dir: Path, folds: list[int], models: list, device: str) -> None:
        self.run_dir, self.folds, self.models, self.device = run_dir, folds, models, device

    @classmethod
    def from_run_dir(
        cls, run_dir: Path | str, folds: list[int] | None = None, device: str = "auto"
    ) -> Predictor:
        """Load the folds' localisers and graders (safetensors + JSON only) from ``run_dir``."""
        from spinegrade.inference import load_fold_models
        from spinegrade.rundir import fold_dir

        run_dir, device = Path(run_dir), resolve_device(device)
        chosen = run_folds(run_dir, folds)
        models = [load_fold_models(fold_dir(run_dir, k), device=device) for k in chosen]
        return cls(run_dir, chosen, models, device)

    @property
    def init(self) -> dict[str, list[dict]]:
        """Where the ensemble's backbones started training (see :func:`.weights.summarize_init`):
        ``{"model": [...], "localizer": [...]}``, each a list of distinct sources."""
        from spinegrade.weights import init_source, summarize_init

        def nets(m) -> dict[str, dict]:
            out = {f"localizer_{k}": init_source(v) for k, v in m.localizer.nets.items()}
            return out | {f"grader_{k}": init_source(v) for k, v in m.graders.items()}

        return summarize_init(nets(m) for m in self.models)

    def describe_init(self) -> list[str]:
        """One line per backbone for reports, e.g. ``model backbone: ImageNet, hub timm/...``."""
        from spinegrade.weights import describe_source

        return [
            f"{role} backbone: {'; '.join(describe_source(s) for s in sources)}"
            for role, sources in self.init.items()
            if sources
        ]

    def describe_training(self) -> list[str]:
        """A caution when any fold learned from phantom studies only (empty otherwise)."""
        if not any(m.training_data == "phantom" for m in self.models):
            return []
        return [PHANTOM_CAUTION]

    @property
    def crop_config(self):
        return self.models[0].crops

    @property
    def fallback(self) -> np.ndarray:
        """(25, 3) mean of the folds' training fallbacks."""
        return np.mean([m.fallback for m in self.models], axis=0)

    def predict(self, stacks) -> EnsemblePrediction:
        """Ensemble prediction for one study's chosen stacks (description -> stacks).

        Every fold localises, its zoomed look centred where the folds' whole looks agree, and
        the folds' points are combined (:func:`.localize.localize_consensus`, so one fold's
        misnamed levels are outvoted); every fold grades at the combined points.
        So folds with the same crop settings grade the same crops: they are cut once. On CPU the
        folds run side by side (:func:`fold_map`); the numbers are those of one after the other.
        """
        from spinegrade.crops import StudyPoints
        from spinegrade.inference import crop_views, grade_study
        from spinegrade.localize import localize_consensus

        with fold_map(self.device, len(self.models)) as each_fold:
            points = (
                localize_consensus([m.localizer for m in self.models], stacks, each_fold)
                if stacks
                else StudyPoints()
            )
            views: dict[str, list] = {}
            for m in self.models:
                key = repr(m.crops)  # the crop settings (a dataclass): equal settings, equal crops
                if stacks and key not in views:
                    views[key] = crop_views(stacks, points, m.crops)
            preds = list(
                each_fold(lambda m: grade_study(m, stacks, points, views.get(repr(m.crops))),
                          self.models)
            )  # fmt: skip
        graded = np.stack([p.graded for p in preds])  # (F, 25)
        probs = np.stack([p.probs for p in preds])  # (F, 25, 3)
        seen = graded.any(axis=0)
        weights = np.where(seen[None, :], graded, 1.0)[..., None]  # unseen: mean of fallbacks
        mean = (probs * weights).sum(axis=0) / weights.sum(axis=0)
        mean /= mean.sum(axis=1, keepdims=True)
        return EnsemblePrediction(mean, seen, points.xyz)

    def prior_prediction(self) -> EnsemblePrediction:
        """What a study no model could see gets: the folds' training fallback everywhere."""
        probs = self.fallback / self.fallback.sum(axis=1, keepdims=True)
        nan_points = np.full((len(CONDITIONS), len(LEVELS), 3), np.nan)
        return EnsemblePrediction(probs, np.zeros(len(LABEL_COLUMNS), dtype=bool), nan_points)

    def saliency(self, column: str, crop: np.ndarray) -> np.ndarray | None:
        """Where the first fold's grader looked for ``column`` on ``crop`` (see report)."""
        import torch

        from spinegrade.constants import COLUMN_LEVEL, CONDITION_GROUP
        from spinegrade.report import input_saliency

        model = self.models[0].graders.get(CONDITION_GROUP[COLUMN_CONDITION[column]])
        if model is None:
            return None
        level = torch.tensor([LEVELS.index(COLUMN_LEVEL[column])], device=self.device)
        severity = torch.tensor([0.0, 1.0, 2.0], device=self.device)

        def expected_severity(x: torch.Tensor) -> torch.Tensor:
            probs = model.eval()(x.to(self.device), level)[:, 0].float().softmax(-1)
            return (probs * severity).sum()

        return input_saliency(expected_severity, crop)


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
    work_dir: Path
    report_dir: Path | None = None
    index_html: Path | None = None
    studies_path: Path | None = None  # studies.csv: study id -> input folder and series
    warnings: dict[int, list[str]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    per_study_s: list[float] = field(default_factory=list)  # model wall time per study
    per_study_cpu_s: list[float] = field(default_factory=list)  # its CPU time (all threads)
    graded_per_study: list[int] = field(default_factory=list)  # targets a model saw (of 25)
    weights_init: list[str] = field(default_factory=list)  # where the backbones started training
    model_notes: list[str] = field(default_factory=list)  # e.g. a phantom-trained run's caution


# Shown with the predictions of a run trained on `spinegrade synth` data only. On 38 real sagittal
# T2 series (SPIDER, BENCHMARKS.md "Real anatomy") the demo's fold consensus put a third of the
# levels more than 5 mm from their disc and named about one in six as a neighbouring disc.
PHANTOM_CAUTION = (
    "Trained on synthetic phantom studies only: on real spines its localiser can put a level "
    "one disc off, and its grades are not validated on real images. Check the level labels on "
    "each figure; not for clinical use."
)

_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^\s/\\:;,'\"()]+)+[/\\]?")


def scrub_paths(text: str) -> str:
    """Replace file paths in a message by their last part (folder names may carry patient names)."""
    return _PATH.sub(lambda m: "…/" + Path(m.group(0).rstrip("/\\")).name, text)


def study_warnings(
    study_id: int,
    stacks: dict,
    graded: np.ndarray,
    failures: list[dict],
    inherited: list[str],
) -> list[str]:
    """Warnings of one study: guessed series types, unreadable or missing series, fallbacks."""
    out = [w for w in inherited if w.startswith(f"study {study_id}:")]
    for f in failures:
        if int(f["study_id"]) == study_id:
            out.append(
                f"study {study_id}: series {f['series_id']} could not be cached "
                f"({scrub_paths(str(f['reason']))[:200]})"
            )
    missing = missing_series_warning(study_id, {d for d, v in stacks.items() if v})
    if missing:
        out.append(missing)
    present = {d for d, v in stacks.items() if v}
    unlocated = [
        c
        for j, c in enumerate(LABEL_COLUMNS)
        if not graded[j] and CONDITION_SERIES[COLUMN_CONDITION[c]] in present
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
) -> PredictResult:
    """Predict every study of ``input_dir`` with the fold ensemble of ``run_dir``.

    Writes ``out_csv`` (25 rows a study, the competition's row order, rows summing to 1),
    ``studies.csv`` beside it (which input folder and series each study id stands for, see
    :data:`STUDIES_COLUMNS`) and, with ``report_dir``, the per-study reports and ``index.html``
    (with each study's input folder). ``cache_dir`` is the work
    folder (default: ``.spinegrade_cache/<input hash>`` beside ``out_csv``); it is never inside
    the input. ``predictor``: an ensemble already loaded from ``run_dir`` (a service grading
    study after study loads it once).

    Raises ValueError (after writing the outputs, for inspection) when every study fell back to
    the training prior, or, with ``strict``, when any target of any study did.
    """
    from spinegrade.preprocess import preprocess_dataset, refuse_other_cache
    from spinegrade.rundir import load_run_config

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
        predictor = Predictor.from_run_dir(run_dir, folds, device)
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
        prepared.kind, work, Path(report_dir) if report_dir else None,
    )  # fmt: skip
    result.weights_init = predictor.describe_init()
    result.model_notes = predictor.describe_training()
    preds = _predict_all(
        predictor, prepared, work / "cache", summary.failures, result, progress, workers
    )
    result.submission = submission_frame({p.study_id: p.probs for p in preds})
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out_csv, result.submission)
    result.studies_path = write_studies_csv(prepared.studies, out_csv.with_name(STUDIES_CSV))
    if result.report_dir is not None:
        from spinegrade.report import write_index_html

        title = f"spinegrade report: {len(preds)} studies, {len(predictor.folds)}-fold ensemble"
        folders = study_folders(prepared.studies)
        result.index_html = write_index_html(
            result.report_dir, preds, title, folders, result.weights_init, result.model_notes
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
    """Every study (or, with ``--strict``, any target) fell back to the training prior."""


def _check_fallbacks(result: PredictResult, strict: bool) -> None:
    """A run whose models graded nothing is an error, not a submission of priors."""
    ids = result.study_ids
    prior_only = [s for s, n in zip(ids, result.graded_per_study, strict=True) if n == 0]
    some_prior = [s for s, n in zip(ids, result.graded_per_study, strict=True) if n < 25]
    written = f"{result.submission_path} was written for inspection"
    if ids and len(prior_only) == len(ids):
        raise FallbackError(
            f"every study ({len(ids)}) fell back to the training prior: no model graded any "
            f"target (first warnings: {result.warnings.get(ids[0], [])[:2]}); {written}. Check "
            "that the input holds lumbar MRI series the run was trained on"
        )
    if strict and some_prior:
        raise FallbackError(
            f"--strict: {len(some_prior)} of {len(ids)} studies use the training prior for some "
            f"targets (e.g. study {some_prior[0]}: {result.warnings.get(some_prior[0], [])[:2]}); "
            f"{written}"
        )


def write_studies_csv(studies: pd.DataFrame, path: Path) -> Path:
    """Write the studies.csv table atomically; returns ``path``."""
    return write_csv(path, studies)


def _predict_all(
    predictor: Predictor,
    prepared: PreparedInput,
    cache: Path,
    failures: list[dict],
    result: PredictResult,
    progress: bool,
    workers: int = 1,
) -> list:
    """Predict (and report) study by study, so memory holds one study's stacks at a time.

    With ``workers`` > 1 (CPU only), that many single-threaded processes predict one study each,
    every worker loading the run's models once; the outputs are the same as one process's, in the
    same order. One process already runs a study's folds side by side (:func:`fold_map`), so
    workers pay off only with more cores than folds (on 2 cores: 2.2 vs 2.0 s a study, twice the
    memory; BENCHMARKS.md, "Prediction latency").
    """
    from spinegrade.progress import progress_bar

    job = _StudyJob(
        cache, (cache / "index.csv").is_file(), failures, prepared.warnings, result.report_dir
    )
    ids = prepared.study_ids
    if workers > 1 and len(ids) > 1 and predictor.device == "cpu":
        from spinegrade.parallel import process_pool

        spawn = multiprocessing.get_context("spawn")  # never fork a process that holds torch
        with process_pool(min(workers, len(ids)), spawn) as pool:
            runs = pool.map(
                _predict_in_worker,
                ids,
                [(predictor.run_dir, predictor.folds)] * len(ids),
                [job] * len(ids),
            )
            done = list(
                progress_bar(runs, total=len(ids), desc="predicting", unit="study",
                             enabled=progress)
            )  # fmt: skip
    else:
        bar = progress_bar(ids, desc="predicting", unit="study", enabled=progress)
        done = [_predict_one(predictor, sid, job) for sid in bar]
    preds = []
    for pred, wall_s, cpu_s, graded in done:
        result.per_study_s.append(wall_s)
        result.per_study_cpu_s.append(cpu_s)
        result.graded_per_study.append(graded)
        for w in pred.warnings:
            log.warning(scrub_paths(w))
        result.warnings[pred.study_id] = pred.warnings = [scrub_paths(w) for w in pred.warnings]
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


def _predict_one(predictor: Predictor, sid: int, job: _StudyJob):
    """One study: (StudyPrediction, model wall s, its CPU s, targets graded); never raises."""
    from spinegrade.datasets import load_studies, used_series
    from spinegrade.report import StudyPrediction

    t, c = time.perf_counter(), time.process_time()
    errors: list[str] = []
    try:
        stacks = (
            load_studies(job.cache, [sid], split=SPLIT, progress=False)[sid].stacks
            if job.has_index
            else {}
        )
        ens = predictor.predict(stacks)
    except Exception as exc:  # one bad study must not stop the batch: it gets the prior
        stacks, ens = {}, predictor.prior_prediction()
        errors.append(f"study {sid}: prediction failed ({type(exc).__name__}: {exc})")
    wall_s, cpu_s = time.perf_counter() - t, time.process_time() - c
    warns = errors + study_warnings(sid, stacks, ens.graded, job.failures, job.input_warnings)
    source = ["model" if g else "prior" for g in ens.graded]
    pred = StudyPrediction(sid, ens.probs, source, ens.points, warns, used_series(stacks))
    if job.report_dir is not None:
        try:
            _report_study(predictor, pred, stacks, job.report_dir)
        except Exception as exc:  # the submission matters more than one figure
            warns.append(f"study {sid}: report failed ({type(exc).__name__}: {exc})")
    return pred, wall_s, cpu_s, int(ens.graded.sum())


_WORKER_ENSEMBLE: dict[tuple, Predictor] = {}  # a worker process's ensemble, loaded once


def _predict_in_worker(sid: int, run: tuple[Path, list[int]], job: _StudyJob):
    """:func:`_predict_one` in a worker process: one thread, the run's models loaded once."""
    import torch

    key = (str(run[0]), tuple(run[1]))
    if key not in _WORKER_ENSEMBLE:
        torch.set_num_threads(1)
        _WORKER_ENSEMBLE[key] = Predictor.from_run_dir(Path(run[0]), list(run[1]), "cpu")
    return _predict_one(_WORKER_ENSEMBLE[key], sid, job)


def _report_study(predictor: Predictor, pred, stacks: dict, report_dir: Path) -> None:
    """Cut the crops at the ensemble's points and write the study's report folder."""
    from spinegrade.crops import StudyPoints, make_crops
    from spinegrade.report import ReportInputs, write_study_report

    # Only targets the ensemble graded are shown: a crop for a prior-filled target would suggest
    # the model saw something it did not.
    graded = [c for c, s in zip(LABEL_COLUMNS, pred.source, strict=True) if s == "model"]
    points = StudyPoints(pred.points.copy())
    crops = make_crops(stacks, points, predictor.crop_config, columns=graded) if stacks else {}
    inputs = ReportInputs(stacks=stacks, crops=crops, saliency_fn=predictor.saliency)
    info = {"folds": predictor.folds, "device": predictor.device, "init": predictor.init}
    info["training_data"] = sorted({m.training_data or "not recorded" for m in predictor.models})
    info["notes"] = predictor.describe_training()
    write_study_report(report_dir, pred, inputs, info)
