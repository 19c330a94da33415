"""PNG previews of one phantom study: what the generator draws, next to its label points.

The preview study has a severe level (L4/L5, every condition) and a normal level (L2/L3), so the
difference a model has to learn is visible side by side: the mid-sagittal T2 (central canal), a
parasagittal T1 through the left foramina, and axial T2 slices of both levels (recesses).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from spinegrade.phantom.anatomy import (
    LEFT_FORAMEN,
    LEFT_RECESS,
    N_LEVELS,
    RIGHT_RECESS,
    SPINAL,
    Anatomy,
    foramen_local,
    label_point,
    sample_anatomy,
)
from spinegrade.phantom.labels import anatomical_severity
from spinegrade.phantom.ops import build_ops
from spinegrade.phantom.render import (
    SagittalGeometry,
    Scanner,
    SeriesPlan,
    SlicePlan,
    plan_axial,
    render_slice,
)

SEVERE_LEVEL, NORMAL_LEVEL = 3, 1  # L4/L5 and L2/L3
_COLOURS = {SPINAL: (255, 60, 60), LEFT_FORAMEN: (60, 200, 255), LEFT_RECESS: (255, 200, 0)}


def preview_latents(rng: np.random.Generator) -> np.ndarray:
    """(5 conditions, 5 levels) latents: mild background, L4/L5 severe, L2/L3 clearly normal."""
    z = rng.normal(-1.2, 0.5, size=(5, N_LEVELS))
    z[:, SEVERE_LEVEL] = 2.2
    z[:, NORMAL_LEVEL] = -2.5
    return z


def render_preview(out_dir: str | Path, seed: int = 0) -> list[Path]:
    """Render the preview study and write PNGs (and a contact sheet) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 99]))
    anat = sample_anatomy(rng, anatomical_severity(preview_latents(rng)))
    ops = build_ops(anat)
    scanner = Scanner.random(rng)
    sag = SeriesPlan("Sagittal", "T2", SagittalGeometry.plan(rng, anat, 17).slices(512))
    axial = plan_axial(rng, anat, list(range(N_LEVELS)), 5)
    shots: list[tuple[str, SlicePlan, str, list[tuple[int, int]]]] = []
    mid = sag.nearest_slice(anat.to_patient(label_point(anat, SPINAL, 2)))[0]
    shots.append(
        ("sagittal_t2_mid", sag.slices[mid], "T2", [(SPINAL, lv) for lv in range(N_LEVELS)])
    )
    left = _foramen_patient(anat, SEVERE_LEVEL)
    k_left = sag.nearest_slice(left)[0]
    shots.append(
        (
            "sagittal_t1_left_foramina",
            sag.slices[k_left],
            "T1",
            [(LEFT_FORAMEN, lv) for lv in range(N_LEVELS)],
        )
    )
    for name, level in (
        ("axial_t2_l4_l5_severe", SEVERE_LEVEL),
        ("axial_t2_l2_l3_normal", NORMAL_LEVEL),
    ):
        stack = [s for s in axial if s.level == level]
        shots.append(
            (name, stack[len(stack) // 2], "T2", [(LEFT_RECESS, level), (RIGHT_RECESS, level)])
        )
    paths, tiles = [], []
    for name, plan, contrast, marks in shots:
        pixels = render_slice(rng, anat, ops, scanner, plan, (contrast,))[0]
        image = _to_rgb(pixels)
        marked = image.copy()
        _mark(marked, anat, plan, marks)
        for suffix, im in (("", image), ("_labels", marked)):
            path = out / f"{name}{suffix}.png"
            im.save(path)
            paths.append(path)
        tiles.append(marked.resize((384, 384), Image.BILINEAR))
    sheet = Image.new("RGB", (384 * len(tiles), 384))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (384 * i, 0))
    sheet.save(out / "preview.png")
    return [*paths, out / "preview.png"]


def _foramen_patient(anat: Anatomy, level: int) -> np.ndarray:
    disc = anat.label_disc(level)
    return anat.to_patient(disc.frame.to_body(foramen_local(anat, disc, 0)))


def _to_rgb(pixels: np.ndarray) -> Image.Image:
    """Window like a viewer does (0.5-99.5 percentiles) and convert to 8-bit RGB."""
    lo, hi = np.percentile(pixels, [0.5, 99.7])
    v = np.clip((pixels.astype(np.float32) - lo) / max(hi - lo, 1.0), 0, 1)
    return Image.fromarray((v * 255).astype(np.uint8)).convert("RGB")


def _mark(image: Image.Image, anat: Anatomy, plan: SlicePlan, marks: list[tuple[int, int]]) -> None:
    """Small crosses at the label points (projected onto this slice)."""
    draw = ImageDraw.Draw(image)
    for cond, level in marks:
        x, y, _ = plan.to_pixel(anat.to_patient(label_point(anat, cond, level)))
        colour = _COLOURS.get(cond, (255, 200, 0))
        draw.line([(x - 6, y), (x + 6, y)], fill=colour, width=1)
        draw.line([(x, y - 6), (x, y + 6)], fill=colour, width=1)
