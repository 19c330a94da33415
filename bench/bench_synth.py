"""Phantom generator: studies per minute, and the scores its truth allows (Bayes limit vs prior).

Generates ``--studies`` training studies (default 100, the demo's size) with ``--workers``
processes (default 2) into a temporary folder and times it (wall clock, which other load on the
machine inflates, and the CPU time per study of a one-process probe, which it does not), then
scores on the competition metric:

- the truth: ``truth/train_true_probs.csv`` (the reader model's class probabilities given the
  latent severity, i.e. what a model that reads the anatomy perfectly could predict), and the
  same reweighted by 1/2/4 (the optimum of the weighted metric: the Bayes limit);
- the baselines that ignore the images: per-column class prior and best constant.

The same scores on a large label-only simulation (``--sim`` studies, no images) give the
expected values without the sampling noise of 100 studies.

    .venv/bin/python bench/bench_synth.py [--studies 100] [--workers 2] [--sim 20000] [--keep DIR]

As with any process pool, run it as a script (the ``__main__`` guard below).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.evaluation.metrics import (
    TERMS,
    best_constant_submission,
    prior_submission,
    score_frames,
)
from spinegrade.phantom import labels as pl
from spinegrade.phantom.generate import generate_dataset
from spinegrade.task import LABEL_COLUMNS, PROB_COLUMNS, SEVERITIES, submission_row_ids


def _fmt(result: dict[str, float]) -> str:
    return f"{result['score']:.4f}  (" + " / ".join(f"{result[t]:.3f}" for t in TERMS) + ")"


def _reweighted(sub: pd.DataFrame) -> pd.DataFrame:
    out = sub.copy()
    out[list(PROB_COLUMNS)] = pl.weighted_optimal(sub[list(PROB_COLUMNS)].to_numpy())
    return out


def score_dataset(root: Path) -> dict[str, dict[str, float]]:
    """Scores of the truth and of the image-blind baselines on a generated train split."""
    labels = pd.read_csv(root / "train.csv", dtype={c: "string" for c in LABEL_COLUMNS})
    truth = pd.read_csv(root / "truth" / "train_true_probs.csv")
    ids = labels["study_id"].astype(int).tolist()
    return {
        "true probabilities": score_frames(labels, truth),
        "Bayes limit (true x 1/2/4)": score_frames(labels, _reweighted(truth)),
        "class prior per column": score_frames(labels, prior_submission(labels, ids)),
        "best constant per column": score_frames(labels, best_constant_submission(labels, ids)),
    }


def score_simulation(n: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """The same scores on ``n`` label-only studies (expected values of the default settings)."""
    model = pl.LabelModel()
    rng = np.random.default_rng(seed)
    probs = pl.class_probs(pl.sample_latents(rng, n, model), model.reader_sd)
    grades = pl.sample_grades(rng, probs)
    ids = list(range(10**6, 10**6 + n))
    labels = pd.DataFrame(np.asarray(SEVERITIES)[grades], columns=list(LABEL_COLUMNS))
    labels.insert(0, "study_id", ids)
    rows = submission_row_ids(ids)
    flat = {f"{s}_{c}": probs[i, j] for i, s in enumerate(ids) for j, c in enumerate(LABEL_COLUMNS)}
    truth = pd.DataFrame([flat[r] for r in rows], columns=list(PROB_COLUMNS))
    truth.insert(0, "row_id", rows)
    return {
        "true probabilities": score_frames(labels, truth),
        "Bayes limit (true x 1/2/4)": score_frames(labels, _reweighted(truth)),
        "class prior per column": score_frames(labels, prior_submission(labels, ids)),
        "best constant per column": score_frames(labels, best_constant_submission(labels, ids)),
    }


def cpu_per_study(out: Path, n: int, seed: int) -> float:
    """CPU seconds per study in one process: unlike wall time, not inflated by other load."""
    t0 = time.process_time()
    generate_dataset(out, n, 0, seed=seed + 1, workers=1)
    return (time.process_time() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sim", type=int, default=20000, help="label-only studies (0: skip)")
    ap.add_argument("--keep", type=Path, default=None, help="write here and keep the dataset")
    ap.add_argument("--cpu-studies", type=int, default=6, help="studies for the CPU-time probe")
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs visible, workers={args.workers}")
    tmp = None if args.keep else tempfile.mkdtemp(prefix="phantom_bench_")
    root = args.keep or Path(tmp)
    try:
        cpu = cpu_per_study(root / "cpu_probe", args.cpu_studies, args.seed)
        print(
            f"CPU time per study (1 process, {args.cpu_studies} studies): {cpu:.2f} s -> "
            f"100 studies on 2 idle cores: {100 * cpu / 2:.0f} s"
        )
        t0 = time.perf_counter()
        meta = generate_dataset(
            root / "data", args.studies, 0, seed=args.seed, workers=args.workers
        )
        wall = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in (root / "data").rglob("*.dcm")) / 2**20
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(
            f"{args.studies} studies, {meta['files']} DICOM files, {size:.0f} MiB in {wall:.1f} s "
            f"wall: {60 * args.studies / wall:.1f} studies/min (load average at the end {load:.1f})"
        )
        terms = " / ".join(TERMS)
        print(f"\nscores on the generated train split (n={args.studies}): score  ({terms})")
        for name, result in score_dataset(root / "data").items():
            print(f"  {name:<28}{_fmt(result)}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.sim:
        print(f"\nexpected scores (label-only simulation, n={args.sim})")
        for name, result in score_simulation(args.sim).items():
            print(f"  {name:<28}{_fmt(result)}")


if __name__ == "__main__":
    main()
