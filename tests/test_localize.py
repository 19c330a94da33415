"""Stage 1: canonical frames, targets, read-out, offsets, errors, and a short training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spinegrade.config import LocalizerAugmentConfig, load_config
from spinegrade.data.localizer_dataset import LocalizerDataset, collate_stacks
from spinegrade.localization.decode import decode_levels
from spinegrade.localization.derived import (
    derive_points,
    fit_offsets,
    fuse_level_points,
    fusion_lead,
    spine_frames,
)
from spinegrade.localization.errors import point_errors, summarize_errors
from spinegrade.localization.frames import canonical_volume, sagittal_frame
from spinegrade.localization.localizer import Localizer
from spinegrade.localization.points import StudyPoints
from spinegrade.localization.samples import localizer_sample
from spinegrade.localization.tasks import LOCALIZER_TASKS
from spinegrade.task import LEVELS
from spinegrade.training.stages import train_localizer
from spinegrade.util.runtime import Runtime
from stack_factory import H, L, P, add_blob, level_points, make_stack

ORIENTATIONS = [(P, -H), (-P, -H), (-H, P), (H, -P), (P, H)]


def _centroid(img: np.ndarray) -> tuple[float, float]:
    """Intensity centroid (row, col) of the brightest pixels (a blob has a flat top)."""
    w = np.where(img >= 0.5 * img.max(), img, 0.0)
    rows, cols = np.indices(img.shape)
    return float((rows * w).sum() / w.sum()), float((cols * w).sum() / w.sum())


@pytest.mark.parametrize(("row", "col"), ORIENTATIONS)
def test_frame_round_trip_and_canonical_directions(row, col):
    stack = make_stack(row, col, (0, 0, 0), (7, 40, 48), (1.0, 1.25), 4.0)
    frame = sagittal_frame(stack, size=32, max_slices=5)
    z, y, x = np.array([1.0, 3.0, 5.5]), np.array([2.0, 17.0, 30.25]), np.array([0.0, 22.0, 41.5])
    back = frame.to_cached(*frame.to_canonical(z, y, x))
    assert np.allclose(back, (z, y, x))
    # Canonical axes: +x posterior, +y feet, +z patient left.
    base = np.array(frame.to_canonical(*stack.patient_to_voxel(np.zeros(3))), dtype=float)
    for direction, axis in ((P, 2), (-H, 1), (L, 0)):
        moved = np.array(frame.to_canonical(*stack.patient_to_voxel(4.0 * direction)), dtype=float)
        assert moved[axis] > base[axis], (direction, axis)


@pytest.mark.parametrize("zoom", [None, (-4.0, 12.0, 0.5)])
def test_sample_targets_follow_the_blob_into_the_canonical_volume(zoom):
    stack = make_stack(H, -P, (0, 0, 0), (7, 64, 64), (1.0, 1.0), 4.0)  # a transposed scanner
    points = StudyPoints()
    p = np.array([4.0, 6.0, -10.0])
    add_blob(stack, p, 255, 2.0)
    points.set("spinal_canal_stenosis", "l2_l3", p)
    sample = localizer_sample(stack, points, LOCALIZER_TASKS["spinal"], size=32, max_slices=24)
    j = LEVELS.index("l2_l3")
    assert sample.valid.tolist() == [k == j for k in range(5)]
    frame = (
        sample.frame
        if zoom is None
        else sample.frame.zoomed(*sample.zyx[j, 1:] + zoom[:2], zoom[2])
    )
    item = sample.view(frame)
    assert item["valid"][j]
    z, (x, y) = int(item["z"][j]), item["xy"][j]
    cy, cx = _centroid(item["volume"][z])
    assert abs(cy - y) <= 0.75 and abs(cx - x) <= 0.75
    # The frame maps the network's pixel back to the blob's voxel.
    back = frame.to_cached(z, y, x)
    assert np.allclose(back, stack.patient_to_voxel(p), atol=0.6)


def test_zoom_window_pads_outside_the_image():
    stack = make_stack(P, -H, (0, 0, 0), (3, 16, 16), (1.0, 1.0), 4.0)
    stack.volume[:] = 200
    frame = sagittal_frame(stack, size=16, max_slices=8).zoomed(0.0, 0.0, 1.0)  # corner-centred
    vol = canonical_volume(stack, frame)
    assert vol.shape == (3, 16, 16) and vol.dtype == np.float32
    assert vol[:, :6, :6].max() == 0 and vol[:, 10:, 10:].min() == pytest.approx(
        200 / 255, abs=1e-3
    )


@pytest.mark.parametrize(("row", "col"), [(P, -H), (H, -P)])
def test_rectangular_field_is_padded_not_squeezed(row, col):
    """A 64 x 40 mm field reaches the network with its proportions (zeros beside it): a squeezed
    spine would show discs closer together (or wider) than any the network was trained on."""
    shape = (3, 64, 40) if row is P else (3, 40, 64)  # 64 mm head-feet, 40 mm front-back
    stack = make_stack(row, col, (0, 0, 0), shape, (1.0, 1.0), 4.0)
    stack.volume[:] = 0
    pts = [np.array([0.0, 0.0, 0.0]), 12.0 * H, 12.0 * P]  # centre, 12 mm up, 12 mm back
    for q in pts:
        add_blob(stack, q, 255, 1.5)
    frame = sagittal_frame(stack, size=32, max_slices=3)
    side_h, side_w = frame.view_window()[2:]
    assert side_h == side_w == 64 and frame.inplane_hw() == (64, 40)
    vol = canonical_volume(stack, frame)
    assert vol.shape == (3, 32, 32)
    px = [np.array(frame.to_canonical(*stack.patient_to_voxel(q)), dtype=float)[1:] for q in pts]
    up, back = np.abs(px[1] - px[0]), np.abs(px[2] - px[0])
    assert up[0] == pytest.approx(back[1], rel=0.02)  # 12 mm is 12 mm on both axes (6 px)
    assert up[0] == pytest.approx(6.0, rel=0.05)
    # the 12 px of padding on each side (of 64) are empty; the field's centre is not
    assert vol[:, :, :5].max() == 0 and vol[:, :, -5:].max() == 0
    assert vol[1].max() > 0.1  # the blobs (antialiased to half size)
    z, y, x = np.array([1.0, 2.0]), np.array([30.0, 3.5]), np.array([20.0, 39.0])
    assert np.allclose(frame.to_cached(*frame.to_canonical(z, y, x)), (z, y, x))


def test_collate_pads_and_masks():
    a = {"volume": np.ones((3, 8, 8), np.float32), "xy": np.zeros((5, 2), np.float32),
         "z": np.zeros(5, np.float32), "valid": np.ones(5, bool)}  # fmt: skip
    b = {**a, "volume": np.ones((5, 8, 8), np.float32)}
    batch = collate_stacks([a, b])
    assert batch["volume"].shape == (2, 5, 8, 8)
    assert batch["mask"].sum(1).tolist() == [3, 5]
    assert float(batch["volume"][0, 3:].abs().sum()) == 0.0


def _logits(peaks: dict[int, list[tuple[int, int, int, float]]], t=5, s=3, h=40, w=12):
    """Joint logits (T, S, h, w) with Gaussian bumps: target -> [(slice, y, x, height)]."""
    gy, gx = np.indices((h, w))
    out = np.full((t, s, h, w), -8.0)
    for j, bumps in peaks.items():
        for z, y, x, height in bumps:
            out[j, z] = np.maximum(out[j, z], height - ((gy - y) ** 2 + (gx - x) ** 2) / 2.0)
    return out


def test_decode_levels_reads_sharp_peaks():
    discs = [(1, 4 + 7 * j, 6, 10.0) for j in range(5)]
    logits = _logits({j: [discs[j]] for j in range(5)})
    z, y, x = decode_levels(logits, [list(range(5))], min_gap=2.0)
    assert z.tolist() == [1] * 5
    assert np.allclose(y, [4, 11, 18, 25, 32], atol=0.05) and np.allclose(x, 6, atol=0.05)


def test_decode_levels_keeps_levels_on_distinct_ordered_discs():
    # L1/L2's own map prefers the L2/L3 disc (y=11) and only weakly shows its own (y=4):
    # decoded alone it would sit on L2/L3; decoded as a sequence it moves up to y=4.
    peaks = {j: [(1, 4 + 7 * j, 6, 10.0)] for j in range(1, 5)}
    peaks[0] = [(1, 11, 6, 10.0), (2, 4, 6, 8.0)]
    z, y, _ = decode_levels(_logits(peaks), [list(range(5))], min_gap=3.0)
    assert np.allclose(y, [4, 11, 18, 25, 32], atol=0.05) and z[0] == 2
    # Without a gap constraint the unsure level falls onto its neighbour.
    _, y_free, _ = decode_levels(_logits(peaks), [[0], [1], [2], [3], [4]], min_gap=3.0)
    assert y_free[0] == pytest.approx(11, abs=0.05)


def test_another_looks_rows_vote_on_the_chains_run_of_discs():
    # Six discs seen; every level's map leans one disc towards the head (L1/L2 on the thoracic
    # disc), the chain moves as one and names them all one disc high. The whole look's rows,
    # right but coarse (3 cells off), outvote the lean; far rows of a sure map do not.
    ys = [3, 10, 17, 24, 31, 38]
    peaks = {j: [(1, ys[j], 6, 7.0), (1, ys[j + 1], 6, 6.0)] for j in range(5)}
    logits = _logits(peaks, h=44)
    _, leaning, _ = decode_levels(logits, [list(range(5))], min_gap=3.0, chain=True)
    assert np.allclose(leaning, ys[:5], atol=0.5)
    rows = np.array(ys[1:], dtype=float) + 3.0
    _, voted, _ = decode_levels(
        logits, [list(range(5))], min_gap=3.0, chain=True, prior=rows, prior_sd=3.5
    )
    assert np.allclose(voted, ys[1:], atol=0.5)
    # Rows of unknown levels (NaN) do not vote; a weak vote (large SD) leaves the maps' choice.
    half = rows.copy()
    half[:3] = np.nan
    _, y_half, _ = decode_levels(
        logits, [list(range(5))], min_gap=3.0, chain=True, prior=half, prior_sd=3.5
    )
    assert np.allclose(y_half, ys[1:], atol=0.5)
    _, y_weak, _ = decode_levels(
        logits, [list(range(5))], min_gap=3.0, chain=True, prior=rows, prior_sd=100.0
    )
    assert np.allclose(y_weak, ys[:5], atol=0.5)


def test_offsets_and_derived_points():
    studies = []
    for sid in range(4):
        pts = StudyPoints()
        for (condition, level), p in level_points(sid).items():
            pts.set(condition, level, p)
        studies.append(pts)
    offsets = fit_offsets(studies)
    assert np.allclose(offsets["subarticular"][0], 8 * L + 3 * P)
    assert np.allclose(offsets["subarticular"][1], -8 * L + 3 * P)
    assert np.allclose(offsets["spinal_from_foramina"], -4 * P)
    # Only foramina known (no T2): canal and recesses follow from them.
    partial = StudyPoints()
    for lv in LEVELS:
        for c in ("left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"):
            partial.set(c, lv, studies[0].get(c, lv))
    full = derive_points(partial, offsets)
    assert np.allclose(full.xyz, studies[0].xyz)


def _leaning_spine(tilt_deg: float, bend_deg: float, shift: np.ndarray) -> StudyPoints:
    """Canal points 35 mm apart along an arc in the sagittal plane, tilted by ``tilt_deg`` and
    curving ``bend_deg`` a level (lordosis); each disc centre 20 mm in front of its canal point
    and 2 mm towards the head, across and along the spine's own axis there."""
    pts = StudyPoints()
    angle = np.deg2rad(tilt_deg + bend_deg * np.arange(len(LEVELS)))  # the canal's direction
    along = np.stack([np.zeros_like(angle), np.sin(angle), -np.cos(angle)], 1)  # head to feet
    canal = np.cumsum(35.0 * along, axis=0) + shift
    for j, lv in enumerate(LEVELS):
        pts.set("spinal_canal_stenosis", lv, canal[j])
    tangent = np.gradient(canal, axis=0)  # the chain's own local direction, as spine_frames
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    front = np.stack([np.zeros(len(LEVELS)), -tangent[:, 2], tangent[:, 1]], 1)
    front *= -np.sign(front[:, 1:2])  # anterior: towards -y in LPS
    pts.disc[:] = canal + 20.0 * front - 2.0 * tangent
    return pts


def test_disc_centres_follow_the_spines_lean():
    """The disc lies across the spine's axis from its canal point: an offset learned in the
    spine's own axes finds it in a spine leaning as none of the training ones did, where an
    offset in patient axes misses it."""
    train = [_leaning_spine(t, b, np.array([s, 2 * s, -s])) for t, b, s in
             [(-10, 4, 0.0), (0, 6, 3.0), (5, 2, -2.0), (-5, 5, 1.0)]]  # fmt: skip
    offsets = fit_offsets(train)
    assert offsets["disc_in_frame"].shape == (len(LEVELS), 3)
    new = _leaning_spine(25.0, 9.0, np.array([4.0, -6.0, 10.0]))
    axes = spine_frames(new.xyz[0])
    assert np.allclose(np.einsum("jab,jcb->jac", axes, axes), np.eye(3))  # orthonormal
    bare = new.copy()
    bare.disc[:] = np.nan
    derived = derive_points(bare, offsets).disc
    assert np.abs(derived - new.disc).max() < 0.5
    patient_axes = {k: v for k, v in offsets.items() if k != "disc_in_frame"}  # older localisers
    assert np.abs(derive_points(bare, patient_axes).disc - new.disc).max() > 5.0
    # A canal point alone has no axis: the patient-axis offset still places its disc.
    alone = StudyPoints()
    alone.set("spinal_canal_stenosis", LEVELS[2], new.xyz[0, 2])
    assert np.isnan(spine_frames(alone.xyz[0])).all()
    lone = derive_points(alone, offsets)
    assert np.allclose(lone.disc[2], new.xyz[0, 2] + offsets["disc_from_spinal"][2])
    assert np.isnan(lone.disc[[0, 1, 3, 4]]).all()
    # A labelled disc centre always wins.
    assert np.allclose(derive_points(new, offsets).disc, new.disc)


FUSED = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
)


def _fusion_truth() -> tuple[StudyPoints, dict[str, np.ndarray]]:
    """One phantom study's true points and the offsets learned from it alone."""
    truth = StudyPoints()
    for (condition, level), p in level_points(0).items():
        truth.set(condition, level, p)
    return truth, fit_offsets([truth])


def test_fusion_moves_a_level_that_slid_onto_the_consensus():
    truth, offsets = _fusion_truth()
    spinal, left, right = FUSED
    pred = truth.copy()
    pred.set(spinal, "l3_l4", truth.get(spinal, "l3_l4") + 20 * H + 1.5 * L)  # slid up a level
    pred.set(left, "l4_l5", truth.get(left, "l4_l5") - 25 * H)  # a foramen slid down
    pred.set(right, "l1_l2", truth.get(right, "l1_l2") + 3 * H)  # within tolerance: kept
    fused = fuse_level_points(pred, offsets, tol_mm=10.0)
    # Height and depth come back to the level; the canal keeps its own lateral position.
    assert np.allclose(fused.get(spinal, "l3_l4"), truth.get(spinal, "l3_l4") + 1.5 * L)
    assert np.allclose(fused.get(left, "l4_l5"), truth.get(left, "l4_l5"))
    assert np.allclose(fused.get(right, "l1_l2"), pred.get(right, "l1_l2"))
    untouched = [lv for lv in LEVELS if lv not in ("l3_l4", "l4_l5", "l1_l2")]
    for lv in untouched:
        for c in (spinal, left, right):
            assert np.allclose(fused.get(c, lv), truth.get(c, lv))
    # Off (0 mm), or a level missing a foramen: nothing moves; the input is never modified.
    assert np.array_equal(fuse_level_points(pred, offsets, 0.0).xyz, pred.xyz)
    pred.xyz[2, LEVELS.index("l3_l4")] = np.nan
    assert np.allclose(
        fuse_level_points(pred, offsets, 10.0).get(spinal, "l3_l4"), pred.get(spinal, "l3_l4")
    )


def test_a_canal_that_leads_is_never_moved_and_pulls_the_foramina_to_its_disc():
    """The demo's canal net learned real spines and its foraminal net phantoms only: the two
    foramina of one net, a disc off together, must not outvote the canal."""
    truth, offsets = _fusion_truth()
    spinal, left, right = FUSED
    pred = truth.copy()
    for c in (left, right):  # both foramina of L3/L4 on the disc above, as one net puts them
        pred.set(c, "l3_l4", truth.get(c, "l3_l4") + 24 * H)
    pred.set(left, "l1_l2", truth.get(left, "l1_l2") + 3 * H)  # within tolerance: kept
    median = fuse_level_points(pred, offsets, tol_mm=10.0)  # no lead: the pair wins
    assert np.allclose(median.get(spinal, "l3_l4"), truth.get(spinal, "l3_l4") + 24 * H)
    led = fuse_level_points(pred, offsets, tol_mm=10.0, lead="canal")
    assert np.allclose(led.xyz[0], truth.xyz[0])  # the canal never moves
    for c in (left, right):
        assert np.allclose(led.get(c, "l3_l4"), truth.get(c, "l3_l4"))
    assert np.allclose(led.get(left, "l1_l2"), pred.get(left, "l1_l2"))
    with pytest.raises(ValueError, match="fusion lead"):
        fuse_level_points(pred, offsets, 10.0, lead="foramina")
    # Who leads follows what each net learned from.
    assert fusion_lead({"spinal": {"phantom", "real"}, "foraminal": {"phantom"}}) == "canal"
    assert fusion_lead({"spinal": {"phantom"}, "foraminal": {"phantom"}}) == ""
    assert fusion_lead({"spinal": {"real"}, "foraminal": {"real", "phantom"}}) == ""
    assert fusion_lead({"spinal": {"real"}}) == "canal"  # no foramina: nothing to fuse anyway
    assert fusion_lead({}) == ""


def test_point_errors_and_summary():
    stack = make_stack(P, -H, (0, 0, 0), (9, 64, 64), (1.0, 1.0), 4.0)
    true, pred = StudyPoints(), StudyPoints()
    true.set("spinal_canal_stenosis", "l1_l2", [0, 0, 0])
    pred.set("spinal_canal_stenosis", "l1_l2", [0, 3, 4])  # same slice, 5 mm off
    true.set("spinal_canal_stenosis", "l2_l3", [0, 0, 0])
    pred.set("spinal_canal_stenosis", "l2_l3", [4, 0, 0])  # next slice
    true.set("spinal_canal_stenosis", "l3_l4", [0, 0, 0])  # not predicted
    rows = point_errors(7, pred, true, {"Sagittal T2/STIR": [stack]})
    assert [r["slice_ok"] for r in rows] == [True, False, False]
    summary = summarize_errors(rows)["spinal"]
    assert summary["n"] == 3 and summary["missed"] == 1
    assert summary["median_mm"] == pytest.approx(4.5) and summary["slice_acc"] == pytest.approx(
        1 / 3
    )


def test_a_few_localizer_steps_reduce_the_loss():
    torch.manual_seed(0)
    overrides = ["localizer.epochs=6", "localizer.image_size=32", "localizer.batch_size=4",
                 "localizer.decoder_channels=16", "localizer.lr=3e-3",
                 "optim.warmup_frac=0"]  # fmt: skip
    cfg = load_config("quick", overrides)
    samples = []
    for sid in range(4):
        stack = make_stack(P, -H, (0, 0, 0), (7, 48, 48), (2.0, 2.0), 4.0)
        pts = StudyPoints()
        for lv in LEVELS:
            p = level_points(sid)[("spinal_canal_stenosis", lv)]
            add_blob(stack, p, 255, 2.0)
            pts.set("spinal_canal_stenosis", lv, p)
        samples.append(localizer_sample(stack, pts, LOCALIZER_TASKS["spinal"], 32, 24))
    history = []
    runtime = Runtime(torch.device("cpu"))
    train_localizer(
        cfg, {"spinal": samples}, {"spinal": samples[:1]}, runtime, log_fn=history.append
    )
    losses = [h["train_loss"] for h in history]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert {"val_slice_acc", "val_median_mm"} <= set(history[-1])


def test_dataset_augmentation_keeps_targets_on_the_blob():
    stack = make_stack(P, -H, (0, 0, 0), (7, 64, 64), (1.0, 1.0), 4.0)
    pts = StudyPoints()
    p = np.array([0.0, 5.0, 5.0])
    add_blob(stack, p, 255, 2.0)
    pts.set("spinal_canal_stenosis", "l1_l2", p)
    sample = localizer_sample(stack, pts, LOCALIZER_TASKS["spinal"], 32, 24)
    ds = LocalizerDataset([sample], augment=True, zoom=0.5, zoom_prob=0.5, seed=3)
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["valid"][0]
        x, y = item["xy"][0]
        cy, cx = _centroid(item["volume"][int(item["z"][0])])
        assert abs(cy - y) <= 0.75 and abs(cx - x) <= 0.75


def _blob_sample(points_mm):
    stack = make_stack(P, -H, (0, 0, 0), (7, 64, 64), (1.0, 1.0), 4.0)
    pts = StudyPoints()
    for lv, p in zip(LEVELS, points_mm, strict=False):
        add_blob(stack, np.asarray(p, dtype=float), 255, 2.0)
        pts.set("spinal_canal_stenosis", lv, np.asarray(p, dtype=float))
    return localizer_sample(stack, pts, LOCALIZER_TASKS["spinal"], 32, 24)


def test_geometric_augmentation_moves_targets_with_the_image():
    # Scale, stretch, shift and rotation of the whole look: the target must stay on its blob,
    # and the labelled level must stay in view (the window never cuts a target off).
    sample = _blob_sample([(0.0, 5.0, 5.0)])
    aug = LocalizerAugmentConfig(
        scale=0.3, aspect=0.3, shift=0.2, rotate_deg=25.0, gamma=0, contrast=0, noise=0, blur=0,
        bias=0,
    )  # fmt: skip
    ds = LocalizerDataset([sample], augment=True, zoom=0.5, zoom_prob=0.3, seed=5, aug=aug)
    moved = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["valid"][0]
        x, y = item["xy"][0]
        cy, cx = _centroid(item["volume"][int(item["z"][0])])
        assert abs(cy - y) <= 1.0 and abs(cx - x) <= 1.0
        moved.append((round(float(x), 1), round(float(y), 1)))
    assert len(set(moved)) > 6  # the looks really differ


def test_whole_look_keeps_every_level_in_view():
    sample = _blob_sample([(0.0, 5.0, z) for z in (-20.0, -10.0, 0.0, 10.0, 20.0)])
    aug = LocalizerAugmentConfig(scale=0.4, aspect=0.3, shift=0.3, rotate_deg=0, gamma=0,
                                 contrast=0, noise=0, blur=0, bias=0)  # fmt: skip
    ds = LocalizerDataset([sample], augment=True, zoom=0.0, seed=1, aug=aug)
    for epoch in range(10):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["valid"].all()
        assert (item["xy"] >= 0).all() and (item["xy"] < 32).all()


def test_intensity_augmentation_stays_in_range_and_varies():
    sample = _blob_sample([(0.0, 5.0, 5.0)])
    aug = LocalizerAugmentConfig(gamma=0.4, contrast=0.3, noise=0.05, blur=1.2, bias=0.35)
    ds = LocalizerDataset([sample], augment=True, zoom=0.0, seed=2, aug=aug)
    plain = sample.view(sample.frame)["volume"]
    looks = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        vol = ds[0]["volume"]
        assert vol.dtype == np.float32 and vol.min() >= 0 and vol.max() <= 1
        looks.append(vol)
    assert all(np.abs(v - plain).max() > 0.02 for v in looks)
    assert np.abs(looks[0] - looks[1]).max() > 0.02


def test_chain_decoder_names_consecutive_discs():
    # Six discs in view (a thoracic one on top). The level maps are bunched, as on a real spine
    # seen through a phantom-trained net: L1/L2's map peaks on the L2/L3 disc, and the
    # others each one disc too high except L5/S1. Ordered per-level decoding keeps the bunching
    # error at L1/L2 (it jumps to the thoracic disc); the chain takes five neighbouring discs.
    ys = [3, 10, 17, 24, 31, 38]  # disc rows, head to feet; the labelled five are ys[1:]
    peaks = {j: [(1, ys[j + 1], 6, 6.0)] for j in range(5)}
    for j in range(5):
        peaks[j].append((1, ys[j + 1] - 7 if j < 4 else ys[j + 1], 6, 7.0 if j < 4 else 6.0))
    logits = _logits(peaks, h=44)
    _, y_chain, _ = decode_levels(logits, [list(range(5))], min_gap=3.0, chain=True)
    assert np.allclose(np.diff(y_chain), 7, atol=0.3)  # neighbouring discs, none skipped
    assert y_chain[-1] == pytest.approx(38, abs=0.3)  # anchored where L5/S1's map is sure
    _, y_ord, _ = decode_levels(logits, [list(range(5))], min_gap=3.0)
    assert y_ord[0] == pytest.approx(3, abs=0.3) and y_ord[3] == pytest.approx(24, abs=0.3)
    with pytest.raises(ValueError, match="decoder"):
        Localizer({}, {}, 32, 8, decoder="nearest")


def test_close_look_refines_only_near_its_centre():
    # A close look centred on the zoomed look's estimate: the neighbouring disc (beyond
    # FINE_SEARCH_MM) may be brighter, in this level's map or another's; the point moves to the
    # nearest disc of the pooled maps and stays on it (in-plane: its slice is the zoomed look's).
    from spinegrade.localization.looks import FINE_SEARCH_MM, _decode_fine

    stack = make_stack(P, -H, (0, 0, 0), (3, 64, 64), (1.0, 1.0), 4.0)
    look = sagittal_frame(stack, size=32, max_slices=3).zoomed(32.0, 32.0, 0.5)  # 32 px window
    # cells of 2 mm; the centre is cell 7.5; the search reaches FINE_SEARCH_MM / 2 cells from it
    assert 7.5 - 0 > FINE_SEARCH_MM / 2 > 10 - 7.5  # the premise: one disc in reach, one beyond
    heat = _logits({0: [(1, 10, 8, 6.0), (2, 0, 8, 9.0)], 1: [(1, 10, 8, 6.0)],
                    2: [(2, 15, 15, 12.0)]}, t=5, s=3, h=16, w=16)  # fmt: skip
    y, x = _decode_fine(heat, range(5), look, mm_y=1.0)  # in-plane only: the slice is kept
    assert y == pytest.approx(16 + 2 * 10 + 0.5, abs=0.6)
    assert x == pytest.approx(16 + 2 * 8 + 0.5, abs=0.6)


def test_close_looks_follow_the_blob_and_round_trip_in_the_geometry(tmp_path):
    sample = _blob_sample([(0.0, 5.0, z) for z in (-20.0, -10.0, 0.0, 10.0, 20.0)])
    ds = LocalizerDataset([sample], augment=True, zoom=0.6, seed=4, fine=0.4)
    sizes = set()
    for epoch in range(15):
        ds.set_epoch(epoch)
        item = ds[0]
        for j in np.flatnonzero(item["valid"]):
            x, y = item["xy"][j]
            img = item["volume"][int(item["z"][j])]
            r0, c0 = max(0, round(float(y)) - 3), max(0, round(float(x)) - 3)
            assert img[r0 : r0 + 7, c0 : c0 + 7].max() > 0.3  # the target sits on its blob
        sizes.add(int(item["valid"].sum()))
    assert min(sizes) < 5  # some looks were close ones, showing only a few levels
    loc = Localizer({}, {}, 32, 8, zoom=0.6, decoder="chain", fine=0.4)
    loc.save(tmp_path)
    assert Localizer.load(tmp_path).fine == pytest.approx(0.4)


def test_consensus_outvotes_a_fold_that_named_the_discs_one_too_low():
    from spinegrade.localization.localize import consensus_points

    folds = []
    for k in range(5):
        p = StudyPoints()
        for j, lv in enumerate(LEVELS):
            shift = -35.0 if k in (1, 3) else 0.0  # two folds: one disc lower (towards the feet)
            p.set("spinal_canal_stenosis", lv, [1.0 + 0.1 * k, 20.0, -35.0 * j + shift + 0.2 * k])
        if k == 0:
            p.set("left_neural_foraminal_narrowing", "l1_l2", [15.0, 10.0, 0.0])  # one fold only
        folds.append(p)
    c = consensus_points(folds)
    heights = [c.get("spinal_canal_stenosis", lv)[2] for lv in LEVELS]
    assert np.allclose(heights, [-35.0 * j for j in range(5)], atol=1.0)  # the majority's discs
    assert np.allclose(c.get("left_neural_foraminal_narrowing", "l1_l2"), [15.0, 10.0, 0.0])
    assert c.get("right_neural_foraminal_narrowing", "l5_s1") is None  # no fold: still unknown
    mean = np.mean([f.get("spinal_canal_stenosis", "l3_l4")[2] for f in folds])
    assert abs(mean - heights[2]) > 10  # a mean would have put it between two discs


class _PriorNet(torch.nn.Module):
    """A localiser that names levels by where they sit in its window (the zoomed look's failure
    mode on real spines): level j peaks on row 2 + 4j (+ ``bias``) of every look, mid-slice."""

    def __init__(self, bias: int = 0) -> None:
        super().__init__()
        self.n_targets, self.bias, self.calls = 5, bias, 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device for _run_looks

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        b, s, h, w = x.shape
        heat = torch.full((b, 5, s, h // 4, w // 4), -30.0)
        for j in range(5):
            heat[:, j, s // 2, 2 + 4 * j + self.bias, w // 8] = 30.0
        return {"heatmaps": heat}

    def heatmaps(self, x: torch.Tensor) -> torch.Tensor:
        """What the looks read (as :meth:`.LevelLocalizer.heatmaps`)."""
        return self(x)["heatmaps"]


def _record_zooms(monkeypatch, frac: float) -> list[tuple[float, float]]:
    """(y, x) centre of every zoomed look of share ``frac`` taken from now on."""
    from spinegrade.localization.frames import SagittalFrame

    seen: list[tuple[float, float]] = []
    zoomed = SagittalFrame.zoomed

    def record(self, cy, cx, f):
        if f == frac:
            seen.append((float(cy), float(cx)))
        return zoomed(self, cy, cx, f)

    monkeypatch.setattr(SagittalFrame, "zoomed", record)
    return seen


def test_a_given_centre_replaces_the_whole_look(monkeypatch):
    from spinegrade.localization.looks import locate_in_stacks

    stack = make_stack(P, -H, (0, 0, 0), (3, 256, 256), (1.2, 1.2), 4.0)
    frame = sagittal_frame(stack, size=96, max_slices=3)
    seen = _record_zooms(monkeypatch, 0.5)
    net = _PriorNet()
    own = locate_in_stacks(net, [stack], [frame], 0.5, decoder="chain")[0]
    assert net.calls == 2 and len(seen) == 1  # a whole look, then a zoomed one at its middle
    centre = [(90.0, 140.0)]
    given = locate_in_stacks(net, [stack], [frame], 0.5, decoder="chain", centres=centre)[0]
    assert net.calls == 3 and seen[1] == (90.0, 140.0)  # only the zoomed look, where told
    # This net names by window position, so its levels move with the centre it was given.
    assert np.allclose(given[1] - own[1], 90.0 - seen[0][0], atol=1.0)


def test_folds_zoom_where_their_whole_looks_agree(monkeypatch):
    from spinegrade.localization.localize import first_looks, localize_consensus, localize_study
    from spinegrade.localization.looks import look_centre

    stack = make_stack(P, -H, (0, 0, 0), (3, 256, 256), (1.2, 1.2), 4.0)
    stacks = {"Sagittal T2/STIR": [stack]}
    nets = [_PriorNet(0), _PriorNet(0), _PriorNet(3)]  # the third fold's whole look slid
    offsets = fit_offsets([])  # zeros: the recesses sit on the canal point
    folds = [Localizer({"spinal": n}, offsets, 96, 3, zoom=0.5, decoder="chain") for n in nets]
    agreed = look_centre(tuple(first_looks(folds[0], {0: stacks})[0]["spinal"]))
    slid = look_centre(tuple(first_looks(folds[2], {0: stacks})[0]["spinal"]))
    assert slid[0] - agreed[0] > 30  # 3 whole-look cells (~38 mm) lower
    for n in nets:
        n.calls = 0
    seen = _record_zooms(monkeypatch, 0.5)
    points = localize_consensus(folds, stacks)
    assert seen == [pytest.approx(agreed)] * 3  # every fold's zoomed look at the median centre
    assert [n.calls for n in nets] == [2, 2, 2]  # no more passes than each fold alone
    alone = localize_study(folds[2], stacks)  # left to itself, the slid fold zooms too low
    assert seen[-1][0] - agreed[0] > 30
    heights = [points.get("spinal_canal_stenosis", lv)[2] for lv in LEVELS]
    own_heights = [alone.get("spinal_canal_stenosis", lv)[2] for lv in LEVELS]
    assert all(h - o > 30 for h, o in zip(heights, own_heights, strict=True))  # LPS z: up


def test_the_folds_whole_looks_vote_where_they_agree(monkeypatch):
    """With ``vote_mm`` the consensus's zoomed looks are decoded with the median of the folds'
    whole-look rows (a slid fold outvoted), and a fold alone with its own whole look's."""
    from spinegrade.localization import looks
    from spinegrade.localization.localize import first_looks, localize_consensus, localize_study

    stack = make_stack(P, -H, (0, 0, 0), (3, 256, 256), (1.2, 1.2), 4.0)
    stacks = {"Sagittal T2/STIR": [stack]}
    nets = [_PriorNet(0), _PriorNet(0), _PriorNet(3)]
    folds = [Localizer({"spinal": n}, fit_offsets([]), 96, 3, zoom=0.5, decoder="chain",
                       vote_mm=20.0) for n in nets]  # fmt: skip
    whole = [first_looks(f, {0: stacks})[0]["spinal"][1] for f in folds]
    seen: list = []
    decode = looks._decode_look

    def record(heat, look, groups, mm_y, gap, decoder="ordered", prior_y=None, prior_mm=0.0):
        seen.append((None if prior_y is None else np.array(prior_y), prior_mm))
        return decode(heat, look, groups, mm_y, gap, decoder, prior_y, prior_mm)

    monkeypatch.setattr(looks, "_decode_look", record)
    localize_consensus(folds, stacks)
    voted = [(r, mm) for r, mm in seen if r is not None]
    assert len(voted) == 3 and all(mm == 20.0 for _, mm in voted)
    assert all(np.allclose(r, np.median(whole, axis=0)) for r, _ in voted)
    assert np.allclose(voted[0][0], whole[0]) and not np.allclose(whole[2], whole[0])
    seen.clear()
    localize_study(folds[2], stacks)
    assert np.allclose(next(r for r, _ in seen if r is not None), whole[2])  # its own
    seen.clear()
    folds[0].vote_mm = 0.0
    localize_study(folds[0], stacks)
    assert all(r is None for r, _ in seen)


class _SliceReadingNet(_PriorNet):
    """:class:`_PriorNet` with ``n_targets`` maps (10 = left and right) that records which of
    the stack's slices each pass was given: slice k of the test stack is filled with 10 (k + 1),
    so an input slice's brightest value names it (a window may pad with zeros, never brighten)."""

    def __init__(self, n_targets: int) -> None:
        super().__init__()
        self.n_targets, self.slices_read = n_targets, []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for item in x:
            self.slices_read.append(sorted(round(float(s.max()) * 255 / 10) - 1 for s in item))
        one = super().forward(x)["heatmaps"]
        return {"heatmaps": one.repeat(1, self.n_targets // 5, 1, 1, 1)}


@pytest.mark.parametrize("n_targets", [5, 10])
def test_the_canals_close_looks_read_only_the_slices_near_the_canal(n_targets):
    # The canal (one side) is refined in-plane on its own slice: its close looks read the
    # CLOSE_SLICES slices each side of it; the foramina (left and right share a look) keep the
    # whole stack.
    from spinegrade.localization.looks import CLOSE_SLICES, locate_in_stacks

    stack = make_stack(P, -H, (0, 0, 0), (15, 256, 256), (1.2, 1.2), 4.0)
    stack.volume[:] = (10 * np.arange(1, 16, dtype=np.uint8))[:, None, None]
    frame = sagittal_frame(stack, size=96, max_slices=24)
    net = _SliceReadingNet(n_targets)
    z, y, x = locate_in_stacks(net, [stack], [frame], 0.5, decoder="chain", fine=0.3)[0]
    assert np.allclose(z, 7)  # the zoomed look's slice (the stack's middle) is kept
    whole = list(range(15))
    near = list(range(7 - CLOSE_SLICES, 7 + CLOSE_SLICES + 1))  # centred on the canal's slice
    close = near if n_targets == 5 else whole
    assert net.slices_read == [whole, whole] + [close] * 5  # whole, zoomed, five close looks
    # Whatever the slices read, the close looks put each level on its peak in-plane: every level
    # lies where the net's maps peak in the zoomed look's window, within a heatmap cell.
    assert np.all(np.diff(y[:5]) > 0) and np.ptp(x) < 1e-6


def test_folds_cut_the_looks_they_share_once(monkeypatch):
    # Every fold's whole look at a stack is the same volume, and so is its zoomed look at the
    # folds' agreed centre: an ensemble cuts them once (looks.LookCache), whatever the folds.
    import spinegrade.localization.looks as looks
    from spinegrade.localization.localize import localize_consensus_many

    stacks = {
        sid: {"Sagittal T2/STIR": [make_stack(P, -H, (0, 0, 0), (3, 256, 256), (1.2, 1.2), 4.0)]}
        for sid in (1, 2)
    }
    folds = [
        Localizer({"spinal": _PriorNet(b)}, fit_offsets([]), 96, 3, zoom=0.5, decoder="chain")
        for b in (0, 0, 3)
    ]
    cut = looks.canonical_volume
    calls: list[int] = []
    monkeypatch.setattr(looks, "canonical_volume", lambda s, f: calls.append(1) or cut(s, f))
    points = localize_consensus_many(folds, stacks)
    assert len(calls) == 2 * 2  # two studies: a whole look and a zoomed one each, not per fold
    assert [n.calls for f in folds for n in f.nets.values()] == [2, 2, 2]  # one batch a look
    assert set(points) == {1, 2}
    # The same as one study at a time.
    from spinegrade.localization.localize import localize_consensus

    for sid, st in stacks.items():
        alone = localize_consensus(folds, st)
        assert np.allclose(alone.xyz, points[sid].xyz, equal_nan=True)
