"""Out-of-fold grading against training time in the `default` recipe, projected to RSNA.

    PYTHONPATH=src .venv/bin/python bench/bench_oof.py [--work DIR] [--studies 10] [--threads 2]

On a real-size phantom (the default phantom cached at 256 px; made in ``--work`` or reused),
with the `default` recipe's networks (``pretrained=false``: no network here, and speed does not
depend on the weights), on this machine's CPU:

* training rates: grader crops/s and localiser stacks/s (forward + backward + AdamW);
* out-of-fold grading of the held-out fifth, one study at a time through ``predict_study``
  (before batching) and batched across studies through ``predict_studies``, with the largest
  difference of their probabilities;
* where the localiser's time goes (cProfile of ``localize_studies``: network passes, canonical
  volumes, decoding);
* projected, not run: one fold of the full RSNA set (1,580 training studies, 395 held out, the
  recipe's epochs) from the rates measured above: OOF seconds as a share of the fold's training
  seconds (goal: at most 10%), and a study's OOF seconds with all 25 cells graded.

The JSON keeps the two apart (``measured``, ``projected``), and so do the closing lines. Figures
only; nothing here passes or fails on time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

from measure import fold_models, load_fold, prepare_phantom, project_fold, time_oof, time_training
from spinegrade.config import load_config


def _profile_localizer(models, stacks) -> dict[str, float]:
    """Cumulative seconds of the localiser's parts over ``stacks`` (cProfile)."""
    from spinegrade.localization.localize import localize_studies

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(localize_studies, models.localizer, stacks)
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    parts = {"decode_levels": 0.0, "canonical_volume": 0.0, "forward": 0.0}
    for (file, _, name), (_, _, _, cum, _) in stats.items():
        if name in ("decode_levels", "canonical_volume") and file.endswith("localize.py"):
            parts[name] += cum
        elif name == "forward" and file.endswith("localizer_net.py"):
            parts["forward"] += cum
    return {"total_s": round(total, 3), **{f"{k}_s": round(v, 3) for k, v in parts.items()}}


def _project(cfg, grader, loc, oof: dict) -> dict:
    return project_fold(cfg, grader, loc, oof["s_per_study_all_cells"], oof["grade_crops_per_s"])


def closing_lines(report: dict) -> list[str]:
    """The measured figures, then the projected ones, each line saying which it is."""
    m, pn = report["measured"], report["projected"]["batched"]
    old, new = m["oof_old"], m["oof_new"]
    lines = [
        f"measured: out-of-fold grading of {new['studies']} held-out studies: "
        f"{old['s_per_study']:.2f} s/study one at a time, {new['s_per_study']:.2f} s/study "
        f"batched ({new['grade_crops_per_s']:.1f} crops/s graded besides the localiser's "
        f"{new['localize_s_per_study']:.2f} s/study); training "
        f"{m['grader_train_crops_per_s']:.2f} grader crops/s, "
        f"{m['localizer_train_stacks_per_s']:.3f} localiser stacks/s",
    ]
    if not all(math.isfinite(v) for v in pn.values()):
        lines.append("projected: none (a rate above was not measured)")
        return lines
    lines.append(
        f"projected (from those rates, not run): OOF of a {pn['n_val']}-study fold "
        f"{pn['oof_s']:.0f} s = {pn['oof_frac_of_training']:.1%} of the fold's training "
        f"({pn['grader_train_s'] + pn['localizer_train_s']:.0f} s) on this machine "
        "(goal: at most 10%)"
    )
    return lines


def _say(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*")
    p.add_argument("--work", type=Path, default=Path("/tmp/spinegrade_bench_oof"))
    p.add_argument("--studies", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grader-steps", type=int, default=3)
    p.add_argument("--localizer-steps", type=int, default=2)
    p.add_argument(
        "--localizer-batch",
        type=int,
        default=2,
        help="stacks a localiser training step on CPU (the recipe's 8 needs ~18 GB)",
    )
    args = p.parse_args(argv)

    from spinegrade.data.grader_dataset import GraderDataset, collate_levels
    from spinegrade.data.localizer_dataset import LocalizerDataset, collate_stacks
    from spinegrade.localization.derived import derive_points
    from spinegrade.models.registry import build_grader, build_localizer
    from spinegrade.task import LEVELS
    from spinegrade.training.stages import _GraderLoss, _LocalizerLoss
    from spinegrade.util.runtime import Runtime

    torch.set_num_threads(args.threads)
    cfg = load_config("default", ["model.pretrained=false", "localizer.pretrained=false",
                                  "train.accelerator=cpu", *args.overrides])  # fmt: skip
    runtime = Runtime(torch.device("cpu"))
    data, cache = prepare_phantom(
        args.work, args.studies, cfg.data.cache_size, 2, cfg.data.cache_mm
    )
    studies, labels, samples, offsets = load_fold(data, cache, cfg)
    ids = sorted(studies)
    val = ids[::5]
    train = [s for s in ids if s not in set(val)]
    points = {s: derive_points(studies[s].points, offsets) for s in ids}

    torch.manual_seed(0)
    grader = build_grader(cfg, n_targets=1)
    ds = GraderDataset([studies[s] for s in train], points, "foraminal", cfg.crops, True, seed=0)
    items = max(1, cfg.train.batch_size // len(LEVELS))
    _say("grader training steps")
    g = time_training(grader, ds, collate_levels, _GraderLoss(cfg, "foraminal"), runtime, items,
                      args.grader_steps, cfg, cfg.train.lr, warmup=1)  # fmt: skip
    c = cfg.localizer
    nets = {"spinal": build_localizer(cfg, n_targets=5), "foraminal": build_localizer(cfg, 10)}
    loc_ds = LocalizerDataset([samples["spinal"][s] for s in train if s in samples["spinal"]],
                              augment=True, zoom=c.zoom, seed=0)  # fmt: skip
    _say("localiser training steps")
    lt = time_training(nets["spinal"], loc_ds, collate_stacks, _LocalizerLoss(c.sigma), runtime,
                       args.localizer_batch, args.localizer_steps, cfg, c.lr, warmup=1)  # fmt: skip
    models = fold_models(cfg, grader, nets, offsets, labels, train, runtime)
    stacks = {s: studies[s].stacks for s in val}

    _say(f"out-of-fold grading of {len(stacks)} studies, one at a time, then batched")
    old = time_oof(models, stacks, runtime, cfg.train.eval_batch_size, 0, old=True)
    new = time_oof(models, stacks, runtime, cfg.train.eval_batch_size, 0)
    preds_old, preds_new = old.pop("preds"), new.pop("preds")
    p_old = np.stack([preds_old[s].probs for s in stacks])
    p_new = np.stack([preds_new[s].probs for s in stacks])
    loc = _profile_localizer(models, stacks)
    # A study with all 25 cells graded: projected from the measured rates (an untrained
    # localiser leaves cells ungraded), so it stands with the projections, not the measurements.
    all_cells = {"old": old.pop("s_per_study_all_cells"), "new": new.pop("s_per_study_all_cells")}
    report = {
        "machine": f"{os.cpu_count()} CPUs, {args.threads} torch threads",
        "torch": torch.__version__,
        "studies": len(studies), "val_studies": len(val),
        "measured": {
            "grader_train_crops_per_s": round(g.rows_per_s, 2),
            "localizer_train_stacks_per_s": round(lt.rows_per_s, 3),
            "oof_old": {k: round(v, 3) for k, v in old.items()},
            "oof_new": {k: round(v, 3) for k, v in new.items()},
            "max_abs_prob_diff_old_new": float(np.abs(p_old - p_new).max()),
            "localizer_profile": loc,
        },
        "projected": {
            "note": "from the measured rates, not run",
            "oof_s_per_study_all_cells": {k: round(v, 3) for k, v in all_cells.items()},
            "batched": _project(cfg, g, lt, {**new, "s_per_study_all_cells": all_cells["new"]}),
            "one_at_a_time": _project(cfg, g, lt,
                                      {**old, "s_per_study_all_cells": all_cells["old"]}),
        },
    }  # fmt: skip
    print(json.dumps(report, indent=1))
    print("\n".join(closing_lines(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
