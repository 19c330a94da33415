"""Geometry of cached stacks: label points <-> cached voxels <-> patient space <-> other series.

Stacks are built directly (as the DICOM reader returns them) with known geometry; a phantom blob
rendered in patient space into a sagittal and into tilted axial series checks that a label point
on one series lands on the same anatomy in another.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spinegrade.io.geometry import direction_name, plane_name
from spinegrade.io.types import Stack
from spinegrade.preprocessing.cache import (
    CachedStack,
    find_stack,
    index_frame,
    load_stack,
    map_label_point,
    project_point,
    read_index,
    save_stack,
    write_index,
)
from spinegrade.preprocessing.series import CacheParams, cache_series

BLOB = np.array([3.0, -4.0, 12.0])  # LPS mm: a bright 3D Gaussian "structure"


def rot(axis: str, deg: float) -> np.ndarray:
    """Rotation matrix about an LPS axis."""
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def make_stack(
    shape: tuple[int, int],
    spacing: tuple[float, float],
    row: np.ndarray,
    col: np.ndarray,
    centre: np.ndarray,
    gaps: list[float],
    first_instance: int = 1,
    render: bool = True,
) -> Stack:
    """A stack whose slices are centred on ``centre`` and advance along the normal by ``gaps``.

    Pixels sample the phantom blob at each pixel centre's patient position (or a ramp).
    """
    h, w = shape
    dy, dx = spacing
    row, col = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row, col)
    offsets = np.concatenate([[0.0], np.cumsum(gaps)])
    offsets -= offsets.mean()
    corner = centre - (w - 1) / 2 * dx * row - (h - 1) / 2 * dy * col
    positions = corner + offsets[:, None] * normal
    yy, xx = np.mgrid[0:h, 0:w]
    pix = []
    for p0 in positions:
        pts = p0 + (xx * dx)[..., None] * row + (yy * dy)[..., None] * col
        if render:
            pix.append(1000 * np.exp(-np.sum((pts - BLOB) ** 2, -1) / (2 * 3.0**2)) + 50)
        else:
            pix.append(xx * 3.0 + yy)
    d = len(positions)
    return Stack(
        pixels=np.asarray(pix, dtype=np.float32),
        positions=positions,
        row_dir=row,
        col_dir=col,
        pixel_spacing=(dy, dx),
        instance_numbers=np.arange(first_instance, first_instance + d, dtype=np.int64),
        files=[Path(f"{first_instance + i}.dcm") for i in range(d)],
        plane=plane_name(normal),
        direction=direction_name(normal),
    )


def sagittal(shape=(80, 64), gaps=None) -> Stack:
    # Sagittal: columns run anterior->posterior, rows head->feet; normal = -x (L->R order).
    gaps = gaps if gaps is not None else [3.0, 3.5, 3.0, 4.0, 3.5, 3.0, 3.0, 3.5, 3.0, 4.0]
    return make_stack(shape, (0.9, 0.8), [0, 1, 0], [0, 0, -1], np.array([1.0, 0, 0]), gaps)


def axial_stacks() -> list[Stack]:
    """Three axial stacks, one per 'disc', tilted differently, centred at different heights."""
    out = []
    for k, (height, tilt) in enumerate([(-20.0, -12.0), (12.0, 8.0), (40.0, 15.0)]):
        r = rot("x", tilt)
        out.append(
            make_stack((48, 56), (0.8, 0.75), r @ [1, 0, 0], r @ [0, 1, 0],
                       np.array([0.0, 0.0, height]), [4.0] * 4, first_instance=1 + 5 * k)
        )  # fmt: skip
    return out


def cached(stacks: list[Stack], size: int = 40, series_id: int = 7) -> list[CachedStack]:
    return cache_series(stacks, CacheParams(size=size), 1, series_id, "test")


def dicom_patient(stack: Stack, i: int, x: float, y: float) -> np.ndarray:
    """The DICOM definition: IPP + x * dx * row + y * dy * col (pixel-centre coordinates)."""
    dy, dx = stack.pixel_spacing
    return stack.positions[i] + x * dx * stack.row_dir + y * dy * stack.col_dir


def test_orig_cached_xy_round_trip_and_edges():
    cs = cached([sagittal(shape=(80, 64))], size=40)[0]
    x, y = np.array([-0.5, 0.0, 10.3, 63.5]), np.array([-0.5, 0.0, 41.7, 79.5])
    xc, yc = cs.orig_to_cached_xy(x, y)
    # 72 x 51.2 mm at 0.9 x 0.8 mm: the longer side fits 40 px (1.8 mm), the other keeps the
    # aspect (51.2 / 1.8 -> 28 px). Pixel edges map onto pixel edges: the whole field is kept.
    assert cs.volume.shape[1:] == (40, 28)
    assert xc[0] == pytest.approx(-0.5) and xc[-1] == pytest.approx(27.5)
    assert yc[0] == pytest.approx(-0.5) and yc[-1] == pytest.approx(39.5)
    xb, yb = cs.cached_to_orig_xy(xc, yc)
    np.testing.assert_allclose(xb, x, atol=1e-12)
    np.testing.assert_allclose(yb, y, atol=1e-12)


@pytest.mark.parametrize("shape", [(80, 64), (40, 40), (33, 90)])
def test_label_to_patient_matches_dicom_geometry(shape):
    src = sagittal(shape=shape)
    cs = cached([src], size=40)[0]
    rng = np.random.default_rng(0)
    for _ in range(20):
        i = int(rng.integers(len(src.positions)))
        x, y = rng.uniform(-0.5, shape[1] - 0.5), rng.uniform(-0.5, shape[0] - 0.5)
        got = cs.label_to_patient(int(src.instance_numbers[i]), x, y)
        np.testing.assert_allclose(got, dicom_patient(src, i, x, y), atol=1e-9)


def test_voxel_patient_round_trip_oblique_uneven_spacing():
    cs = cached(axial_stacks(), size=32)[1]  # tilted 8 degrees
    # Uneven slice gaps on a sagittal stack as well.
    sag = cached([sagittal(gaps=[2.0, 5.0, 3.0, 3.3])], size=32)[0]
    rng = np.random.default_rng(1)
    for stack in (cs, sag):
        d, h, w = stack.volume.shape
        z = rng.uniform(-1.0, d, 50)  # fractional, including a little outside the stack
        y, x = rng.uniform(-0.5, h - 0.5, 50), rng.uniform(-0.5, w - 0.5, 50)
        p = stack.voxel_to_patient(z, y, x)
        assert p.shape == (50, 3)
        zb, yb, xb = stack.patient_to_voxel(p)
        np.testing.assert_allclose(zb, z, atol=1e-9)
        np.testing.assert_allclose(yb, y, atol=1e-9)
        np.testing.assert_allclose(xb, x, atol=1e-9)
        # Integer z lands exactly on the stored slice positions.
        np.testing.assert_allclose(stack.voxel_to_patient(np.arange(d), 0, 0), stack.positions)


def test_single_slice_stack_round_trip():
    cs = cached([sagittal(gaps=[])], size=32)[0]
    assert cs.volume.shape == (1, 32, 23) and cs.slice_spacing == 0.0
    p = cs.voxel_to_patient(0.0, 5.5, 7.25)
    z, y, x = cs.patient_to_voxel(p)
    assert (float(z), float(y), float(x)) == pytest.approx((0.0, 5.5, 7.25))


def test_slice_index_and_find_stack():
    stacks = cached(axial_stacks(), size=32, series_id=11)
    assert stacks[1].slice_index(8) == 2  # instances 6..10 in the second stack
    assert find_stack(stacks, 11, 13) is stacks[2]
    with pytest.raises(KeyError, match="series 11"):
        stacks[0].slice_index(99)
    with pytest.raises(KeyError, match="instance_number 99"):
        find_stack(stacks, 11, 99)


def test_project_point_picks_the_stack_and_slice_of_the_plane():
    stacks = cached(axial_stacks(), size=32)
    target = stacks[2].voxel_to_patient(3.0, 10.0, 21.0)
    idx, z, y, x, dist = project_point(target, stacks)
    assert (idx, z) == (2, 3)
    assert (y, x, dist) == pytest.approx((10.0, 21.0, 0.0), abs=1e-9)
    # 1.5 mm off the slice plane along the normal: same slice, distance 1.5.
    idx, z, y, x, dist = project_point(target + 1.5 * stacks[2].normal, stacks)
    assert (idx, z) == (2, 3) and dist == pytest.approx(1.5)


def test_project_point_outside_every_footprint_reports_the_miss():
    stacks = cached(axial_stacks(), size=32)
    far = stacks[0].voxel_to_patient(0.0, 16.0, 31.5) + 30.0 * stacks[0].row_dir
    idx, _, _, x, dist = project_point(far, stacks)
    assert idx == 0 and x > 31.5
    assert dist == pytest.approx(30.0, abs=0.1)  # the in-plane miss, not the plane distance
    with pytest.raises(ValueError):
        project_point(far, [])


def test_sagittal_label_lands_on_the_same_anatomy_in_axial_series():
    """The brightest pixel of the sagittal series, mapped as a label, hits the axial blob."""
    sag_src = sagittal()
    i, y, x = np.unravel_index(np.argmax(sag_src.pixels), sag_src.pixels.shape)
    sag = cached([sag_src], size=48)[0]
    ax_src = axial_stacks()
    axials = cached(ax_src, size=48)
    p = sag.label_to_patient(int(sag_src.instance_numbers[i]), float(x), float(y))
    # Within half a slice gap and a pixel of the true blob centre.
    assert np.linalg.norm(p - BLOB) < 2.5
    idx, z, yc, xc, dist = map_label_point(sag, int(sag_src.instance_numbers[i]), x, y, axials)
    assert idx == 1  # the blob at height 12 mm lies in the middle stack
    assert dist < 2.0  # half the 4 mm axial slice gap
    # The projected voxel and the brightest axial voxel are the same anatomy: a few mm apart
    # (sagittal slices 3-4 mm apart, axial 4 mm apart, pixels ~0.9 mm).
    # (The uint8 volume saturates at its 99.5th percentile, so look for the peak in the source.)
    vol = ax_src[idx].pixels
    bz, by, bx = np.unravel_index(np.argmax(vol), vol.shape)
    mapped = axials[idx].voxel_to_patient(z, yc, xc)
    assert np.linalg.norm(dicom_patient(ax_src[idx], bz, bx, by) - mapped) < 4.0
    assert np.linalg.norm(mapped - p) == pytest.approx(dist, abs=1e-9)


def test_save_load_round_trip_is_exact(tmp_path: Path):
    cs = cached(axial_stacks(), size=32, series_id=5)[2]
    nbytes = save_stack(cs, tmp_path / "5_2.npz")
    assert nbytes == sum(p.stat().st_size for p in tmp_path.iterdir())
    # Geometry and raw volume; no temporary left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5_2.npy", "5_2.npz"]
    back = load_stack(tmp_path / "5_2.npz")
    assert isinstance(back.volume, np.memmap) and back.volume.dtype == np.uint8
    np.testing.assert_array_equal(back.volume, cs.volume)
    eager = load_stack(tmp_path / "5_2.npz", mmap=False)
    assert not isinstance(eager.volume, np.memmap)
    np.testing.assert_array_equal(eager.volume, cs.volume)
    np.testing.assert_array_equal(back.instance_numbers, cs.instance_numbers)
    for name in ("positions", "row_dir", "col_dir"):
        np.testing.assert_array_equal(getattr(back, name), getattr(cs, name))
    assert (back.spacing, back.orig_shape, back.series_id, back.stack, back.plane) == (
        cs.spacing, cs.orig_shape, 5, 2, "axial",
    )  # fmt: skip
    assert back.description == "test" and back.direction == cs.direction and back.has_geometry


def test_index_round_trip_types(tmp_path: Path):
    rows = [
        {"split": "train", "study_id": 2, "series_id": 9, "stack": 0, "description": "Axial T2",
         "plane": "axial", "n_slices": 5, "height": 32, "width": 32, "has_geometry": True,
         "spacing_row": 1.2, "status": "ok", "reason": "", "path": "train/2/9_0.npz"},
        {"split": "train", "study_id": 1, "series_id": 4, "stack": -1, "description": "NA",
         "status": "error", "reason": "series folder missing"},
    ]  # fmt: skip
    write_index(tmp_path, rows)
    df = read_index(tmp_path)
    assert list(df["study_id"]) == [1, 2]  # sorted
    assert df["n_slices"].dtype == np.int64 and df["stack"].tolist() == [-1, 0]
    assert df["has_geometry"].tolist() == [False, True]
    assert df.loc[0, "description"] == "NA"  # never turned into a missing value
    assert np.isnan(df.loc[0, "spacing_row"]) and df.loc[1, "spacing_row"] == 1.2
    assert df.equals(index_frame(rows))
    with pytest.raises(FileNotFoundError, match="spinegrade preprocess"):
        read_index(tmp_path / "nowhere")
