"""The cache at real scale: native-mm grid, memory-mapped stacks, its manifest, the rsna phantom.

Stacks are built as the DICOM reader returns them, with dots at known patient points, so the
tests can check where a dot lands in a crop cut at the crop's own mm per pixel.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from spinegrade.cli import app
from spinegrade.config import CropConfig, load_config, save_config
from spinegrade.data.crops import CropView, extract_crop, make_crops
from spinegrade.io.geometry import direction_name, plane_name
from spinegrade.io.types import Stack
from spinegrade.localization.points import StudyPoints
from spinegrade.preprocessing.cache import MANIFEST_NAME, load_stack, read_manifest, save_stack
from spinegrade.preprocessing.guard import check_cache
from spinegrade.preprocessing.series import CacheParams, cache_series
from spinegrade.task import AX_T2, SAG_T1, SAG_T2
from stack_factory import write_world

L, P, H = np.eye(3)  # LPS: patient left, posterior, head
CENTRE = np.array([2.0, 10.0, -30.0])  # LPS mm


def dotted_stack(shape, spacing, dots, n_slices: int = 5, gap: float = 4.0) -> Stack:
    """A sagittal stack (columns posterior, rows to the feet) centred on CENTRE, with a small
    Gaussian dot (sd 0.8 mm) at every LPS point of ``dots`` on every slice (projected in-plane)."""
    h, w = shape
    dy, dx = spacing
    row, col = P, -H
    normal = np.cross(row, col)
    corner = CENTRE - (w - 1) / 2 * dx * row - (h - 1) / 2 * dy * col
    positions = corner + ((np.arange(n_slices) - (n_slices - 1) / 2) * gap)[:, None] * normal
    yy, xx = np.mgrid[0:h, 0:w]
    pix = []
    for p0 in positions:
        pts = p0 + (xx * dx)[..., None] * row + (yy * dy)[..., None] * col
        img = np.full((h, w), 50.0)
        for d in dots:
            rel = pts - d
            rel -= (rel @ normal)[..., None] * normal  # the dot is a rod across the slab
            img += 1000 * np.exp(-np.sum(rel**2, -1) / (2 * 0.8**2))
        pix.append(img)
    return Stack(
        pixels=np.asarray(pix, dtype=np.float32),
        positions=positions,
        row_dir=row,
        col_dir=col,
        pixel_spacing=(dy, dx),
        instance_numbers=np.arange(1, n_slices + 1, dtype=np.int64),
        files=[Path(f"{i}.dcm") for i in range(1, n_slices + 1)],
        plane=plane_name(normal),
        direction=direction_name(normal),
    )


@pytest.mark.parametrize(
    ("shape", "spacing", "params", "grid"),
    [
        ((512, 512), (0.5, 0.5), CacheParams(size=512, mm=0.6), (427, 427)),  # coarsened to 0.6
        ((640, 640), (0.47, 0.47), CacheParams(size=512, mm=0.6), (501, 501)),
        ((640, 640), (0.3, 0.3), CacheParams(size=256, mm=0.0), (256, 256)),  # longer side cap
        ((200, 180), (1.5, 1.5), CacheParams(size=512, mm=0.6), (200, 180)),  # never upsampled
        ((320, 256), (0.7, 0.7), CacheParams(size=256, mm=0.0), (256, 205)),  # aspect kept
    ],
)
def test_cache_grid_keeps_native_millimetres_within_the_caps(shape, spacing, params, grid):
    assert params.grid(shape, spacing) == grid


@pytest.mark.parametrize(("size", "field_mm"), [(64, 40.0), (32, 40.0), (48, 24.0)])
def test_crop_is_cut_at_its_own_mm_per_pixel(size: int, field_mm: float):
    # Native 0.4 mm (400 px = 160 mm), cached at 0.6 mm: the crop resamples the cache to
    # field_mm / size mm a pixel, so a dot 6 mm posterior of the centre is 6 / (mm a pixel)
    # columns right of the crop centre, and one 6 mm up is as many rows above it.
    target = CENTRE + 3.0 * P - 5.0 * H
    dots = [target, target + 6.0 * P, target + 6.0 * H]
    params = CacheParams(512, low_pct=1.0, high_pct=100.0, mm=0.6)  # window to the dots' peak
    cs = cache_series([dotted_stack((400, 400), (0.4, 0.4), dots)], params, 1, 7, SAG_T2)[0]
    assert cs.volume.shape[1:] == (267, 267) and cs.spacing == pytest.approx((160 / 267,) * 2)
    view = CropView(SAG_T2, field_mm, P, -H, L)
    crop = extract_crop(cs, target, view, size=size, n_slices=3)[1]
    labels, n = ndimage.label(crop > 0.5 * crop.max())
    assert n == 3
    found = ndimage.center_of_mass(crop, labels, range(1, n + 1))
    found = sorted(found, key=lambda rc: (round(rc[0]), round(rc[1])))
    c, step = (size - 1) / 2, 6.0 / (field_mm / size)
    expected = sorted([(c, c), (c, c + step), (c - step, c)])  # (row, col)
    np.testing.assert_allclose(found, expected, atol=0.35)


def _two_stack_study(tmp_path: Path) -> dict:
    """A sagittal T2 and an axial T2 stack, cached and saved; returns {description: [stack]}."""
    sag = cache_series([dotted_stack((300, 260), (0.5, 0.5), [CENTRE])], CacheParams(512, mm=0.6),
                       1, 7, SAG_T2)[0]  # fmt: skip
    rng = np.random.default_rng(0)
    sag.volume = rng.integers(0, 255, sag.volume.shape, dtype=np.uint8)  # texture: any
    save_stack(sag, tmp_path / "7_0.npz")  # resampling error shows
    ax = cache_series([dotted_stack((200, 200), (0.6, 0.6), [CENTRE + 5 * L])], CacheParams(256),
                      1, 8, AX_T2)[0]  # fmt: skip
    ax.volume = rng.integers(0, 255, ax.volume.shape, dtype=np.uint8)
    save_stack(ax, tmp_path / "8_0.npz")
    return {SAG_T2: [sag], AX_T2: [ax]}


def test_memory_mapped_stacks_give_the_same_crops_as_loaded_ones(tmp_path: Path):
    _two_stack_study(tmp_path)
    points = StudyPoints()
    for cond in ("spinal_canal_stenosis", "left_subarticular_stenosis"):
        for lv in ("l3_l4", "l4_l5"):
            points.set(cond, lv, CENTRE + (1.0 if lv == "l3_l4" else -2.0) * H)
    cfg = CropConfig(size=40, slices=3, spinal_mm=30.0, subarticular_mm=36.0)

    def crops(mmap: bool, seed: int | None) -> dict[str, np.ndarray]:
        stacks = {
            SAG_T2: [load_stack(tmp_path / "7_0.npz", mmap=mmap)],
            AX_T2: [load_stack(tmp_path / "8_0.npz", mmap=mmap)],
        }
        if mmap:
            assert all(isinstance(s[0].volume, np.memmap) for s in stacks.values())
            # A mapped stack pickles as its file name (a spawned worker maps the same pages).
            blob = pickle.dumps(stacks)
            assert len(blob) < 20_000
            stacks = pickle.loads(blob)
        rng = None if seed is None else np.random.default_rng(seed)
        return make_crops(stacks, points, cfg, rng=rng)

    for seed in (None, 3):
        loaded, mapped = crops(False, seed), crops(True, seed)
        assert sorted(loaded) == sorted(mapped) and len(loaded) == 4
        for key in loaded:
            assert loaded[key].std() > 0
            np.testing.assert_array_equal(mapped[key], loaded[key])


# ----------------------------------------------------------------------------- the manifest


def test_train_refuses_a_cache_made_with_other_settings(tmp_path: Path):
    from spinegrade.training.cv import cross_validate

    data, cache = write_world(tmp_path / "world", n_studies=2)
    quick = load_config("quick")
    check_cache(cache, quick.data)  # the world's cache is labelled as quick's: accepted
    assert read_manifest(cache)["settings"]["data.cache_size"] == quick.data.cache_size
    other = load_config("quick", ["data.cache_mm=0.6"])
    with pytest.raises(ValueError, match=r"data\.cache_mm: cache 0\.0, run 0\.6") as err:
        cross_validate(data, cache, tmp_path / "run", other, progress=False)
    assert "spinegrade preprocess" in str(err.value) and "data.cache_mm=0.6" in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    # The CLI says the same in one line, exit code 2.
    result = CliRunner().invoke(
        app, ["train", str(data), "--cache", str(cache), "--out", str(tmp_path / "run2"),
              "--config", "default", "model.pretrained=false", "localizer.pretrained=false"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "data.cache_size: cache 256, run 512" in result.output
    # A cache with no manifest (an older spinegrade) is refused too.
    (cache / MANIFEST_NAME).unlink()
    with pytest.raises(ValueError, match=r"manifest\.json not found"):
        cross_validate(data, cache, tmp_path / "run", quick, progress=False)


def test_predict_refuses_a_work_cache_made_with_other_settings(tmp_path: Path):
    from spinegrade.inference.predict import predict

    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("default"), run / "config.yaml")
    work = tmp_path / "work"
    work.mkdir()
    _, cache = write_world(tmp_path / "world", n_studies=1)  # labelled with quick's settings
    cache.rename(work / "cache")
    before = sorted(p.name for p in (work / "cache").rglob("*"))
    with pytest.raises(ValueError, match=r"data\.cache_size: cache 256, run 512") as err:
        predict(run, tmp_path / "input", tmp_path / "out.csv", cache_dir=work)
    assert "another --cache work folder" in str(err.value)
    assert sorted(p.name for p in (work / "cache").rglob("*")) == before  # left as it was


def test_preprocess_cli_takes_the_grid_from_the_config(tmp_path: Path):
    from test_preprocess import make_dataset

    data = make_dataset(tmp_path / "data", n_studies=1, shape=(64, 64))
    cache = tmp_path / "cache"
    args = ["preprocess", str(data), "--cache", str(cache), "--no-progress", "--config", "quick"]
    result = CliRunner().invoke(app, [*args, "--set", "data.cache_size=40"])
    assert result.exit_code == 0, result.output
    settings = read_manifest(cache)["settings"]
    assert settings["data.cache_size"] == 40 and settings["data.cache_mm"] == 0.0
    check_cache(cache, load_config("quick", ["data.cache_size=40"]).data)
    with pytest.raises(ValueError, match=r"data\.cache_size: cache 40, run 256"):
        check_cache(cache, load_config("quick").data)


# ----------------------------------------------------------------------------- rsna phantom


def test_rsna_profile_plans_real_series_sizes():
    from spinegrade.phantom.generate import study_ids
    from spinegrade.phantom.study import PROFILES, StudyTask, _plan_series, _Quirks, start_study

    cfg = PROFILES["rsna"]
    n_dup = n_long = 0
    blocks = set()
    for i in range(60):
        task = StudyTask(Path("."), "train", i, 5, int(study_ids(5, 60)[i]), np.zeros(25),
                         np.zeros(25, int), cfg)  # fmt: skip
        rng, anat = start_study(task)
        series = _plan_series(rng, anat, cfg, _Quirks(), task)
        sag = [s for s in series if s.plan.description in (SAG_T1, SAG_T2)]
        ax = [s for s in series if s.plan.description == AX_T2]
        n_dup += len(series) > 3
        for s in sag:
            assert 15 <= len(s.plan.slices) <= 20
            assert s.plan.slices[0].shape[0] in (384, 448, 512, 640)
        for s in ax:
            n = len(s.plan.slices)
            n_long += n > 100
            assert 20 <= n <= 60 or n > 100, n  # thin-sliced: one block past 100
            # Parallel blocks: slices of one block share a normal.
            normals = {tuple(np.round(sl.normal, 6)) for sl in s.plan.slices}
            assert 1 <= len(normals) <= 3
            blocks.add(len(normals))
            assert {sl.level for sl in s.plan.slices} == set(range(5))  # every level covered
    assert blocks == {1, 2, 3} and 1 <= n_dup <= 15 and n_long <= 10


def test_synth_rsna_profile_writes_the_planned_sizes(tmp_path: Path):
    out = tmp_path / "rsna"
    result = CliRunner().invoke(
        app, ["synth", str(out), "--studies", "1", "--test-studies", "0", "--profile", "rsna"]
    )
    assert result.exit_code == 0, result.output
    import pandas as pd

    series = pd.read_csv(out / "train_series_descriptions.csv")
    for st, se, desc in series.itertuples(index=False):
        files = sorted((out / f"train_images/{st}/{se}").glob("*.dcm"))
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        if desc == AX_T2:
            assert 20 <= len(files) <= 60 or len(files) > 100
        else:
            assert 15 <= len(files) <= 20 and ds.Rows in (384, 448, 512, 640)
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--profile", "huge"])
    assert bad.exit_code == 2 and "unknown phantom profile 'huge'" in bad.output
