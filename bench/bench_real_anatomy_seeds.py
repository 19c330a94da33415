"""Is a localiser design better on real spines? The canal's localiser over several training seeds.

    .venv/bin/python bench/bench_real_anatomy_seeds.py DATA CACHE OUT [--seeds 42 7 11 1 2 3]
        [--jobs 2] [--config quick] [--real REAL_DIR] [-- KEY=VALUE ...]

Two localisers that differ only by their training seed place 51-70% of the SPIDER levels within
5 mm (BENCHMARKS.md, "Real anatomy"): as much as any design change tried in #12. So a design is
judged on several seeds, paired with a baseline trained on the same seeds. For each seed this
trains fold 0 of DATA (a phantom made by ``spinegrade synth`` and cached by ``preprocess``) with
only the canal's localiser (``localizer.tasks=[spinal] train.groups=[]``, plus the design's
``KEY=VALUE`` overrides after ``--``) in its own single-threaded process, ``--jobs`` at a time,
then scores it with ``bench_real_anatomy.py`` on REAL_DIR (validation only: never tune against
it). Prints each seed's share within 5 / 10 mm and misnamed levels, their mean, and the pooled
tables by spine size and by where the spine sits in the field. A seed whose ``OUT/seed_S/real.csv``
exists is not redone, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_anatomy import DEFAULT_REAL, by_quartile, summarise

BENCH = Path(__file__).resolve().parent / "bench_real_anatomy.py"


def run_seed(args: argparse.Namespace, seed: int) -> Path:
    """Train and score one seed (skipped when its scores exist); returns its scores' CSV."""
    run = args.out / f"seed_{seed}"
    scores = run / "real.csv"
    if scores.is_file():
        return scores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPINEGRADE_PROGRESS": "0"}
    train = [
        sys.executable, "-m", "spinegrade.cli", "train", str(args.data), "--cache", str(args.cache),
        "--out", str(run), "--config", args.config, "--folds", "0", "--no-progress",
        "localizer.tasks=[spinal]", "train.groups=[]", f"seed={seed}", *args.overrides,
    ]  # fmt: skip
    score = [
        sys.executable, str(BENCH), str(run), str(args.real), "--folds", "0", "--threads", "1",
        "--csv", str(scores.with_suffix(".part.csv")), "--out", str(run / "real_bench"),
    ]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"seed_{seed}.log", "a") as log:
        for step, cmd in (("training", train), ("scoring", score)):
            done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode:
                raise RuntimeError(f"seed {seed}: {step} failed; see {log.name}")
    scores.with_suffix(".part.csv").replace(scores)  # the marker of a finished seed, atomic
    return scores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; options may stand before the design's ``-- KEY=VALUE`` overrides."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("cache", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("overrides", nargs="*", help="the design, as config KEY=VALUE (after --)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 11, 1, 2, 3])
    ap.add_argument("--jobs", type=int, default=2, help="seeds trained at once (1 thread each)")
    ap.add_argument("--config", default="quick")
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL)
    # Intermixed: plain parsing binds the (empty) overrides with DATA CACHE OUT, so
    # "DATA CACHE OUT --seeds 42 -- KEY=VALUE" would refuse the overrides.
    return ap.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (args.real / "truth.csv").is_file():
        raise SystemExit(f"{args.real / 'truth.csv'} not found: give --real (series/ + truth.csv)")
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        scored = pool.map(lambda seed: run_seed(args, seed), args.seeds)
        paths = dict(zip(args.seeds, scored, strict=True))
    frames = {s: pd.read_csv(p) for s, p in paths.items()}
    columns = ["within_5mm", "within_10mm", "misnamed"]  # summarise's row over all levels
    table = pd.DataFrame(
        [{"seed": s, **summarise(d).iloc[-1][columns].to_dict()} for s, d in frames.items()]
    )
    print(f"{args.out}: fold 0, canal localiser, overrides {args.overrides or 'none'}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    means = table[columns].mean()
    print(
        f"mean of {len(table)} seeds: within 5 mm {means['within_5mm']:.1%}, within 10 mm "
        f"{means['within_10mm']:.1%}, misnamed {means['misnamed']:.1f} of 190 a localiser"
    )
    pooled = pd.concat(frames.values())
    for column, title in (("path_mm", "spine size"), ("height_mm", "height in the field")):
        values = pooled.groupby("case")[column].first().to_dict()
        print(f"pooled over the seeds, by {title} (quartiles of {column}):")
        table = by_quartile(pooled, values, column)
        print(table.to_string(index=False, float_format="{:.2f}".format))


if __name__ == "__main__":
    main()
