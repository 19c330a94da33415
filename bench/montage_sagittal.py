"""Mid-sagittal T2 slices of phantom studies beside real ones, at true physical scale (one PNG).

    .venv/bin/python bench/montage_sagittal.py PHANTOM_DATA_DIR --real REAL_DIR --out docs/x.png

Row 1: the sagittal T2/STIR series of the first ``--n`` phantom studies; row 2: the first ``--n``
real series of REAL_DIR/series (e.g. the SPIDER set). Every image is scaled by its pixel spacing
(``--mm-per-px`` mm a pixel), so spine size and field of view compare directly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from spinegrade.io import read_series
from spinegrade.task import SAG_T2


def mid_slice(folder: Path, mm_per_px: float) -> Image.Image:
    """The middle slice of a series' first stack, windowed and resampled to ``mm_per_px``."""
    stack = read_series(folder).stacks[0]
    img = stack.pixels[len(stack.pixels) // 2].astype(np.float32)
    lo, hi = np.percentile(img, [1.0, 99.5])
    img = np.clip((img - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    dy, dx = (float(v) for v in stack.pixel_spacing)
    h, w = img.shape
    size = (max(1, round(w * dx / mm_per_px)), max(1, round(h * dy / mm_per_px)))
    return Image.fromarray(img).resize(size, Image.BILINEAR)


def phantom_series(data_dir: Path, n: int) -> list[tuple[str, Path]]:
    """(study, folder) of the sagittal T2 series of the first ``n`` studies."""
    series = pd.read_csv(data_dir / "train_series_descriptions.csv")
    series = series[series["series_description"] == SAG_T2].head(n)
    return [
        (str(r.study_id), data_dir / "train_images" / str(r.study_id) / str(r.series_id))
        for r in series.itertuples()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phantom", type=Path)
    ap.add_argument("--real", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--mm-per-px", type=float, default=2.2)
    args = ap.parse_args()
    real = sorted((args.real / "series").iterdir(), key=lambda p: p.name)[: args.n]
    studies = phantom_series(args.phantom, args.n)
    rows = [
        [(f"phantom {s}", mid_slice(f, args.mm_per_px)) for s, f in studies],
        [(f"real {p.name}", mid_slice(p, args.mm_per_px)) for p in real],
    ]
    cell = max(max(im.size) for row in rows for _, im in row)
    sheet = Image.new("L", (cell * args.n, cell * 2))
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        for c, (name, im) in enumerate(row):
            x, y = c * cell + (cell - im.size[0]) // 2, r * cell + (cell - im.size[1]) // 2
            sheet.paste(im, (x, y))
            draw.text((c * cell + 3, r * cell + 2), name, fill=255)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"{args.out}: {sheet.size[0]}x{sheet.size[1]}, {args.out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
