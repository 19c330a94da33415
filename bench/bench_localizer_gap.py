"""How much of a run's out-of-fold loss is the localiser's: grade the same OOF studies with the
same fold models at the localised points and at the true (labelled) points; prints a table.

    .venv/bin/python bench/bench_localizer_gap.py RUN_DIR DATA_DIR CACHE_DIR [--folds 0 1]
    .venv/bin/python bench/bench_localizer_gap.py demo_run/run demo_run/data demo_run/cache

The difference between the two rows is what a perfect localiser would gain with these graders;
the distance of the true-point row from the Bayes limit (synthetic data) is the graders' share.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch

from spinegrade.data.studies import load_studies
from spinegrade.evaluation.metrics import score_frames
from spinegrade.inference.fold_models import grade_study, load_fold_models
from spinegrade.localization.derived import derive_points
from spinegrade.localization.localize import localize_study
from spinegrade.rsna import load_dataset, normalize_coordinates
from spinegrade.rsna.submission import submission_frame

TERMS = ("spinal", "foraminal", "subarticular", "any_severe_spinal", "score")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("data_dir")
    ap.add_argument("cache_dir")
    ap.add_argument("--folds", type=int, nargs="*", default=None, help="default: every fold")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folds = pd.read_csv(os.path.join(args.run_dir, "folds.csv"))
    wanted = args.folds if args.folds else sorted(folds["fold"].unique())
    ids = folds.loc[folds["fold"].isin(wanted), "study_id"].astype(int).tolist()
    ds = load_dataset(args.data_dir)
    if ds.coordinates is None:
        raise SystemExit(f"{args.data_dir}: no label coordinates, so there are no true points")
    coords = normalize_coordinates(ds.coordinates)
    studies = load_studies(args.cache_dir, ids, ds.labels, coords, progress=False)
    probs: dict[str, dict[int, np.ndarray]] = {"localised points": {}, "true points": {}}
    for k in wanted:
        models = load_fold_models(os.path.join(args.run_dir, f"fold_{k}"))
        for sid in folds.loc[folds["fold"] == k, "study_id"].astype(int):
            study = studies[sid]
            where = {
                "localised points": localize_study(models.localizer, study.stacks),
                # Unlabelled recesses come from the canal + offsets, as in training.
                "true points": derive_points(study.points, models.localizer.offsets),
            }
            for name, points in where.items():
                probs[name][sid] = grade_study(models, study.stacks, points).probs
    labels = ds.labels.set_index("study_id").loc[ids].reset_index()
    print(f"### Localiser gap: {args.run_dir}, folds {list(map(int, wanted))}, {len(ids)} studies")
    print("| graded at | " + " | ".join(TERMS) + " |")
    print("|---|" + "---|" * len(TERMS))
    for name, p in probs.items():
        s = score_frames(labels, submission_frame(p))
        print(f"| {name} | " + " | ".join(f"{s[t]:.3f}" for t in TERMS) + " |")


if __name__ == "__main__":
    main()
