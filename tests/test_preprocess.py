"""`spinegrade preprocess`: the cache of a small RSNA-layout dataset written here with pydicom.

Covers the pixels (window, resize), the files and index, bad series, resume, an interrupted
(killed) run, the process pool, flat memory, the CLI, and that the DICOM files are never touched.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from typer.testing import CliRunner

from spinegrade.cli import app
from spinegrade.preprocessing.build import preprocess_dataset
from spinegrade.preprocessing.cache import INDEX_NAME, load_stack, project_point, read_index
from spinegrade.preprocessing.series import resize_volume, robust_range, to_uint8

SIZE = 32  # cached grid used in these tests (small: fast)


# ----------------------------------------------------------------------------- data


def write_slice(path: Path, pixels: np.ndarray, ipp, iop, spacing, instance: int, meta: dict):
    """One classic MR image file with the geometry tags the reader uses."""
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = MRImageStorage
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, fm.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = meta["study_uid"], meta["series_uid"]
    ds.SeriesDescription = meta["description"]
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    if ipp is not None:  # None: a file without patient geometry
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.PixelSpacing = [f"{v:.6f}" for v in spacing]
    ds.InstanceNumber = instance
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(folder: Path, kind: str, description: str, study_uid: str, shape=(40, 48)):
    """A sagittal stack ('sag', 6 slices) or an axial series of two tilted stacks ('ax', 2x3)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"study_uid": study_uid, "series_uid": generate_uid(), "description": description}
    rng = np.random.default_rng(abs(hash(folder.name)) % 2**32)
    h, w = shape
    ramp = np.add.outer(np.arange(h) * 7.0, np.arange(w) * 3.0)
    if kind == "sag":  # columns anterior->posterior, rows head->feet
        groups = [([0, 1, 0], [0, 0, -1], [[-10.0 + 4 * k, -20.0, 30.0] for k in range(6)])]
    else:  # one stack per disc, each tilted to its disc
        c, s = np.cos(np.deg2rad(10)), np.sin(np.deg2rad(10))
        groups = [
            ([1, 0, 0], [0, c, s], [[-15.0, -20.0, -10.0 + 4 * k] for k in range(3)]),
            ([1, 0, 0], [0, c, -s], [[-15.0, -20.0, 30.0 + 4 * k] for k in range(3)]),
        ]
    instance = 1
    for row, col, positions in groups:
        for ipp in positions:
            pix = ramp + rng.normal(0, 5, shape) + 200
            write_slice(folder / f"{instance}.dcm", pix, ipp, row + col, (0.8, 0.7), instance, meta)
            instance += 1


SERIES = (("Sagittal T1", "sag"), ("Sagittal T2/STIR", "sag"), ("Axial T2", "ax"))


def make_dataset(root: Path, n_studies: int = 2, split: str = "train", csv: bool = True, **kw):
    """RSNA layout: {split}_images/{study}/{series}/{instance}.dcm + the series CSV."""
    rows = []
    for s in range(n_studies):
        study_id = 1000 + s
        study_uid = generate_uid()
        for k, (desc, kind) in enumerate(SERIES):
            series_id = 10 * study_id + k
            write_series(
                root / f"{split}_images/{study_id}/{series_id}", kind, desc, study_uid, **kw
            )
            rows.append((study_id, series_id, desc))
    if csv:
        pd.DataFrame(rows, columns=["study_id", "series_id", "series_description"]).to_csv(
            root / f"{split}_series_descriptions.csv", index=False
        )
    return root


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run(data: Path, cache: Path, **kw):
    kw.setdefault("size", SIZE)
    return preprocess_dataset(data, cache, progress=False, **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


# ----------------------------------------------------------------------------- pixels


def test_window_ignores_hot_pixels_and_constant_images_give_zeros():
    vol = np.tile(np.linspace(100, 200, 64, dtype=np.float32), (4, 64, 1))
    vol[0, 0, 0] = 1e6  # one hot pixel must not squash the contrast of everything else
    lo, hi = robust_range([vol], 1.0, 99.5)
    assert 100 <= lo < 105 and 195 < hi <= 200
    u8 = to_uint8(vol, lo, hi)
    assert u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255
    assert np.median(u8) == pytest.approx(127, abs=3)
    assert not to_uint8(np.full((2, 8, 8), 7.0, np.float32), 7.0, 7.0).any()


def test_resize_keeps_the_pixel_centre_convention_and_antialiases():
    # A blob centred at original pixel (x=30, y=61) of a 100x120 image lands at
    # x' = (30 + 0.5) * 32 / 120 - 0.5 and y' = (61 + 0.5) * 32 / 100 - 0.5.
    yy, xx = np.mgrid[0:100, 0:120]
    blob = np.exp(-((xx - 30.0) ** 2 + (yy - 61.0) ** 2) / (2 * 6.0**2)).astype(np.float32)
    out = resize_volume(blob[None], 32)[0]
    assert out.shape == (32, 32)
    gy, gx = np.mgrid[0:32, 0:32]
    cx, cy = (out * gx).sum() / out.sum(), (out * gy).sum() / out.sum()
    assert cx == pytest.approx(30.5 * 32 / 120 - 0.5, abs=0.05)
    assert cy == pytest.approx(61.5 * 32 / 100 - 0.5, abs=0.05)
    # A one-pixel checkerboard has no structure at the coarse scale: antialiasing gives grey.
    checker = (np.indices((128, 128)).sum(0) % 2).astype(np.float32)[None]
    assert np.ptp(resize_volume(checker, 32)[0, 2:-2, 2:-2]) < 0.05


# ----------------------------------------------------------------------------- end to end


def test_cache_of_a_dataset_files_index_and_geometry(dataset: Path, tmp_path: Path):
    before = tree_hashes(dataset)
    summary = run(dataset, tmp_path / "cache")
    assert tree_hashes(dataset) == before  # the user's DICOM files are never modified
    assert (summary.n_processed, summary.n_resumed, summary.exit_code) == (2, 0, 0)
    assert summary.n_stacks == 8 and summary.n_slices == 2 * (6 + 6 + 6)
    assert not summary.failures

    index = read_index(tmp_path / "cache")
    assert len(index) == 8 and set(index["status"]) == {"ok"}
    ax = index[index["description"] == "Axial T2"]
    assert ax["stack"].tolist() == [0, 1, 0, 1] and set(ax["plane"]) == {"axial"}
    sag = index[index["description"] != "Axial T2"].iloc[0]
    # 32 x 33.6 mm (40 x 48 px at 0.8 x 0.7 mm): the longer side fits SIZE = 32 px at 1.05 mm,
    # the rows keep the aspect (32 mm / 1.05 -> 30 px).
    assert (sag.plane, sag.n_slices, sag.height, sag.width) == ("sagittal", 6, 30, SIZE)
    assert (sag.orig_rows, sag.orig_cols) == (40, 48)
    assert (sag.spacing_row, sag.spacing_col) == pytest.approx((0.8 * 40 / 30, 0.7 * 48 / SIZE))
    assert sag.slice_spacing == pytest.approx(4.0)

    for row in index.itertuples():
        cs = load_stack(tmp_path / "cache" / row.path)
        assert cs.volume.shape == (row.n_slices, row.height, row.width)
        assert max(row.height, row.width) == SIZE and cs.volume.dtype == np.uint8
        series = dataset / f"train_images/{row.study_id}/{row.series_id}"
        # Every cached slice maps back to its DICOM file's own geometry (pixel 0,0 and 10,5).
        for n in cs.instance_numbers:
            ds = pydicom.dcmread(series / f"{n}.dcm", stop_before_pixels=True)
            ipp = np.array(ds.ImagePositionPatient, float)
            r, c = (
                np.array(ds.ImageOrientationPatient[:3]),
                np.array(ds.ImageOrientationPatient[3:]),
            )
            np.testing.assert_allclose(cs.label_to_patient(n, 0, 0), ipp, atol=1e-4)
            expect = ipp + 10 * 0.7 * r + 5 * 0.8 * c
            np.testing.assert_allclose(cs.label_to_patient(n, 10, 5), expect, atol=1e-4)
        # Geometric order: positions increase along the normal.
        assert np.all(np.diff(cs.slice_positions) > 0)


def test_bad_and_missing_series_are_recorded_and_the_rest_goes_on(tmp_path: Path):
    data = make_dataset(tmp_path / "data", n_studies=2)
    bad = data / "train_images/1001/10012"  # the axial series of the second study: garbage
    for f in bad.iterdir():
        f.write_bytes(b"this is not a DICOM file" * 10)
    csv = data / "train_series_descriptions.csv"
    table = pd.read_csv(csv)
    extra = pd.DataFrame(
        [(1000, 55, "Axial T2"), (4242, 1, "Sagittal T1")], columns=table.columns
    )  # a listed series without folder, and a listed study without folder
    pd.concat([table, extra]).to_csv(csv, index=False)

    summary = run(data, tmp_path / "cache")
    assert summary.exit_code == 0 and summary.n_studies == 3
    failed = {(f["study_id"], f["series_id"]): f["reason"] for f in summary.failures}
    assert set(failed) == {(1001, 10012), (1000, 55), (4242, 1)}
    assert "no usable DICOM" in failed[(1001, 10012)]
    assert "series folder missing" in failed[(1000, 55)]
    index = read_index(tmp_path / "cache")
    assert (index["status"] == "error").sum() == 3
    assert (index["status"] == "ok").sum() == 4 + 2  # study 1000 intact, study 1001 sagittals
    errors = index[index["status"] == "error"]
    assert (errors["stack"] == -1).all() and (errors["path"] == "").all()


def test_nothing_processable_exits_nonzero(tmp_path: Path):
    data = make_dataset(tmp_path / "data", n_studies=1)
    for f in (data / "train_images").rglob("*.dcm"):
        f.write_bytes(b"\x00" * 50)
    summary = run(data, tmp_path / "cache")
    assert summary.exit_code == 1 and summary.n_stacks == 0 and len(summary.failures) == 3
    result = CliRunner().invoke(
        app, ["preprocess", str(data), "--cache", str(tmp_path / "c2"), "--no-progress"]
    )
    assert result.exit_code == 1 and "nothing could be processed" in result.output


def test_resume_skips_complete_studies_and_redoes_changed_ones(tmp_path: Path):
    data = make_dataset(tmp_path / "data", n_studies=3)
    cache = tmp_path / "cache"
    first = run(data, cache)
    index = read_index(cache)
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npz")}

    again = run(data, cache)
    assert (again.n_processed, again.n_resumed, again.n_slices) == (0, 3, 0)
    assert again.n_stacks == first.n_stacks
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.npz")} == stamps
    assert read_index(cache).equals(index)

    (cache / index.loc[0, "path"]).unlink()  # a lost stack file (study 1000)
    (data / "train_images/1002/10020/1.dcm").unlink()  # the DICOM data of study 1002 changed
    (cache / INDEX_NAME).unlink()  # and the index itself is gone
    third = run(data, cache)
    assert (third.n_processed, third.n_resumed) == (2, 1)
    rebuilt = read_index(cache)
    assert len(rebuilt) == len(index)  # rebuilt from the study records, complete
    assert rebuilt.loc[rebuilt["study_id"] == 1002, "n_slices"].tolist()[0] == 5

    assert run(data, cache, size=SIZE + 8).n_processed == 3  # other parameters: all redone


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from spinegrade.preprocessing import build, cache
    calls = {"n": 0}
    real = np.savez
    def savez_then_die(f, **arrays):
        calls["n"] += 1
        if calls["n"] == 6:  # mid-way through the second study, half a file written
            f.write(b"PK\\x03\\x04 half a zip")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real(f, **arrays)
    cache.np.savez = savez_then_die
    build.preprocess_dataset(sys.argv[1], sys.argv[2], size=32, progress=False)
    """
)


def test_killed_run_leaves_no_file_that_reads_as_complete(tmp_path: Path):
    data = make_dataset(tmp_path / "data", n_studies=3)
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(data), str(cache)], capture_output=True
    )
    assert proc.returncode == -9  # SIGKILL, mid-write
    # The first study is complete; the second has no record; nothing partial has a final name.
    assert (cache / "train/1000/study.json").is_file()
    assert not (cache / "train/1001/study.json").exists()
    leftovers = list(cache.rglob("*.tmp-*"))
    assert len(leftovers) == 1
    for p in cache.rglob("*.npz"):
        load_stack(p)  # every file under a final name is whole

    summary = run(data, cache)  # the resumed run finishes the job
    assert (summary.n_resumed, summary.n_processed) == (1, 2)
    assert not list(cache.rglob("*.tmp-*"))
    clean = tmp_path / "clean"
    run(data, clean)
    resumed_index, clean_index = read_index(cache), read_index(clean)
    assert resumed_index.equals(clean_index)
    for rel in clean_index["path"]:
        np.testing.assert_array_equal(
            load_stack(cache / rel).volume, load_stack(clean / rel).volume
        )


def test_two_workers_give_the_same_cache_as_one(dataset: Path, tmp_path: Path):
    run(dataset, tmp_path / "one", workers=1)
    summary = run(dataset, tmp_path / "two", workers=2)
    assert summary.n_processed == 2 and summary.exit_code == 0
    one, two = read_index(tmp_path / "one"), read_index(tmp_path / "two")
    assert one.equals(two)
    for rel in one["path"]:
        a, b = load_stack(tmp_path / "one" / rel), load_stack(tmp_path / "two" / rel)
        np.testing.assert_array_equal(a.volume, b.volume)
        np.testing.assert_array_equal(a.positions, b.positions)


def test_without_csv_every_series_folder_is_cached(tmp_path: Path):
    data = make_dataset(tmp_path / "data", n_studies=2, split="test", csv=False)
    (data / "test_images/notes").mkdir()  # not a study folder
    summary = run(data, tmp_path / "cache", split="test", limit=1)
    assert summary.n_studies == 1 and summary.n_stacks == 4
    assert any("not found" in n for n in summary.notes)
    index = read_index(tmp_path / "cache")
    assert set(index["split"]) == {"test"} and set(index["study_id"]) == {1000}
    # Descriptions come from the DICOM SeriesDescription when there is no CSV.
    assert sorted(set(index["description"])) == ["Axial T2", "Sagittal T1", "Sagittal T2/STIR"]


def test_series_without_geometry_is_cached_and_flagged(tmp_path: Path):
    data = make_dataset(tmp_path / "data", n_studies=1)
    folder = data / "train_images/1000/10000"
    meta = {"study_uid": "1.2.3", "series_uid": "1.2.3.4", "description": "Sagittal T1"}
    for n in range(1, 7):  # rewrite the first series without any geometry tags
        write_slice(folder / f"{n}.dcm", np.full((40, 48), 100.0 * n), None, None, None, n, meta)
    run(data, tmp_path / "cache")
    index = read_index(tmp_path / "cache").set_index("series_id")
    assert not index.loc[10000, "has_geometry"] and index.loc[10001, "has_geometry"]
    assert "no patient geometry" in index.loc[10000, "reason"]
    stack = load_stack(tmp_path / "cache" / index.loc[10000, "path"])
    assert not stack.has_geometry and stack.instance_numbers.tolist() == [1, 2, 3, 4, 5, 6]
    others = [load_stack(tmp_path / "cache" / p) for p in index["path"].iloc[1:]]
    with pytest.raises(ValueError, match="geometry"):
        project_point(others[0].voxel_to_patient(0, 0, 0), [stack])


def test_missing_image_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="train_images"):
        run(tmp_path, tmp_path / "cache")
    result = CliRunner().invoke(app, ["preprocess", str(tmp_path), "--cache", str(tmp_path / "c")])
    assert result.exit_code == 2 and "train_images" in result.output


def _peak_bytes(data: Path, cache: Path) -> int:
    tracemalloc.start()
    try:
        run(data, cache)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_number_of_studies(tmp_path: Path):
    small = make_dataset(tmp_path / "small", n_studies=1, shape=(128, 128))
    large = make_dataset(tmp_path / "large", n_studies=5, shape=(128, 128))
    run(small, tmp_path / "warm-up")  # first-use imports must not count as the small run's peak
    peak_small = _peak_bytes(small, tmp_path / "c1")
    peak_large = _peak_bytes(large, tmp_path / "c5")
    assert peak_small > 400_000  # one series' pixels dominate what is measured
    assert peak_large < 1.2 * peak_small


def test_cli_prints_the_summary(dataset: Path, tmp_path: Path):
    args = ["preprocess", str(dataset), "--cache", str(tmp_path / "c")]
    args += ["--set", "data.cache_size=24"]
    result = CliRunner().invoke(app, [*args, "--limit", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 cached" in result.output and "4 stacks ok" in result.output
    index = read_index(tmp_path / "c")
    assert index[["height", "width"]].max(axis=1).eq(24).all()
