"""SPIDER's disc grades learned out of fold on a demo run's folds and localisers, over seeds.

    .venv/bin/python bench/bench_real_grades.py DEMO_DIR OUT_DIR [--seeds 0 1 2] -- KEY=VALUE ...

DEMO_DIR is a ``spinegrade demo --out DEMO_DIR`` folder (its ``run``, ``real`` and ``cache_real``).
Each seed trains the demo's real-grades stage again (``demo.train_real_grades``: the spider_discs
task on the 38 SPIDER spines, the demo run's folds of them, each fold's spinal localiser as it
is) with the overrides after ``--``, into ``OUT_DIR/seed<S>`` (a finished seed is read back, not
retrained). Prints per seed and as the mean over seeds: Pfirrmann's quadratic-weighted kappa,
within-one-grade share, balanced accuracy and log loss, and the four findings' ROC AUC, all out
of fold on the 190 lumbar discs. The figures of 38 spines move with the training seed by more
than most designs do (BENCHMARKS.md, "Real grades"): compare designs over several seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FINDINGS = ("disc_narrowing", "disc_bulging", "disc_herniation", "spondylolisthesis")


def row(cv: dict) -> dict[str, float]:
    """The figures of one run's cv.json."""
    c = cv["oof"]["conditions"]
    out = {f"pfirrmann_{k}": c["pfirrmann"][k]
           for k in ("qwk", "within_one", "balanced_accuracy", "log_loss")}  # fmt: skip
    out.update({f"{f}_auc": c[f]["roc_auc"] for f in FINDINGS})
    out["mean_log_loss"] = cv["oof"]["score"]
    return out


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--config", default="quick")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    from spinegrade.demo import train_real_grades

    d = args.demo_dir
    rows = []
    for seed in args.seeds:
        t = time.perf_counter()
        cv = train_real_grades(
            d / "run", d / "real", d / "cache_real", args.out_dir / f"seed{seed}", args.config,
            [*overrides, f"seed={seed}"], progress=False,
        )  # fmt: skip
        rows.append(row(cv))
        figures = " ".join(f"{k} {v:.3f}" for k, v in rows[-1].items())
        print(f"seed {seed} ({time.perf_counter() - t:.0f} s): {figures}", flush=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    print(f"mean over seeds {args.seeds} with {overrides or 'no overrides'}:")
    print(json.dumps({k: round(v, 3) for k, v in mean.items()}, indent=1))


if __name__ == "__main__":
    main()
