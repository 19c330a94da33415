"""Crops: canonical orientation, left/right mirroring, jitter, true points, missing series."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spinegrade.config import CropConfig
from spinegrade.data.crops import Jitter, crop_view, extract_crop, make_crops, normalize_crop
from spinegrade.localization.points import StudyPoints, true_points
from stack_factory import H, L, P, add_blob, make_stack

CFG = CropConfig(size=32, slices=5, spinal_mm=32.0, foraminal_mm=32.0, subarticular_mm=32.0)
# Sagittal in-plane conventions a scanner may use: standard, flipped columns, transposed.
SAGITTAL_AXES = [(P, -H), (-P, -H), (-H, P), (H, -P)]


def _peak(crop: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.unravel_index(np.argmax(crop), crop.shape))


@pytest.mark.parametrize(("row", "col"), SAGITTAL_AXES)
def test_sagittal_crop_is_canonical_whatever_the_orientation(row, col):
    stack = make_stack(row, col, (0, 0, 0), (9, 64, 64), (1.0, 1.0), 4.0)
    center = np.array([0.0, 0.0, 0.0])
    add_blob(stack, center + 8 * P + 4 * H, 255, 1.2)  # 8 mm posterior, 4 mm up
    view = crop_view("spinal_canal_stenosis", CFG)  # 1 mm per pixel
    crop = extract_crop(stack, center, view, size=32, n_slices=5)
    z, y, x = _peak(crop)
    assert z == 2  # the blob's slice is the centre slice
    assert x == pytest.approx(15.5 + 8, abs=1)  # posterior -> image right
    assert y == pytest.approx(15.5 - 4, abs=1)  # head -> image top


@pytest.mark.parametrize("normal_sign", [1, -1])
def test_foraminal_slices_run_lateral_for_both_sides(normal_sign):
    # The stack's own slice order (normal +L or -L) must not matter: slices go lateral.
    row, col = (P, -H) if normal_sign < 0 else (P, H)
    stack = make_stack(row, col, (0, 0, 0), (13, 64, 64), (1.0, 1.0), 4.0, "Sagittal T1")
    left_foramen, right_foramen = 16 * L, -16 * L
    add_blob(stack, left_foramen + 4 * L, 255)  # one slice further out on the left
    add_blob(stack, right_foramen - 4 * L, 255)  # one slice further out on the right
    for condition, center in (
        ("left_neural_foraminal_narrowing", left_foramen),
        ("right_neural_foraminal_narrowing", right_foramen),
    ):
        crop = extract_crop(stack, center, crop_view(condition, CFG), size=32, n_slices=5)
        assert _peak(crop)[0] == 3, condition  # lateral neighbour = next slice in both crops


def test_axial_right_side_is_mirrored_onto_the_left():
    stack = make_stack(L, P, (0, 0, 0), (7, 64, 64), (1.0, 1.0), 3.0, "Axial T2")
    left, right = 8 * L, -8 * L
    add_blob(stack, left + 5 * L, 255)  # 5 mm lateral of the left recess
    add_blob(stack, right - 5 * L, 255)  # 5 mm lateral of the right recess
    for condition, center in (
        ("left_subarticular_stenosis", left),
        ("right_subarticular_stenosis", right),
    ):
        crop = extract_crop(stack, center, crop_view(condition, CFG), size=32, n_slices=3)
        _, y, x = _peak(crop)
        assert x == pytest.approx(15.5 + 5, abs=1), condition  # lateral -> image right
        assert y == pytest.approx(15.5, abs=1)


def test_jitter_shifts_the_window_and_missing_slices_are_zero():
    stack = make_stack(P, -H, (0, 0, 0), (3, 64, 64), (1.0, 1.0), 4.0)
    add_blob(stack, np.zeros(3), 255)
    view = crop_view("spinal_canal_stenosis", CFG)
    moved = extract_crop(
        stack, np.zeros(3), view, size=32, n_slices=5, jitter=Jitter(shift_mm=(6.0, 0.0))
    )
    assert _peak(moved)[2] == pytest.approx(15.5 - 6, abs=1)  # window right -> blob left
    crop = extract_crop(stack, np.zeros(3), view, size=32, n_slices=5)
    assert crop[0].max() == 0 and crop[4].max() == 0  # beyond the 3-slice stack
    assert crop.dtype == np.float32 and crop.max() == pytest.approx(1.0)
    z = normalize_crop(crop)
    assert abs(float(z.mean())) < 1e-5 and float(z.std()) == pytest.approx(1.0, rel=1e-3)


def test_true_points_map_labels_to_patient_space():
    stack = make_stack(P, -H, (0, 0, 0), (9, 64, 64), (1.0, 1.0), 4.0, study_id=5, series_id=50)
    target = np.array([4.0, 3.0, -7.0])
    z, y, x = (float(v) for v in stack.patient_to_voxel(target))
    coords = pd.DataFrame(
        {"study_id": [5, 5], "series_id": [50, 99],
         "instance_number": [int(stack.instance_numbers[round(z)])] * 2,
         "condition": ["spinal_canal_stenosis", "left_neural_foraminal_narrowing"],
         "level": ["l3_l4", "l1_l2"], "x": [x, 1.0], "y": [y, 1.0]}
    )  # fmt: skip
    pts = true_points(coords, [stack])
    assert np.allclose(pts.get("spinal_canal_stenosis", "l3_l4"), target, atol=1e-6)
    assert pts.get("left_neural_foraminal_narrowing", "l1_l2") is None  # series 99 not cached


def test_make_crops_skips_unknown_points_and_uncovered_levels():
    sag = make_stack(P, -H, (0, 0, 0), (9, 64, 64), (1.0, 1.0), 4.0)
    axial = make_stack(L, P, (0, 0, 0), (5, 48, 48), (1.0, 1.0), 3.0, "Axial T2")
    points = StudyPoints()
    points.set("spinal_canal_stenosis", "l4_l5", [0, 0, 0])
    points.set("left_subarticular_stenosis", "l4_l5", [8, 0, 0])
    points.set("left_subarticular_stenosis", "l1_l2", [8, 0, 80])  # far above the axial slab
    stacks = {"Sagittal T2/STIR": [sag], "Axial T2": [axial]}
    crops = make_crops(stacks, points, CFG)
    assert set(crops) == {"spinal_canal_stenosis_l4_l5", "left_subarticular_stenosis_l4_l5"}
    assert all(c.shape == (5, 32, 32) for c in crops.values())
    rng = np.random.default_rng(0)
    jittered = make_crops(stacks, points, CFG, rng=rng)
    assert set(jittered) == set(crops)


def test_the_disc_field_follows_the_disc_anchor_only():
    """``disc_mm`` widens a task's disc-centred crops (a disc is ~45 mm deep; Pfirrmann reads its
    nucleus against the annulus, narrowing its height against the endplates) and nothing else;
    unset, the disc crops keep ``spinal_mm`` as runs before it cut them."""
    import dataclasses

    from spinegrade.task import SPIDER_DISCS

    wide = dataclasses.replace(CFG, disc_mm=60.0)
    assert crop_view("pfirrmann", wide, SPIDER_DISCS).field_mm == 60.0
    assert crop_view("pfirrmann", CFG, SPIDER_DISCS).field_mm == CFG.spinal_mm
    for condition in ("spinal_canal_stenosis", "left_neural_foraminal_narrowing",
                      "right_subarticular_stenosis"):  # fmt: skip
        assert crop_view(condition, wide).field_mm == crop_view(condition, CFG).field_mm
    # The same disc blob fills a smaller share of the wider crop (mm per pixel grow by 60/32).
    stack = make_stack(P, -H, (0, 0, 0), (9, 96, 96), (1.0, 1.0), 4.0)
    add_blob(stack, np.zeros(3), 255, 4.0)
    crops = [extract_crop(stack, np.zeros(3), crop_view("pfirrmann", c, SPIDER_DISCS), size=32,
                          n_slices=1) for c in (CFG, wide)]  # fmt: skip
    share = [float((c > 0.5 * c.max()).mean()) for c in crops]
    assert 0 < share[1] < 0.5 * share[0]
