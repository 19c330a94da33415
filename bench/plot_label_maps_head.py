"""What a run's label-maps head draws on real spines it held out, beside the drawn maps.

    .venv/bin/python bench/plot_label_maps_head.py RUN_DIR REAL_DIR REAL_CACHE OUT.png \
        [--cases spider_11 spider_34 ...]

RUN_DIR trained with ``localizer.seg_weight`` > 0 on REAL_DIR (``spinegrade import spider``, which
holds the label maps) cached in REAL_CACHE. Each case is read by the fold that held it out,
through a zoomed look (0.65 of the field) centred on its true canal points; a row shows the
middle slice, the head's classes at its heatmap cells and the drawn map (blue disc, red
vertebra, green canal). Default cases: the first real study of each fold.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch
from PIL import Image

from spinegrade.data.label_maps import stack_labels
from spinegrade.localization.frames import canonical_labels, canonical_volume, sagittal_frame
from spinegrade.models.registry import load_model
from spinegrade.preprocessing.cache import load_study_stacks, read_index

COLOURS = np.array([[0, 0, 0], [0, 120, 255], [255, 60, 60], [60, 220, 60]], dtype=np.uint8)


def row(run: Path, real: Path, cache: Path, sid: int, fold: int, index, size: int) -> np.ndarray:
    """One case: image | head | drawn map, each at the look's input size, as RGB."""
    net = load_model(run / f"fold_{fold}" / "localizer_spinal.safetensors")[0].eval()
    if getattr(net, "seg", None) is None:
        raise SystemExit(f"{run}: fold {fold}'s spinal localiser has no label maps' head")
    (stack,) = load_study_stacks(cache, sid, index=index)[:1]
    frame = sagittal_frame(stack, size, 24)
    canal = pd.read_csv(real / "train_label_coordinates.csv")
    pts = canal[canal["study_id"] == sid]
    xs, ys = stack.orig_to_cached_xy(pts["x"].to_numpy(), pts["y"].to_numpy())
    _, y, x = frame.to_full(np.zeros_like(xs), ys, xs)
    look = frame.zoomed(float(y.min() + y.max()) / 2, float(x.min() + x.max()) / 2, 0.65)
    vol = canonical_volume(stack, look)
    with torch.no_grad():
        seg = net(torch.from_numpy(vol)[None])["seg_logits"][0].argmax(1).numpy()
    k = vol.shape[0] // 2
    step = size // seg.shape[-1]
    head = np.kron(seg[k], np.ones((step, step), dtype=np.int64))
    drawn = canonical_labels(stack_labels(real, stack), look)[k]
    image = np.stack([(vol[k] * 255).astype(np.uint8)] * 3, -1)
    return np.concatenate([image, COLOURS[head], COLOURS[np.minimum(drawn, 3)]], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("real_dir", type=Path)
    ap.add_argument("real_cache", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--cases", nargs="*", default=None)
    ap.add_argument("--size", type=int, default=96, help="the run's localizer.image_size")
    args = ap.parse_args()
    folds = pd.read_csv(args.run_dir / "folds.csv")
    cases = pd.read_csv(args.real_dir / "cases.csv").merge(folds, on="study_id")
    if args.cases:
        cases = cases.set_index("case_id").loc[args.cases].reset_index()
    else:
        cases = cases.sort_values("study_id").groupby("fold").head(1).sort_values("fold")
    index = read_index(args.real_cache)
    rows = [
        row(
            args.run_dir,
            args.real_dir,
            args.real_cache,
            int(r.study_id),
            int(r.fold),
            index,
            args.size,
        )
        for r in cases.itertuples()
    ]
    picture = np.kron(np.concatenate(rows, 0), np.ones((2, 2, 1), dtype=np.uint8))
    Image.fromarray(picture).save(args.out)
    print(f"{args.out}: {', '.join(cases['case_id'])}")


if __name__ == "__main__":
    main()
