"""Where one fold's training time goes: per network, data / forward / backward+optimiser / eval.

    .venv/bin/python bench/bench_profile_train.py DATA CACHE [--source DATA2 CACHE2]
        [--config quick] [--fold 0] [--epochs 2] [--threads 1] [overrides ...]

    # the demo's own data (what `make demo` leaves in DIR):
    .venv/bin/python bench/bench_profile_train.py DIR/data DIR/cache \\
        --source DIR/real DIR/cache_real --epochs 2

Trains one fold (``--fold``) into a temporary run folder exactly as ``spinegrade train`` does (one
process, ``--threads`` torch threads: the demo trains its folds side by side in single-threaded
processes), with every network's epochs cut to ``--epochs`` (0 keeps the config's), and times:
loading the studies, building the localiser's samples, per network and epoch the batches (data
preparation, crop cutting, augmentation: the loader's share), the forward pass with the loss, the
backward pass with the optimiser step, validation and checkpoints, then the out-of-fold grading.
Per-epoch figures are projected to the config's epochs. Figures only; it never fails on time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")  # the epochs' bars would bury the table

import torch

from spinegrade.config import load_config
from spinegrade.training import cv, engine

TIMES: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
EPOCHS: dict[str, int] = defaultdict(int)
STEPS: dict[str, int] = defaultdict(int)
CURRENT = {"net": "setup"}


def _timed(fn, bucket: str, net: str | None = None):
    """``fn`` that adds its wall time to TIMES[net or the current network][bucket]."""

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[net or CURRENT["net"]][bucket] += time.perf_counter() - t

    return wrapper


def _instrument() -> None:
    """Wrap the training loop's parts; the loader's share is what an epoch spends outside steps."""
    step, epoch = engine._Stepper.step, engine._Stepper.epoch

    def timed_step(self, batch):
        if not getattr(self, "_profiled", False):
            self.step_loss = _timed(self.step_loss, "forward")
            self._profiled = True
        t = time.perf_counter()
        out = step(self, batch)
        TIMES[self.spec.name]["step"] += time.perf_counter() - t
        STEPS[self.spec.name] += 1
        return out

    def timed_epoch(self, loader, n):
        CURRENT["net"] = self.spec.name
        t = time.perf_counter()
        out = epoch(self, loader, n)
        TIMES[self.spec.name]["epoch"] += time.perf_counter() - t
        EPOCHS[self.spec.name] += 1
        return out

    engine._Stepper.step, engine._Stepper.epoch = timed_step, timed_epoch
    engine._evaluate = _timed(engine._evaluate, "eval")
    engine.save_checkpoint = _timed(engine.save_checkpoint, "checkpoint")
    cv._grade_oof = _timed(cv._grade_oof, "total", net="out-of-fold grading")
    cv.load_training_studies = _timed(cv.load_training_studies, "total", net="load studies")
    cv.build_localizer_samples = _timed(
        cv.build_localizer_samples, "total", net="localiser samples"
    )


def _configured_epochs(cfg, net: str) -> int:
    return cfg.localizer.epochs if net.startswith("localizer") else cfg.train.epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("cache")
    ap.add_argument("--source", nargs=2, action="append", default=[], metavar=("DATA", "CACHE"),
                    help="another data folder and its cache (repeatable)")  # fmt: skip
    ap.add_argument("--config", default="quick")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per network (0: the config's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # what setup_runtime gives the fold
    full = load_config(args.config, args.overrides)
    over = [*args.overrides, "train.fold_workers=1"]
    if args.epochs:
        over += [f"localizer.epochs={args.epochs}", f"train.epochs={args.epochs}",
                 f"train.eval_every={args.epochs}"]  # fmt: skip
    cfg = load_config(args.config, over)
    cfg.data.sources = [{"data_dir": d, "cache_dir": c} for d, c in args.source]
    _instrument()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cv.cross_validate(args.data, args.cache, Path(tmp) / "run", cfg, [args.fold],
                          progress=False)  # fmt: skip
    wall = time.perf_counter() - t0
    print(f"### One fold ({args.fold}) of `{args.config}`, {args.threads} torch thread(s), "
          f"{args.epochs or 'all'} epochs a network, projected to the config's epochs")  # fmt: skip
    print("| network | epochs (config) | steps/epoch | data | forward | backward + optim "
          "| eval + ckpt | s/epoch | projected s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    projected_total = 0.0
    for net, t in TIMES.items():
        if net in EPOCHS:
            n = EPOCHS[net]
            data = t["epoch"] - t["step"]
            back = t["step"] - t["forward"]
            per = (t["epoch"] + t["eval"] + t["checkpoint"]) / n
            epochs = _configured_epochs(full, net)
            projected_total += per * epochs
            ep = t["epoch"]
            cells = [f"{x / n:.1f} s ({x / ep:.0%})" for x in (data, t["forward"], back)]
            extra = (t["eval"] + t["checkpoint"]) / n
            print(f"| {net} | {n} ({epochs}) | {STEPS[net] // n} | {' | '.join(cells)} "
                  f"| {extra:.1f} s | {per:.1f} | {per * epochs:.0f} |")  # fmt: skip
        else:
            projected_total += t["total"]
            print(f"| {net} | | | | | | | | {t['total']:.0f} |")
    print(f"\nthis fold: {wall:.0f} s wall at {args.epochs or 'full'} epochs; "
          f"projected at the config's epochs: {projected_total:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
