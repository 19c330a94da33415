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
it). Prints each seed's levels scored, share within 5 / 10 mm and misnamed levels, their mean,
and the pooled tables by spine size and by where the spine sits in the field.

Runs are kept by design: ``OUT/design_KEY/`` (``KEY`` a hash of the config, the overrides and the
DATA, CACHE and REAL folders, written out in its ``design.json``) holds ``seed_S/``. A seed whose
``OUT/design_KEY/seed_S/real.csv`` exists is not redone, so an interrupted sweep resumes; a seed
scored under another design (or in the flat ``OUT/seed_S/`` of before) is never reused, and a
baseline and a design can share one OUT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_anatomy import DEFAULT_REAL, by_quartile, summarise

BENCH = Path(__file__).resolve().parent / "bench_real_anatomy.py"


def design_of(args: argparse.Namespace) -> dict:
    """What a seed's scores depend on besides the seed: config, overrides, the data and REAL."""
    return {
        "config": args.config, "overrides": list(args.overrides),
        "data": str(args.data.resolve()), "cache": str(args.cache.resolve()),
        "real": str(args.real.resolve()),
    }  # fmt: skip


def design_dir(args: argparse.Namespace) -> Path:
    """``OUT/design_KEY``: the runs of this design only (its ``design.json`` says which)."""
    design = design_of(args)
    text = json.dumps(design, sort_keys=True)
    return args.out / f"design_{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def run_seed(args: argparse.Namespace, seed: int) -> Path:
    """Train and score one seed (skipped when this design's scores exist); its scores' CSV."""
    home = design_dir(args)
    run = home / f"seed_{seed}"
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
    home.mkdir(parents=True, exist_ok=True)
    with open(home / f"seed_{seed}.log", "a") as log:
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


def seed_summary(frames: dict[int, pd.DataFrame]) -> tuple[pd.DataFrame, str]:
    """Each seed's overall row (levels scored, within 5 / 10 mm, misnamed) and the line of their
    mean, which says how many levels were scored (counted, never assumed)."""
    columns = ["n", "within_5mm", "within_10mm", "misnamed"]  # summarise's row over all levels
    table = pd.DataFrame(
        [{"seed": s, **summarise(d).iloc[-1][columns].to_dict()} for s, d in frames.items()]
    ).rename(columns={"n": "levels"})
    table["levels"] = table["levels"].astype(int)
    low, high = table["levels"].min(), table["levels"].max()
    levels = f"{low}" if low == high else f"{low}-{high}"
    means = table[columns[1:]].mean()
    line = (
        f"mean of {len(table)} seeds: within 5 mm {means['within_5mm']:.1%}, within 10 mm "
        f"{means['within_10mm']:.1%}, misnamed {means['misnamed']:.1f} of {levels} levels scored "
        "a localiser"
    )
    return table, line


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (args.real / "truth.csv").is_file():
        raise SystemExit(f"{args.real / 'truth.csv'} not found: give --real (series/ + truth.csv)")
    home = design_dir(args)
    home.mkdir(parents=True, exist_ok=True)
    (home / "design.json").write_text(json.dumps(design_of(args), indent=1) + "\n")
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        scored = pool.map(lambda seed: run_seed(args, seed), args.seeds)
        paths = dict(zip(args.seeds, scored, strict=True))
    frames = {s: pd.read_csv(p) for s, p in paths.items()}
    table, mean_line = seed_summary(frames)
    print(f"{home}: fold 0, canal localiser, config {args.config}, "
          f"overrides {args.overrides or 'none'}")  # fmt: skip
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(mean_line)
    pooled = pd.concat(frames.values())
    for column, title in (("path_mm", "spine size"), ("height_mm", "height in the field")):
        values = pooled.groupby("case")[column].first().to_dict()
        print(f"pooled over the seeds, by {title} (quartiles of {column}):")
        table = by_quartile(pooled, values, column)
        print(table.to_string(index=False, float_format="{:.2f}".format))


if __name__ == "__main__":
    main()
