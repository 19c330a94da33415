"""Hand-made cached stacks and a tiny RSNA-layout world for the localise/crop/train tests.

Geometry is exact and simple: a stack is a grid of voxels in LPS millimetres with chosen in-plane
directions, so tests can put a bright blob at a known patient point and check where it lands.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.config import load_config
from spinegrade.preprocessing.cache import (
    CachedStack,
    index_frame,
    save_stack,
    write_index,
    write_manifest,
)
from spinegrade.preprocessing.series import CacheParams
from spinegrade.task import (
    CONDITION_SERIES,
    CONDITION_TITLES,
    CONDITIONS,
    LABEL_COLUMNS,
    LEVEL_TITLES,
    LEVELS,
    SEVERITIES,
)

L, P, H = np.eye(3)  # LPS: patient left, posterior, head


def make_stack(
    row_dir,
    col_dir,
    center,
    shape=(9, 64, 64),
    spacing=(1.0, 1.0),
    slice_gap=4.0,
    description="Sagittal T2/STIR",
    study_id=1,
    series_id=10,
    first_instance=1,
) -> CachedStack:
    """A zero volume whose central voxel lies at ``center`` (LPS mm)."""
    row, col = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row, col)
    d, h, w = shape
    dy, dx = spacing
    corner = np.asarray(center, float) - (w - 1) / 2 * dx * row - (h - 1) / 2 * dy * col
    positions = corner + (np.arange(d) - (d - 1) / 2)[:, None] * slice_gap * normal
    plane = "axial" if abs(normal[2]) > 0.5 else "sagittal"
    return CachedStack(
        volume=np.zeros(shape, np.uint8),
        positions=positions,
        row_dir=row,
        col_dir=col,
        spacing=(float(dy), float(dx)),
        orig_shape=(h, w),
        instance_numbers=np.arange(first_instance, first_instance + d, dtype=np.int64),
        study_id=study_id,
        series_id=series_id,
        description=description,
        plane=plane,
    )


def add_blob(
    stack: CachedStack, point, value: int = 255, radius: float = 1.5
) -> tuple[int, int, int]:
    """Paint a disc of ``radius`` pixels on the slice nearest ``point``; returns its voxel."""
    z, y, x = (float(v) for v in stack.patient_to_voxel(np.asarray(point, float)))
    zi = int(np.rint(z))
    yy, xx = np.mgrid[: stack.volume.shape[1], : stack.volume.shape[2]]
    disc = (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
    stack.volume[zi][disc] = value
    return zi, int(np.rint(y)), int(np.rint(x))


# ------------------------------------------------------------------------------- a tiny world


def level_points(study_seed: int) -> dict[tuple[str, str], np.ndarray]:
    """Patient points of one phantom study: five levels 24 mm apart, foramina +-16 mm lateral."""
    rng = np.random.default_rng(study_seed)
    shift = rng.uniform(-4, 4, 3)
    pts = {}
    for j, lv in enumerate(LEVELS):
        base = np.array([0.0, 0.0, 48.0 - 24.0 * j]) + shift
        pts[(CONDITIONS[0], lv)] = base
        pts[(CONDITIONS[1], lv)] = base + 16 * L + 4 * P
        pts[(CONDITIONS[2], lv)] = base - 16 * L + 4 * P
        pts[(CONDITIONS[3], lv)] = base + 8 * L + 3 * P
        pts[(CONDITIONS[4], lv)] = base - 8 * L + 3 * P
    return pts


def world_stacks(study_id: int, grades: np.ndarray) -> list[CachedStack]:
    """Sagittal T2 and T1 and one axial stack; blob brightness encodes each cell's grade."""
    pts = level_points(study_id)
    sid = study_id * 10
    t2 = make_stack(
        P, -H, (0, 0, 0), (11, 64, 64), (2.5, 2.5), 4.0, "Sagittal T2/STIR", study_id, sid + 1
    )
    t1 = make_stack(
        -P, -H, (0, 0, 0), (11, 64, 64), (2.5, 2.5), 4.0, "Sagittal T1", study_id, sid + 2
    )
    ax = make_stack(L, P, (0, 0, 0), (40, 48, 48), (1.5, 1.5), 3.0, "Axial T2", study_id, sid + 3)
    by_desc = {s.description: s for s in (t2, t1, ax)}
    for c, condition in enumerate(CONDITIONS):
        for j, lv in enumerate(LEVELS):
            value = 80 + 80 * int(grades[c * 5 + j])
            add_blob(by_desc[CONDITION_SERIES[condition]], pts[(condition, lv)], value, 2.0)
    return [t2, t1, ax]


def truncated_copy(stack: CachedStack, series_id: int, keep: slice) -> CachedStack:
    """A repeat of ``stack`` under another series id that holds only the slices ``keep``
    (e.g. a scan stopped early): same geometry, smaller through-plane coverage."""
    return replace(
        stack, volume=stack.volume[keep].copy(), positions=stack.positions[keep].copy(),
        instance_numbers=stack.instance_numbers[keep].copy(), series_id=series_id,
    )  # fmt: skip


def write_world(
    root: Path, n_studies: int = 6, seed: int = 0, duplicates: bool = False, first_id: int = 1000
) -> tuple[Path, Path]:
    """An RSNA-layout data folder (CSVs only) and a matching cache; returns (data, cache).

    With ``duplicates`` every study also holds truncated, unlabelled repeats of its sagittal T2
    and axial series, under lower series ids (the order a naive "first series" rule would pick).
    """
    rng = np.random.default_rng(seed)
    data, cache = root / "data", root / "cache"
    data.mkdir(parents=True)
    labels, series, coords, index = [], [], [], []
    for k in range(n_studies):
        sid = first_id + k
        grades = rng.choice(3, size=25, p=[0.6, 0.25, 0.15])
        labels.append(
            {
                "study_id": sid,
                **dict(zip(LABEL_COLUMNS, (SEVERITIES[g] for g in grades), strict=True)),
            }
        )
        pts = level_points(sid)
        stacks = world_stacks(sid, grades)
        labelled = {s.series_id for s in stacks}
        if duplicates:
            stacks += [truncated_copy(stacks[0], sid * 10 - 1, slice(0, 4)),
                       truncated_copy(stacks[2], sid * 10 - 2, slice(10, 20))]  # fmt: skip
        for stack in stacks:
            series.append(
                {
                    "study_id": sid,
                    "series_id": stack.series_id,
                    "series_description": stack.description,
                }
            )
            rel = f"train/{sid}/{stack.series_id}_0.npz"
            (cache / rel).parent.mkdir(parents=True, exist_ok=True)
            save_stack(stack, cache / rel)
            d, h, w = stack.volume.shape
            index.append(
                dict(split="train", study_id=sid, series_id=stack.series_id, stack=0,
                     description=stack.description, plane=stack.plane, direction="",
                     n_slices=d, height=h, width=w, orig_rows=h, orig_cols=w,
                     spacing_row=stack.spacing[0], spacing_col=stack.spacing[1],
                     slice_spacing=stack.slice_spacing, status="ok", reason="", path=rel)
            )  # fmt: skip
            for condition in CONDITIONS:
                if (
                    CONDITION_SERIES[condition] != stack.description
                    or stack.series_id not in labelled
                ):
                    continue
                for lv in LEVELS:
                    z, y, x = stack.patient_to_voxel(pts[(condition, lv)])
                    instance = int(stack.instance_numbers[int(np.rint(z))])
                    coords.append(
                        {"study_id": sid, "series_id": stack.series_id, "instance_number": instance,
                         "condition": CONDITION_TITLES[condition], "level": LEVEL_TITLES[lv],
                         "x": float(x), "y": float(y)}
                    )  # fmt: skip
    pd.DataFrame(labels).to_csv(data / "train.csv", index=False)
    pd.DataFrame(series).to_csv(data / "train_series_descriptions.csv", index=False)
    pd.DataFrame(coords).to_csv(data / "train_label_coordinates.csv", index=False)
    write_index(cache, index_frame(index).to_dict("records"))
    # Label the cache with the settings of the `quick` config the training tests use (train
    # checks them against its config).
    write_manifest(cache, CacheParams.from_config(load_config("quick").data).settings(), "test")
    return data, cache
