"""GPU rehearsal: the `default` recipe's networks on one GPU, timed, projected to the RSNA set.

    PYTHONPATH=src python bench/gpu_rehearsal.py [--work DIR] [--compile] [--json OUT.json]
    PYTHONPATH=src python bench/gpu_rehearsal.py --smoke      # CPU smoke pass (tiny, < 2 min)

One command, no network, at most ~10 minutes on one GPU:

1. a phantom in the RSNA layout (``--studies``, default 48, the default phantom: 512-px DICOM
   slices cached at the recipe's 256 px; ``synth --profile rsna`` did not exist when this was
   written) is generated and preprocessed into ``--work``, or reused from there. Only this step
   needs pydicom (pure Python: carry its wheel to a machine without it, see README);
2. the `default` recipe's grader (tf_efficientnetv2_s + ViT on 5 x 128 px crops) and sagittal
   localiser (efficientnet_b0, 256 px) train for ``--grader-steps`` / ``--localizer-steps``
   optimiser steps on CUDA with AMP (bf16 where supported, else fp16 with a loss scaler),
   channels-last conv weights (the inputs' axis 1 holds slices, not channels, so inputs are
   left alone), DataLoader workers, optional ``torch.compile``. ``pretrained=false``: there is
   no network to fetch ImageNet weights, and throughput does not depend on the weights;
3. out-of-fold grading of the held-out fifth (batched across studies, localiser included);
4. prints and writes JSON: crops/s for training and inference, localiser stacks/s, peak GPU
   memory, data-loader stall fraction, and the projected wall time of 5 folds on the full RSNA
   set (1,975 studies), to hold against the goal of 15 minutes on one H100-class card.

Without CUDA it says so and runs the same code at tiny sizes on the CPU (exit 0): a smoke pass
that proves the command, not a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from measure import (
    RSNA_STUDIES,
    fold_models,
    load_fold,
    peak_gpu_mib,
    prepare_phantom,
    project_fold,
    time_oof,
    time_training,
)
from spinegrade.config import load_config

GOAL_MIN = 15.0  # 5 folds of `default` on the real set on one H100-class card
NO_NETWORK = ["model.pretrained=false", "localizer.pretrained=false"]
# CPU smoke: the same code path at sizes 2 cores finish in seconds.
SMOKE = [
    "crops.size=32", "crops.slices=3", "crops.tta=1", "model.backbone=test_efficientnet",
    "model.dim=32", "model.depth=1", "model.heads=2", "model.token_grid=1", "train.batch_size=10",
    "localizer.backbone=test_efficientnet", "localizer.image_size=64", "localizer.max_slices=16",
    "localizer.decoder_channels=8", "localizer.batch_size=2", "data.cache_size=96",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="config overrides key=value (default recipe)")
    p.add_argument("--work", type=Path, default=Path("/tmp/spinegrade_rehearsal"))
    p.add_argument("--studies", type=int, default=48)
    p.add_argument("--grader-steps", type=int, default=300)
    p.add_argument("--localizer-steps", type=int, default=100)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: config)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--smoke", action="store_true", help="CPU smoke pass even if CUDA is there")
    p.add_argument("--json", type=Path, default=None, help="default: WORK/rehearsal.json")
    args = p.parse_args(argv)

    from spinegrade.util.runtime import setup_runtime

    cuda = torch.cuda.is_available() and not args.smoke
    overrides = [*NO_NETWORK, *args.overrides]
    if not cuda:
        print("CUDA is not available (or --smoke): CPU smoke pass at tiny sizes; these figures "
              "are not GPU figures.", flush=True)  # fmt: skip
        overrides = [*NO_NETWORK, *SMOKE, "train.accelerator=cpu", *args.overrides]
        args.studies = min(args.studies, 6)
        args.grader_steps, args.localizer_steps = (
            min(args.grader_steps, 4),
            min(args.localizer_steps, 3),
        )
    if args.workers is not None:
        overrides.append(f"train.num_workers={args.workers}")
    cfg = load_config("default", overrides)
    runtime = setup_runtime(cfg.train)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    t_start = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data, cache = prepare_phantom(
        work, args.studies, cfg.data.cache_size, os.cpu_count() or 1, cfg.data.cache_mm
    )
    prep_s = time.perf_counter() - t0
    studies, labels, samples, offsets = load_fold(data, cache, cfg)
    report = run(cfg, runtime, studies, labels, samples, offsets, args)
    report.update({
        "cuda": cuda, "device": runtime.describe(), "torch": torch.__version__,
        "python": platform.python_version(), "compile": args.compile,
        "phantom_studies": len(studies), "phantom_prepare_s": round(prep_s, 1),
        "wall_s": round(time.perf_counter() - t_start, 1), "overrides": overrides,
    })  # fmt: skip
    out = args.json or work / "rehearsal.json"
    out.write_text(json.dumps(report, indent=1))
    _print(report)
    print(f"wrote {out}")
    return 0


def run(cfg, runtime, studies, labels, samples, offsets, args) -> dict:
    """Time grader and localiser training, then out-of-fold grading; project to RSNA."""
    from spinegrade.data.grader_dataset import GraderDataset, collate_levels
    from spinegrade.data.localizer_dataset import LocalizerDataset, collate_stacks
    from spinegrade.localization.derived import derive_points
    from spinegrade.models.registry import build_grader, build_localizer
    from spinegrade.task import LEVELS
    from spinegrade.training.stages import _GraderLoss, _LocalizerLoss

    ids = sorted(studies)
    val = ids[::5]
    train = [s for s in ids if s not in set(val)]
    points = {s: derive_points(studies[s].points, offsets) for s in ids}
    maybe_compile = (lambda m: torch.compile(m)) if args.compile else (lambda m: m)

    torch.manual_seed(0)
    grader = build_grader(cfg, n_targets=1)
    # Foraminal: two items a study (left, right), the grader's most common case.
    ds = GraderDataset([studies[s] for s in train], points, "foraminal", cfg.crops, True, seed=0)
    items = max(1, cfg.train.batch_size // len(LEVELS))
    g = time_training(maybe_compile(grader), ds, collate_levels, _GraderLoss(cfg, "foraminal"),
                      runtime, items, args.grader_steps, cfg, cfg.train.lr)  # fmt: skip
    peak_train = peak_gpu_mib(runtime)

    c = cfg.localizer
    nets = {"spinal": build_localizer(cfg, n_targets=5), "foraminal": build_localizer(cfg, 10)}
    loc_ds = LocalizerDataset([samples["spinal"][s] for s in train if s in samples["spinal"]],
                              augment=True, zoom=c.zoom, seed=0)  # fmt: skip
    lt = time_training(maybe_compile(nets["spinal"]), loc_ds, collate_stacks,
                       _LocalizerLoss(c.sigma), runtime, c.batch_size, args.localizer_steps,
                       cfg, c.lr)  # fmt: skip

    models = fold_models(cfg, grader, nets, offsets, labels, train, runtime)
    stacks = {s: studies[s].stacks for s in val}
    time_oof(models, dict(list(stacks.items())[:1]), runtime, cfg.train.eval_batch_size, 0)
    inf = time_oof(models, stacks, runtime, cfg.train.eval_batch_size, runtime.num_workers)
    inf.pop("preds")
    proj = project_fold(cfg, g, lt, inf["s_per_study_all_cells"], inf["grade_crops_per_s"])
    return {
        "grader_train": {"crops_per_s": round(g.rows_per_s, 1),
                         "stall_frac": round(g.stall_frac, 3), "steps": g.steps,
                         "batch_crops": items * len(LEVELS)},
        "localizer_train": {"stacks_per_s": round(lt.rows_per_s, 2),
                            "stall_frac": round(lt.stall_frac, 3), "steps": lt.steps,
                            "batch_stacks": c.batch_size},
        "inference": {k: round(v, 3) for k, v in inf.items()},
        "peak_gpu_mib": {"grader_train": peak_train, "overall": peak_gpu_mib(runtime)},
        "projection_rsna": {**proj, "studies": RSNA_STUDIES, "goal_min": GOAL_MIN,
                            "times_goal": round(proj["five_folds_min"] / GOAL_MIN, 2)},
    }  # fmt: skip


def _print(r: dict) -> None:
    d = r["device"]
    print(f"device {d['device_name']} ({d['device']}, amp {d['amp']}, compile {r['compile']}), "
          f"torch {r['torch']}")  # fmt: skip
    g, lt, inf = r["grader_train"], r["localizer_train"], r["inference"]
    print(f"grader training     {g['crops_per_s']:>9.1f} crops/s   stall {g['stall_frac']:.1%}")
    print(f"localiser training  {lt['stacks_per_s']:>9.2f} stacks/s  stall {lt['stall_frac']:.1%}")
    print(
        f"out-of-fold         {inf['crops_per_s']:>9.1f} crops/s   {inf['s_per_study']:.3f} s/study"
    )
    print(f"peak GPU memory     {r['peak_gpu_mib']}")
    pr = r["projection_rsna"]
    print(f"projected: 5 folds on {pr['studies']} studies = {pr['five_folds_min']} min "
          f"(goal {pr['goal_min']} min: x{pr['times_goal']}); a fold {pr['fold_s']} s, of which "
          f"OOF {pr['oof_s']} s = {pr['oof_frac_of_training']:.1%} of training")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
