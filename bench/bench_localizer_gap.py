"""How much of a run's out-of-fold score is the localiser's: grade the same OOF studies with the
same fold models at the localised points and at the true (labelled) points; prints a table.

    .venv/bin/python bench/bench_localizer_gap.py RUN_DIR DATA_DIR CACHE_DIR [--folds 0 1]
    .venv/bin/python bench/bench_localizer_gap.py demo_run/run demo_run/data demo_run/cache
    .venv/bin/python bench/bench_localizer_gap.py demo_run/run_discs demo_run/real \
        demo_run/cache_real

RSNA 2024 runs are scored with the competition metric's terms; a run of another task (SPIDER's
disc grades) with its per-condition scores (:mod:`spinegrade.evaluation.grades`): log loss, and
QWK / within-one grade for ordinal conditions, ROC AUC for binary ones. True disc centres come
from the folder's ``train_disc_coordinates.csv`` where it has one (an imported real set), as in
training. The difference between the two rows is what a perfect localiser would gain with these
graders; the distance of the true-point row from the Bayes limit (synthetic data) is the
graders' share. Where the localiser derives disc centres in the spine's own axes
(``disc_in_frame``), a third row derives them from the same localised canal points in patient
axes (as localisers before it did), and a second table gives each row's disc-centre errors.
Where true disc centres are labelled, two more rows split the gap: the localised points with
the true centre put back only where the localised one is over ``--gross-mm`` off (the discs a
misnamed level or a lost chain put on another disc), and only where it is within.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch

from spinegrade.config import Config
from spinegrade.data.sources import configured_sources, load_tables, load_training_studies
from spinegrade.evaluation import grades as grade_scores
from spinegrade.evaluation.metrics import score_frames
from spinegrade.inference.fold_models import grade_study, load_fold_models
from spinegrade.localization.derived import derive_points
from spinegrade.localization.localize import localize_study
from spinegrade.rsna.submission import submission_frame
from spinegrade.task import Task

RSNA_TERMS = ("spinal", "foraminal", "subarticular", "any_severe_spinal", "score")


def _scores(labels: pd.DataFrame, probs: dict[int, np.ndarray], task: Task) -> dict[str, float]:
    """The figures of one row of the table: the metric's terms, or each condition's scores."""
    if task.is_rsna:
        s = score_frames(labels, submission_frame(probs))
        return {t: s[t] for t in RSNA_TERMS}
    s = grade_scores.score_grades(labels, grade_scores.predictions_frame(probs, task), task)
    out: dict[str, float] = {}
    for name, c in s["conditions"].items():
        if "qwk" in c:
            out[f"{name} QWK"], out[f"{name} within one"] = c["qwk"], c["within_one"]
        if c.get("roc_auc") is not None:
            out[f"{name} AUC"] = c["roc_auc"]
    out["mean log loss"] = s["score"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("--folds", type=int, nargs="*", default=None, help="default: every fold")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gross-mm", type=float, default=9.0, help="a disc centre this far is lost")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # The folder as the run's sources would name it (phantom or real), alone.
    cfg = Config()
    cfg.data.data_dir, cfg.data.cache_dir = str(args.data_dir), str(args.cache_dir)
    tables = load_tables(configured_sources(cfg))
    if tables.coordinates is None and tables.discs is None:
        raise SystemExit(f"{args.data_dir}: no label coordinates, so there are no true points")
    folds = pd.read_csv(args.run_dir / "folds.csv")
    folds = folds[folds["study_id"].isin(tables.labels["study_id"])]
    wanted = args.folds if args.folds else sorted(folds["fold"].unique())
    ids = folds.loc[folds["fold"].isin(wanted), "study_id"].astype(int).tolist()
    studies = load_training_studies(tables, progress=False)
    probs: dict[str, dict[int, np.ndarray]] = {}
    disc_mm: dict[str, list[np.ndarray]] = {}
    lost_row = f"localised; lost discs (> {args.gross_mm:g} mm) at their true centre"
    rest_row = "localised; the other discs at their true centre"
    for k in wanted:
        models = load_fold_models(args.run_dir / f"fold_{k}")
        offsets = models.localizer.offsets
        for sid in folds.loc[folds["fold"] == k, "study_id"].astype(int):
            study = studies[sid]
            located = localize_study(models.localizer, study.stacks)
            where = {
                "localised points": located,
                # Unlabelled recesses and disc centres come from the canal + offsets, as in
                # training.
                "true points": derive_points(study.points, offsets),
            }
            if "disc_in_frame" in offsets:
                bare = located.copy()
                bare.disc[:] = np.nan
                patient = {n: v for n, v in offsets.items() if n != "disc_in_frame"}
                where["localised, disc in patient axes"] = derive_points(bare, patient)
            miss = np.linalg.norm(located.disc - study.points.disc, axis=1)
            if np.isfinite(miss).any():
                lost = np.isfinite(miss) & (miss > args.gross_mm)
                rest = np.isfinite(miss) & ~lost
                for name, put_back in ((lost_row, lost), (rest_row, rest)):
                    mended = located.copy()
                    mended.disc[put_back] = study.points.disc[put_back]
                    where[name] = mended
            for name, points in where.items():
                probs.setdefault(name, {})[sid] = grade_study(models, study.stacks, points).probs
                miss = np.linalg.norm(points.disc - study.points.disc, axis=1)
                disc_mm.setdefault(name, []).append(miss[np.isfinite(miss)])
    labels = tables.labels.set_index("study_id").loc[ids].reset_index()
    rows = {name: _scores(labels, p, tables.task) for name, p in probs.items()}
    terms = list(next(iter(rows.values())))
    print(f"### Localiser gap: {args.run_dir}, folds {list(map(int, wanted))}, {len(ids)} studies")
    print("| graded at | " + " | ".join(terms) + " |")
    print("|---|" + "---|" * len(terms))
    for name, s in rows.items():
        print(f"| {name} | " + " | ".join(f"{s[t]:.3f}" for t in terms) + " |")
    errors = {name: np.concatenate(v) for name, v in disc_mm.items()}
    errors = {name: e for name, e in errors.items() if len(e) and name != "true points"}
    if errors:
        print(f"\n| disc centres of | discs | median mm | mean mm | over {args.gross_mm:g} mm |")
        print("|---|---|---|---|---|")
        for name, e in errors.items():
            lost = int((e > args.gross_mm).sum())
            print(f"| {name} | {len(e)} | {np.median(e):.1f} | {e.mean():.1f} | {lost} |")


if __name__ == "__main__":
    main()
