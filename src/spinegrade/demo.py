"""The one-command demo: phantom + real spines -> cache -> 5-fold CV -> prediction -> reports.

``spinegrade demo --out DIR`` (and ``make demo``) runs every stage of the package on the phantom
dataset, whose true label probabilities are known, and ends with the scores that matter side by
side: the out-of-fold score, the constant baselines, the Bayes limit (the best any model can do
given the readers' noise), and the same on held-out test studies the training never saw.

Its localiser also learns from real spines: the SPIDER T2 set vendored in the repository
(``vendor/spider-t2space``, CC BY 4.0; see its README) is imported and trained on beside the
phantom, under the same patient-grouped folds, so the demo reports how well it names real
levels out of fold. SPIDER has no RSNA grades: the graders learn from the phantom only, and the
predictions say so. What SPIDER's readers did grade (Pfirrmann and four disc findings, the
``spider_discs`` task) a second run learns out of fold on the same folds, starting from the
first run's localisers (:func:`train_real_grades`); its table is printed beside the phantom's.

Layout of ``DIR``::

    data/            synthetic RSNA layout (+ truth/: test labels and true probabilities)
    real/            the real spines in RSNA layout (`spinegrade import spider`)
    cache/           preprocessed volumes, train and test splits
    cache_real/      preprocessed real spines
    run/             the training run (config.yaml, folds.csv, fold_K/, oof.csv, cv.json)
    run_discs/       SPIDER's disc grades learned out of fold (the same folds, run/'s localisers)
    submission.csv   held-out test predictions (competition format)
    report/          index.html + one folder per test study
    demo.json        every number printed at the end, and the time each stage took

Every stage resumes: the data is generated once, preprocess skips cached studies, training skips
finished folds and resumes an interrupted one from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from spinegrade.util.atomic import write_json

log = logging.getLogger(__name__)

TERMS: tuple[str, ...] = ("spinal", "foraminal", "subarticular", "any_severe_spinal")
STAGES: tuple[str, ...] = ("synthesise", "import real spines", "preprocess", "train",
                           "real grades", "predict", "score")  # fmt: skip
REAL_SOURCE = "spider-t2space"  # the source name `spinegrade import spider` gives the set
# The vendored real set, in a source checkout (an installed package has no vendor/ folder).
VENDORED_REAL = (
    Path(__file__).resolve().parents[2] / "vendor" / "spider-t2space" / "spider-t2space.tar.xz"
)


@dataclass
class DemoResult:
    """The demo's numbers and where its outputs are."""

    out_dir: Path
    cv: dict
    test: dict[str, dict[str, float]]
    train_truth: dict[str, dict[str, float]]  # true_probs, bayes_limit on the training labels
    stage_seconds: dict[str, float] = field(default_factory=dict)
    per_study_ms: float = 0.0
    n_train: int = 0
    n_test: int = 0
    real: dict | None = None  # out-of-fold level naming on the real spines (cv levels_by_source)
    real_grades: dict | None = None  # run_discs/cv.json: SPIDER's disc grades out of fold

    @property
    def index_html(self) -> Path:
        return self.out_dir / "report" / "index.html"

    @property
    def submission(self) -> Path:
        return self.out_dir / "submission.csv"


def default_workers() -> int:
    """Processes for preprocessing: the cores this process may use (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _synthesise(
    data: Path, n_studies: int, n_test: int, seed: int, workers: int, progress: bool
) -> bool:
    """Generate the phantom dataset unless a complete one is there; True if it was generated.

    ``truth/phantom.json`` is written last by the generator, so its presence (with the asked-for
    sizes and seed) marks a complete dataset; anything else is regenerated from scratch.
    """
    from spinegrade.phantom import generate_dataset
    from spinegrade.util.progress import progress_bar

    meta_path = data / "truth" / "phantom.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (meta.get("n_train"), meta.get("n_test"), meta.get("seed")) == (n_studies, n_test, seed):
            return False
        raise ValueError(
            f"{data} holds a synthetic dataset of {meta.get('n_train')} + {meta.get('n_test')} "
            f"studies (seed {meta.get('seed')}), not {n_studies} + {n_test} (seed {seed}); use "
            "another --out folder or the same sizes to resume"
        )
    bar = progress_bar(
        total=n_studies + n_test, desc="synthesising", unit="study", enabled=progress
    )

    def tick(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        generate_dataset(
            data, n_train=n_studies, n_test=n_test, seed=seed, workers=workers, overwrite=True,
            progress=tick,
        )  # fmt: skip
    finally:
        bar.close()
    return True


def add_truth_to_cv(run: Path, data: Path) -> dict:
    """Put what the phantom's truth scores on the run's studies into ``run/cv.json``.

    ``bayes_limit`` (the true probabilities reweighted 1/2/4, the best expected score) and
    ``true_probs`` (the raw true probabilities) go right after the baselines, on the same labels
    as the OOF score. Training itself never reads the truth; only the demo knows it has one.
    """
    from spinegrade.phantom import truth_scores
    from spinegrade.rsna import load_folds, load_train

    path = run / "cv.json"
    cv = json.loads(path.read_text())
    folds = load_folds(run / "folds.csv")
    labels = load_train(data / "train.csv")
    labels = labels[labels["study_id"].isin(folds["study_id"])].reset_index(drop=True)
    truth = truth_scores(labels, data / "truth" / "train_true_probs.csv")
    out: dict = {}
    for key, value in cv.items():
        if key not in ("bayes_limit", "true_probs"):
            out[key] = value
        if key == "baselines":
            out["bayes_limit"] = truth.get("bayes_limit")
            out["true_probs"] = truth.get("true_probs")
    write_json(path, out)
    return out


def score_test(data: Path, submission: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Held-out scores: the model, the constants learned on train, and the truth (Bayes limit)."""
    from spinegrade.evaluation.metrics import (
        best_constant_submission,
        prior_submission,
        score_frames,
        uniform_submission,
    )
    from spinegrade.phantom import truth_scores
    from spinegrade.rsna import load_train
    from spinegrade.task import LABEL_COLUMNS

    truth = pd.read_csv(
        data / "truth" / "test_labels.csv", dtype={c: "string" for c in LABEL_COLUMNS}
    )
    train = load_train(data / "train.csv")
    ids = truth["study_id"].astype(int).tolist()
    out = {
        "model": score_frames(truth, submission, strict=False),
        "uniform": score_frames(truth, uniform_submission(ids)),
        "prior": score_frames(truth, prior_submission(train, ids)),
        "best_constant": score_frames(truth, best_constant_submission(train, ids)),
    }
    out |= truth_scores(truth, data / "truth" / "test_true_probs.csv")
    return out


def run_demo(
    out_dir: Path | str = "demo_run",
    n_studies: int = 100,
    n_test: int = 20,
    seed: int = 0,
    config: str = "quick",
    overrides: list[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    real: Path | str | None = VENDORED_REAL,
) -> DemoResult:
    """Run (or resume) every stage of the demo in ``out_dir``; returns its numbers.

    ``real``: the SPIDER set (folder or tarball) the localiser also learns from; None trains on
    the phantom alone. A ``real`` that does not exist is an error (no silent phantom-only run).
    """
    from spinegrade.config import load_config
    from spinegrade.inference.predict import predict
    from spinegrade.preprocessing.build import preprocess_dataset
    from spinegrade.task import dataset_task
    from spinegrade.training.cv import cross_validate, merge_run

    out = Path(out_dir)
    data, cache, run = out / "data", out / "cache", out / "run"
    real_data, real_cache = out / "real", out / "cache_real"
    workers = workers or default_workers()
    cfg = load_config(config, list(overrides or []))  # fail on a bad override before any work
    if real is not None and not Path(real).exists():
        raise FileNotFoundError(
            f"{real}: the real spine set is not there; it ships in the repository "
            "(vendor/spider-t2space), or pass --real none to train on the phantom alone"
        )
    times: dict[str, float] = {}

    def stage(k: int, text: str) -> float:
        echo(f"[{k}/{len(STAGES)}] {text}")
        return time.perf_counter()

    t = stage(1, f"synthetic data: {n_studies} training + {n_test} held-out studies -> {data}")
    made = _synthesise(data, n_studies, n_test, seed, workers, progress)
    times["synthesise_s"] = time.perf_counter() - t
    if not made:
        echo("      already there, kept")
    t = stage(2, f"real spines: {real} -> {real_data}" if real else "real spines: none (--real)")
    if real is not None:
        from spinegrade.rsna.spider import import_spider

        done = import_spider(real, real_data, progress=progress)
        echo(f"      {'already there, kept' if done.skipped else 'imported'}: {done.studies} "
             "studies (SPIDER, CC BY 4.0: van der Graaf et al., Sci Data 2024)")  # fmt: skip
        cfg.data.sources = [{"data_dir": str(real_data), "cache_dir": str(real_cache)}]
    times["import_s"] = time.perf_counter() - t
    t = stage(3, f"preprocess: train and test splits -> {cache}")
    for split in ("train", "test"):
        summary = preprocess_dataset(
            data, cache, split=split, workers=workers, size=cfg.data.cache_size,
            mm=cfg.data.cache_mm, progress=progress,
        )  # fmt: skip
        if summary.failures:
            echo(f"      {split}: {len(summary.failures)} series could not be cached")
    if real is not None:
        summary = preprocess_dataset(
            real_data, real_cache, split="train", workers=workers, size=cfg.data.cache_size,
            mm=cfg.data.cache_mm, progress=progress,
        )  # fmt: skip
        if summary.failures:
            echo(f"      real: {len(summary.failures)} series could not be cached")
    times["preprocess_s"] = time.perf_counter() - t
    t = stage(4, f"train: '{config}' config, {cfg.data.n_folds}-fold CV -> {run}")
    cv = cross_validate(data, cache, run, cfg, progress=progress) or merge_run(run)
    cv = add_truth_to_cv(run, data)
    times["train_s"] = time.perf_counter() - t
    train_truth = {k: cv[k] for k in ("true_probs", "bayes_limit") if cv.get(k)}
    real_grades = None
    if real is not None and (dataset_task(real_data).name != "rsna2024"):
        t = stage(5, f"real grades: SPIDER's disc gradings, same folds, {run.name}'s localisers "
                     f"-> {out / 'run_discs'}")  # fmt: skip
        real_grades = train_real_grades(
            run, real_data, real_cache, out / "run_discs", config, list(overrides or []),
            progress,
        )  # fmt: skip
        times["real_grades_s"] = time.perf_counter() - t
    else:
        stage(5, "real grades: none (no real set)")
    t = stage(6, "predict the held-out studies with the fold ensemble, write the reports")
    # The work folder is the demo folder, so predict reuses the test split already cached.
    result = predict(
        run, data, out / "submission.csv", report_dir=out / "report", cache_dir=out,
        workers=workers, progress=progress,
    )  # fmt: skip
    times["predict_s"] = time.perf_counter() - t
    t = stage(7, "score the held-out predictions against their truth")
    test = score_test(data, result.submission)
    times["score_s"] = time.perf_counter() - t
    demo = DemoResult(
        out,
        cv,
        test,
        train_truth,
        stage_seconds={k: round(v, 1) for k, v in times.items()},
        per_study_ms=1000 * sum(result.per_study_s) / max(len(result.per_study_s), 1),
        n_train=int((cv.get("sources") or {}).get("phantom", {}).get("studies", cv["n_studies"])),
        n_test=len(result.study_ids),
        real=(cv.get("levels_by_source") or {}).get(REAL_SOURCE),
        real_grades=real_grades,
    )
    _write_summary(demo)
    return demo


def train_real_grades(
    run: Path,
    real_data: Path,
    real_cache: Path,
    out_run: Path,
    config: str,
    overrides: list[str],
    progress: bool = True,
) -> dict:
    """SPIDER's disc grades (its ``task.yaml``) learned out of fold; returns the run's cv.json.

    The folds are ``run``'s folds of the real spines, written ahead as data, and every fold's
    spinal localiser is ``run``'s same fold, loaded as it is (``localizer.init_from``, no
    further epochs): each disc is graded where a localiser that never saw its spine put it, so
    the figures are out of fold for the localiser and the graders alike. Resumes like any run.
    """
    from spinegrade.config import load_config
    from spinegrade.rsna import load_folds, save_folds
    from spinegrade.training.cv import cross_validate, merge_run

    folds = load_folds(run / "folds.csv")
    ids = set(pd.read_csv(real_data / "train.csv")["study_id"].astype(int))
    path = out_run / "folds.csv"
    if not path.is_file():
        out_run.mkdir(parents=True, exist_ok=True)
        save_folds(folds[folds["study_id"].isin(ids)].reset_index(drop=True), path)
    # One item teaches a disc's five findings at once (one crop, crop_bundles): an epoch over ~30
    # spines is 7 steps, so three times the config's epochs make 60% of the steps that five
    # one-finding items a disc took, for the same out-of-fold scores (BENCHMARKS.md, "Real grades").
    cfg = load_config(
        config,
        [*overrides, f"localizer.init_from={run}", "localizer.epochs=0",
         "localizer.tasks=[spinal]", "data.sources=[]"],
    )  # fmt: skip
    cfg.train.epochs *= 3
    return cross_validate(real_data, real_cache, out_run, cfg, progress=progress) or merge_run(
        out_run
    )


def _write_summary(demo: DemoResult) -> Path:
    path = demo.out_dir / "demo.json"
    payload = {
        "n_train": demo.n_train,
        "n_test": demo.n_test,
        "oof": demo.cv.get("oof"),
        "oof_baselines": demo.cv.get("baselines"),
        "oof_truth": demo.train_truth,
        "test": demo.test,
        "real_levels_oof": demo.real,
        "real_grades_oof": None
        if demo.real_grades is None
        else {k: demo.real_grades.get(k) for k in ("task", "oof", "baselines")},
        "stage_seconds": demo.stage_seconds,
        "predict_ms_per_study": round(demo.per_study_ms, 1),
    }
    return write_json(path, payload)


def summary_rows(demo: DemoResult) -> list[tuple[str, str, dict | None]]:
    """(set, what, metric dict) rows of the final table, best-known references included."""
    base = demo.cv.get("baselines", {})
    train = {"model": demo.cv.get("oof"), **base, **demo.train_truth}
    names = {
        "model": "model",
        "uniform": "uniform 1/3",
        "prior": "class prior",
        "best_constant": "best constant",
        "true_probs": "truth",
        "bayes_limit": "Bayes limit",
    }
    rows = [("OOF", names[k], train.get(k)) for k in names]
    rows += [("test", names[k], demo.test.get(k)) for k in names]
    return rows


def print_summary(demo: DemoResult, console=None) -> None:
    """The closing rich table and the paths to open."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"spinegrade demo: {demo.n_train} training, {demo.n_test} held-out studies")
    heads = ("set", "prediction", "score", "spinal", "foram.", "subart.", "any sev.")
    for name in heads:
        table.add_column(name, justify="left" if name in heads[:2] else "right", no_wrap=True)
    for split, what, m in summary_rows(demo):
        if not m:
            continue
        cells = [f"{m[k]:.3f}" for k in ("score", *TERMS)]
        table.add_row(split, what, *cells, style="bold green" if what == "model" else None)
    console.print(table)
    console.print(
        "OOF: 5-fold out-of-fold on the training studies; test: the fold ensemble on held-out "
        "studies. truth: the phantom's true probabilities; Bayes limit: truth x 1/2/4, the best "
        "score to expect. Lower is better."
    )
    if demo.real:
        r = demo.real
        console.print(
            f"real spines (SPIDER, out of fold): {r['within_5mm']:.0%} of {r['n']} levels within "
            f"5 mm of their disc's mid-plane, {r['misnamed']} named as another disc"
        )
    if demo.real_grades and demo.real_grades.get("oof"):
        from spinegrade.evaluation.grades import format_table

        console.print(
            f"real disc grades (SPIDER's readers, {demo.real_grades['task']}, out of fold; "
            "log loss lower is better, the others higher):"
        )
        for line in format_table(demo.real_grades["oof"], demo.real_grades["baselines"]):
            console.print(line, markup=False, highlight=False)
    minutes = sum(demo.stage_seconds.values()) / 60
    stages = ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in demo.stage_seconds.items())
    console.print(f"this run took {minutes:.1f} min ({stages})")
    console.print(f"prediction: {demo.per_study_ms:.0f} ms per study (fold ensemble)")
    console.print(f"open the report:  {demo.index_html.resolve()}")
    console.print(f"submission:       {demo.submission.resolve()}")
    console.print(f"run folder:       {(demo.out_dir / 'run').resolve()} (cv.json, oof.csv)")
