"""Prediction latency per study (fold ensemble) and peak memory, on a trained run folder.

Runs ``spinegrade.inference.predict.predict`` on an input (RSNA test layout or raw DICOM folder)
three ways and reports, per study: preprocessing (DICOM -> cache), the model (every fold's localiser
and graders), and the report (figure with saliency, grades.json). Peak resident memory is that of
this process (the models and one study at a time) and of the preprocessing workers, if any (an
upper bound: Linux carries a parent's high-water mark into ``ru_maxrss`` of the children it
starts, so the workers' figure is at least this process's size when they started).

    .venv/bin/python bench/bench_predict.py [RUN_DIR] [INPUT] [--threads 2] [--no-report]
        [--workers 2] [--engine torch|onnx|auto] [--batch-studies 8]
    .venv/bin/python bench/bench_predict.py RUN_DIR INPUT --compare-engines --no-report

``--compare-engines`` predicts the same studies with torch and with ONNX Runtime (the run must be
exported: ``spinegrade export RUN_DIR``), interleaved, best of ``--repeat`` rounds, and prints one
table: model ms a study for each, the speed ratio and the largest probability difference.

Defaults: ``demo_run/run`` and ``demo_run/data`` (what ``make demo`` leaves behind). The work
folder is a fresh temporary one, so preprocessing is measured cold. Prints figures; never fails on
time.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_mib(who: int) -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(who).ru_maxrss / 1024.0


def _grader_full_coverage(run_dir: Path, folds: list[int], device: str, repeats: int = 3) -> float:
    """Seconds to grade 25 crops (one study, every target located) with every fold's graders.

    A weakly trained localiser can put points outside the series, and then fewer crops are graded;
    this times the full load so the latency above can be read as a lower or upper bound.
    """
    from spinegrade.inference.fold_models import grade_crops, load_fold_models
    from spinegrade.inference.run_folder import fold_dir
    from spinegrade.task import LABEL_COLUMNS

    models = [load_fold_models(fold_dir(run_dir, k), device=device) for k in folds]
    c = models[0].crops
    rng = np.random.default_rng(0)
    crops = {col: rng.standard_normal((c.slices, c.size, c.size), dtype=np.float32)
             for col in LABEL_COLUMNS}  # fmt: skip
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for m in models:
            grade_crops(m.graders, crops)
        best = min(best, time.perf_counter() - t)
    return best


def _predict_once(args, engine: str, report: bool):
    """One prediction into a fresh work folder: (PredictResult, wall s)."""
    from spinegrade.inference.predict import predict

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        result = predict(
            args.run_dir, args.input, work / "submission.csv",
            report_dir=work / "report" if report else None, cache_dir=work / "work",
            device=args.device, workers=args.workers, progress=False, engine=engine,
            batch_studies=args.batch_studies,
        )  # fmt: skip
        return result, time.perf_counter() - t0


def compare_engines(args) -> int:
    """torch against ONNX Runtime on the same run and studies: speed and agreement."""
    best: dict[str, float] = {}
    subs = {}
    for _ in range(args.repeat):
        for engine in ("torch", "onnx"):
            result, _ = _predict_once(args, engine, report=False)
            model_s = result.timings["predict_and_report_s"] / len(result.study_ids)
            best[engine] = min(best.get(engine, float("inf")), model_s)
            subs[engine] = (result.engine, result.submission)
    cols = [c for c in subs["torch"][1].columns if c != "row_id"]
    a, b = subs["torch"][1], subs["onnx"][1]
    assert (a["row_id"] == b["row_id"]).all(), "the two engines predicted different rows"
    diff = float(np.abs(a[cols].to_numpy() - b[cols].to_numpy()).max())
    studies = a["row_id"].str.split("_").str[0].nunique()
    print(f"run {args.run_dir}, input {args.input}: {studies} studies ({len(a) // studies} rows "
          f"a study), torch threads {args.threads}, batch {args.batch_studies}, "
          f"best of {args.repeat}")  # fmt: skip
    print("| engine | model (every fold), ms a study | speed vs torch |\n|---|---|---|")
    for engine in ("torch", "onnx"):
        name = subs[engine][0]
        print(f"| {name} | {best[engine] * 1000:.0f} | {best['torch'] / best[engine]:.2f}x |")
    print(f"largest |p_onnx - p_torch| over every row and grade: {diff:.2e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="demo_run/run", type=Path)
    parser.add_argument("input", nargs="?", default="demo_run/data", type=Path)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-report", action="store_true", help="skip figures (model only)")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes (predict's --workers; 1 = inline)"
    )
    parser.add_argument("--engine", default="torch", help="torch | onnx | auto")
    parser.add_argument("--batch-studies", type=int, default=8, help="studies graded together")
    parser.add_argument(
        "--compare-engines",
        action="store_true",
        help="torch against ONNX Runtime on the same studies (one table)",
    )
    parser.add_argument("--repeat", type=int, default=2, help="rounds for --compare-engines")
    args = parser.parse_args(argv)
    # As the CLI does: idle OpenMP threads sleep (set OMP_WAIT_POLICY=ACTIVE to see the spinning).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    if args.compare_engines:
        return compare_engines(args)
    result, wall = _predict_once(args, args.engine, report=not args.no_report)
    n = len(result.study_ids)
    per = np.asarray(result.per_study_s)
    t = result.timings
    print(f"run {args.run_dir} ({len(result.folds)} folds: {result.folds}), "
          f"device {result.device}, engine {result.engine}, "
          f"{args.batch_studies} studies a batch")  # fmt: skip
    print(
        f"input {args.input}: {n} studies ({result.input_kind}), torch threads {args.threads}"
        + (f", {args.workers} single-threaded worker processes" if args.workers > 1 else "")
    )
    print(f"load models            {t['load_models_s']:8.2f} s")
    print(f"preprocess             {t['preprocess_s'] / n * 1000:8.0f} ms/study")
    print(
        f"model (ensemble)       {np.median(per) * 1000:8.0f} ms/study median, "
        f"p90 {np.percentile(per, 90) * 1000:.0f} ms"
    )
    print(f"  targets graded         {np.mean(result.graded_per_study):8.1f} of 25 a study")
    full = _grader_full_coverage(args.run_dir, result.folds, result.device)
    print(f"  grading all 25 crops   {full * 1000:8.0f} ms/study (every fold; upper bound)")
    cpu = np.asarray(result.per_study_cpu_s)
    print(f"  CPU time (all threads) {np.median(cpu) * 1000:8.0f} ms/study median")
    rest = t["predict_and_report_s"] - sum(per)
    if args.workers == 1 and not args.no_report:  # with workers, studies overlap
        print(f"report (fig+saliency)  {rest / n * 1000:8.0f} ms/study")
    what = "model" if args.no_report else "model + report"
    print(f"throughput ({what})  {t['predict_and_report_s'] / n * 1000:8.0f} ms/study "
          f"(wall / studies; worker start-up included)")  # fmt: skip
    print(f"total                  {wall:8.1f} s ({wall / n:.2f} s/study end to end)")
    print(f"peak RSS: this process {_peak_mib(resource.RUSAGE_SELF):.0f} MiB, "
          f"workers {_peak_mib(resource.RUSAGE_CHILDREN):.0f} MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
