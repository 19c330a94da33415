"""The DICOM series reader: geometry, stack splitting, decoding, robustness, and ``inspect``."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)
from typer.testing import CliRunner

from dicom_factory import (
    AXIAL,
    CORONAL,
    SAGITTAL,
    mr_dataset,
    save,
    shuffled_names,
    tilted_axial,
    write_enhanced,
    write_stack,
)
from spinegrade.cli import app
from spinegrade.io import DicomReadError, describe_series, read_series
from spinegrade.io.describe import compact_numbers
from spinegrade.io.geometry import cluster_orientations, direction_name, plane_name


def _stacked(truth: list[np.ndarray]) -> np.ndarray:
    return np.stack(truth).astype(np.float32)


# ----------------------------------------------------------------------------- ordering


def test_reversed_instance_numbers_follow_geometry(tmp_path: Path) -> None:
    # Sagittal slices numbered from the patient's left while the normal (-x) runs L->R.
    n = 12
    truth = write_stack(tmp_path, n, axes=SAGITTAL, instances=range(n, 0, -1), step=3.5)
    series = read_series(tmp_path)
    (stack,) = series.stacks
    np.testing.assert_array_equal(stack.pixels, _stacked(truth))
    assert stack.pixels.dtype == np.float32
    assert stack.instance_numbers.tolist() == list(range(n, 0, -1))
    assert [f.name for f in stack.files] == [f"{i}.dcm" for i in range(n, 0, -1)]
    assert (stack.plane, stack.direction) == ("sagittal", "L->R")
    assert np.all(np.diff(stack.slice_positions) > 0)
    assert stack.slice_spacing == pytest.approx(3.5, abs=1e-4)
    assert stack.pixel_spacing == pytest.approx((0.7, 0.7))
    assert stack.frame_indices.tolist() == [0] * n
    assert stack.has_geometry and series.skipped == []
    assert series.series_instance_uid == "1.2.3.4"


def test_shuffled_names_and_instance_numbers(tmp_path: Path) -> None:
    n = 9
    instances = np.random.default_rng(3).permutation(np.arange(100, 100 + n)).tolist()
    truth = write_stack(tmp_path, n, axes=CORONAL, instances=instances, names=shuffled_names(n))
    (stack,) = read_series(tmp_path).stacks
    np.testing.assert_array_equal(stack.pixels, _stacked(truth))
    assert stack.instance_numbers.tolist() == instances
    assert (stack.plane, stack.direction) == ("coronal", "A->P")


def test_no_slice_thickness_needed_and_wrong_one_ignored(tmp_path: Path) -> None:
    write_stack(tmp_path / "bare", 5, step=4.0)
    write_stack(tmp_path / "lying", 5, step=4.0, thickness=10.0, spacing_between=12.0)
    for name in ("bare", "lying"):
        ds = pydicom.dcmread(next((tmp_path / name).iterdir()))
        assert ("SliceThickness" in ds) is (name == "lying")
        (stack,) = read_series(tmp_path / name).stacks
        assert stack.slice_spacing == pytest.approx(4.0, abs=1e-4)


# ----------------------------------------------------------------------------- splitting


def test_missing_slice_keeps_one_stack(tmp_path: Path) -> None:
    truth = write_stack(tmp_path, 8, step=4.0, skip=[4])
    (stack,) = read_series(tmp_path).stacks
    np.testing.assert_array_equal(stack.pixels, _stacked(truth))
    gaps = np.diff(stack.slice_positions)
    assert gaps == pytest.approx([4, 4, 4, 8, 4, 4], abs=1e-4)


def test_large_gap_splits_parallel_stacks(tmp_path: Path) -> None:
    # Two parallel axial blocks 40 mm apart (10x the spacing), e.g. one per disc at the same tilt.
    top = write_stack(tmp_path, 4, origin=(-80, -90, 40), instances=[1, 2, 3, 4])
    low = write_stack(tmp_path, 4, origin=(-80, -90, -20), instances=[5, 6, 7, 8])
    stacks = read_series(tmp_path).stacks
    assert [st.shape[0] for st in stacks] == [4, 4]
    np.testing.assert_array_equal(stacks[0].pixels, _stacked(top))
    np.testing.assert_array_equal(stacks[1].pixels, _stacked(low))


@pytest.mark.parametrize("tilts", [(0.0, 15.0), (-12.0, 0.0, 10.0)])
def test_angled_stacks_are_separated(tmp_path: Path, tilts: tuple[float, ...]) -> None:
    # One stack per disc, each tilted differently, all in one folder with meaningless names.
    n, truths = 5, []
    names = shuffled_names(n * len(tilts), seed=5)
    for j, tilt in enumerate(tilts):
        truths.append(
            write_stack(
                tmp_path,
                n,
                axes=tilted_axial(tilt),
                origin=(-80, -90, 60 - 35 * j),
                instances=range(1 + n * j, 1 + n * (j + 1)),
                names=names[n * j : n * (j + 1)],
                rng=np.random.default_rng(j),
            )
        )
    stacks = read_series(tmp_path).stacks
    assert len(stacks) == len(tilts)
    for stack, truth, tilt in zip(stacks, truths, tilts, strict=True):
        np.testing.assert_array_equal(stack.pixels, _stacked(truth))
        np.testing.assert_allclose(stack.col_dir, tilted_axial(tilt)[1], atol=1e-5)
        assert (stack.plane, stack.direction) == ("axial", "F->H")
        assert stack.slice_spacing == pytest.approx(4.0, abs=1e-4)


def test_repeated_positions_make_two_stacks(tmp_path: Path) -> None:
    # The same block acquired twice (a repeat after motion): same positions, later numbers.
    first = write_stack(tmp_path, 6, instances=range(1, 7), names=[f"a{k}" for k in range(6)])
    again = write_stack(
        tmp_path,
        6,
        instances=range(7, 13),
        names=[f"b{k}" for k in range(6)],
        rng=np.random.default_rng(9),
    )
    stacks = read_series(tmp_path).stacks
    assert [st.instance_numbers.tolist() for st in stacks] == [
        list(range(1, 7)),
        list(range(7, 13)),
    ]
    np.testing.assert_array_equal(stacks[0].pixels, _stacked(first))
    np.testing.assert_array_equal(stacks[1].pixels, _stacked(again))


def test_mixed_shapes_keep_majority(tmp_path: Path) -> None:
    truth = write_stack(tmp_path, 7, shape=(24, 20), skip=[2, 5])
    write_stack(tmp_path, 7, shape=(32, 32), skip=[0, 1, 3, 4, 6], instances=range(11, 18))
    series = read_series(tmp_path)
    (stack,) = series.stacks
    np.testing.assert_array_equal(stack.pixels, _stacked(truth))
    assert sorted(sk.path.name for sk in series.skipped) == ["13.dcm", "16.dcm"]
    assert all("shape 32x32 differs from the 24x20" in sk.reason for sk in series.skipped)


# ----------------------------------------------------------------------------- pixel values


def test_rescale_slope_intercept(tmp_path: Path) -> None:
    truth = write_stack(tmp_path / "same", 4, slope=2.5, intercept=-100.0)
    (stack,) = read_series(tmp_path / "same").stacks
    np.testing.assert_allclose(stack.pixels, _stacked(truth) * 2.5 - 100, rtol=1e-6)
    # Per-slice rescale (some scanners scale every slice differently): each slice its own.
    for k, slope in enumerate([1.0, 3.0, 0.5]):
        pixels = np.full((8, 8), 100, np.uint16)
        save(
            mr_dataset(pixels, position=(0, 0, 5 * k), row=AXIAL[0], col=AXIAL[1], slope=slope),
            tmp_path / "each" / f"{k}.dcm",
        )
    (stack,) = read_series(tmp_path / "each").stacks
    assert stack.pixels[:, 0, 0].tolist() == [100.0, 300.0, 50.0]


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    truth = write_stack(tmp_path / "u12", 3, photometric="MONOCHROME1")
    (stack,) = read_series(tmp_path / "u12").stacks
    np.testing.assert_array_equal(stack.pixels, 4095 - _stacked(truth))  # 12 bits stored
    signed = np.array([[-5, 0, 7]], dtype=np.int16)
    ds = mr_dataset(
        signed, position=(0, 0, 0), row=AXIAL[0], col=AXIAL[1], photometric="MONOCHROME1"
    )
    save(ds, tmp_path / "s16" / "1.dcm")
    (stack,) = read_series(tmp_path / "s16").stacks
    assert stack.pixels[0, 0].tolist() == [4.0, -1.0, -8.0]  # -1 - v maps [-2048, 2047] onto itself


@pytest.mark.parametrize(
    ("stored", "signed", "expected"),
    [
        # 12-bit unsigned with junk in the 4 unused high bits (overlay bits in old files).
        ([0xF000 | 5, 0x1000 | 4095, 7], False, [5, 4095, 7]),
        # 12-bit signed written without sign extension: 0x0FFB is -5, 0x0800 is -2048.
        ([0x0FFB, 0x0800, 0x07FF], True, [-5, -2048, 2047]),
    ],
)
def test_unused_high_bits_are_ignored_like_pydicom(
    tmp_path: Path, stored: list[int], signed: bool, expected: list[int]
) -> None:
    dtype = np.int16 if signed else np.uint16
    ds = mr_dataset(np.zeros((1, 3), dtype), position=(0, 0, 0), row=AXIAL[0], col=AXIAL[1])
    ds.PixelData = np.array(stored, dtype=np.uint16).tobytes()
    save(ds, tmp_path / "1.dcm")
    (stack,) = read_series(tmp_path).stacks
    assert stack.pixels[0, 0].tolist() == expected
    reference = pydicom.dcmread(tmp_path / "1.dcm").pixel_array  # pydicom's own correction
    assert reference[0].tolist() == expected


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_compression_roundtrip(tmp_path: Path, syntax: str) -> None:
    # 64x48: the JPEG 2000 encoder needs tiles larger than its default 6 resolution levels.
    truth = write_stack(
        tmp_path, 5, transfer_syntax=syntax, instances=[5, 4, 3, 2, 1], shape=(64, 48)
    )
    assert pydicom.dcmread(tmp_path / "1.dcm").file_meta.TransferSyntaxUID == syntax
    (stack,) = read_series(tmp_path).stacks
    np.testing.assert_array_equal(stack.pixels, _stacked(truth))


def test_jpeg_baseline_decodes_close_to_source(tmp_path: Path) -> None:
    # Smooth images (JPEG is lossy on noise); the encoder is Pillow, the decoder pylibjpeg.
    yy, xx = np.mgrid[0:32, 0:32]
    sources = [(60 + 3 * xx + 2 * yy + 10 * k).astype(np.uint8) for k in range(3)]
    for k, src in enumerate(sources):
        ds = mr_dataset(src, position=(0, 0, 4 * k), row=AXIAL[0], col=AXIAL[1], instance=k + 1)
        save(ds, tmp_path / f"{k}.dcm", JPEGBaseline8Bit)
    (stack,) = read_series(tmp_path).stacks
    assert np.abs(stack.pixels - _stacked(sources)).mean() < 2.0


def test_enhanced_multiframe_geometry_from_functional_groups(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 4096, size=(6, 16, 12)).astype(np.uint16)
    order = np.array([3, 0, 5, 1, 4, 2])  # frame k lies at geometric place order[k]
    normal = np.cross(*SAGITTAL)
    positions = np.array([(10.0, -50.0, 30.0)]) + np.outer(order * 3.0, normal)
    slopes = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0]
    write_enhanced(tmp_path / "emr.dcm", frames, positions, slopes=slopes)
    (stack,) = read_series(tmp_path).stacks
    by_place = np.argsort(order)
    assert stack.frame_indices.tolist() == by_place.tolist()
    expected = frames[by_place].astype(np.float32) * np.array(slopes)[by_place, None, None]
    np.testing.assert_array_equal(stack.pixels, expected)
    assert stack.pixel_spacing == pytest.approx((0.8, 0.8))
    assert (stack.plane, stack.direction, stack.slice_spacing) == ("sagittal", "L->R", 3.0)
    assert stack.files == [tmp_path / "emr.dcm"] * 6


# ----------------------------------------------------------------------------- robustness


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")  # pydicom, on 8.dcm
def test_corrupt_and_truncated_files_are_skipped_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    truth = write_stack(tmp_path, 6)
    data = (tmp_path / "6.dcm").read_bytes()
    (tmp_path / "7.dcm").write_bytes(data[: len(data) // 2])  # cut inside the pixel data
    (tmp_path / "8.dcm").write_bytes(data[:132] + b"\xff" * 300)  # DICM marker, garbage after
    with caplog.at_level(logging.WARNING, logger="spinegrade.io"):
        series = read_series(tmp_path)
    (stack,) = series.stacks
    np.testing.assert_array_equal(stack.pixels, _stacked(truth))
    reasons = {sk.path.name: sk.reason for sk in series.skipped}
    assert set(reasons) == {"7.dcm", "8.dcm"}
    # Each says what is wrong and what to do.
    # How many bytes survive the cut depends on the header's length (its generated UIDs vary).
    held = re.match(r"pixel data holds (\d+) bytes but Rows 24 x Columns 20", reasons["7.dcm"])
    assert held is not None and 0 < int(held[1]) < 24 * 20 * 2, reasons["7.dcm"]
    assert reasons["8.dcm"].startswith("damaged: no readable data set after the DICOM header")
    assert all("copy it again" in r for r in reasons.values())
    logged = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "7.dcm" in logged and "8.dcm" in logged


def test_non_dicom_files_are_ignored_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    truth = write_stack(tmp_path, 3)
    (tmp_path / "notes.txt").write_text("radiologist notes")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(200))
    (tmp_path / "nested").mkdir()
    report = Dataset()
    report.SOPClassUID, report.SOPInstanceUID = BasicTextSRStorage, "1.2.3.9"
    report.file_meta = FileMetaDataset()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with caplog.at_level(logging.INFO, logger="spinegrade.io"):
        series = read_series(tmp_path)
    np.testing.assert_array_equal(series.stacks[0].pixels, _stacked(truth))
    reasons = {sk.path.name: sk.reason for sk in series.skipped}
    assert reasons["notes.txt"].startswith("not a DICOM file")
    assert reasons[".DS_Store"].startswith("not a DICOM file")
    assert reasons["nested"].startswith("sub-folder ignored")
    assert reasons["report.dcm"] == "DICOM without pixel data (Basic Text SR Storage); ignored"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_file_without_geometry_in_located_series_is_skipped(tmp_path: Path) -> None:
    write_stack(tmp_path, 4)
    lost = mr_dataset(np.zeros((24, 20), np.uint16), position=None, row=None, col=None)
    save(lost, tmp_path / "lost.dcm")
    # A zeroed orientation (seen in broken exports) has no normal: refused, saying so.
    broken = mr_dataset(
        np.zeros((24, 20), np.uint16), position=(0, 0, 0), row=(0, 0, 0), col=(0, 1, 0)
    )
    save(broken, tmp_path / "zero_iop.dcm")
    series = read_series(tmp_path)
    assert series.stacks[0].shape == (4, 24, 20)
    reasons = {sk.path.name: sk.reason for sk in series.skipped}
    assert sorted(reasons) == ["lost.dcm", "zero_iop.dcm"]
    assert reasons["lost.dcm"].startswith("no patient geometry")
    assert reasons["zero_iop.dcm"].startswith(
        "ImageOrientationPatient (0, 0, 0, 0, 1, 0) is not two perpendicular directions"
    )


def test_file_without_preamble_or_meta_is_read(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    reference = ds.pixel_array.astype(np.float32)
    ds.preamble = None
    del ds.file_meta
    ds.save_as(tmp_path / "raw", implicit_vr=True, little_endian=True)
    assert (tmp_path / "raw").read_bytes()[:2] == b"\x08\x00"
    (stack,) = read_series(tmp_path).stacks
    np.testing.assert_array_equal(stack.pixels[0], reference)


def test_nothing_usable_raises_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.dcm").write_bytes(bytes(128) + b"DICM" + b"\x01" * 50)
    with pytest.raises(DicomReadError, match=r"no usable DICOM image among 2 entries") as err:
        read_series(tmp_path)
    # The folder, each file with what is wrong with it, and what to do about the damaged one.
    assert str(tmp_path) in str(err.value) and "a.txt: not a DICOM file" in str(err.value)
    assert "b.dcm: damaged" in str(err.value) and "copy it again" in str(err.value)
    assert isinstance(err.value, ValueError)
    (tmp_path / "b.dcm").unlink()  # nothing but junk: was this a series folder at all?
    with pytest.raises(DicomReadError, match="one series folder of DICOM files"):
        read_series(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomReadError, match="folder is empty"):
        read_series(tmp_path / "empty")
    with pytest.raises(DicomReadError, match="not a folder"):
        read_series(tmp_path / "missing")
    write_stack(tmp_path / "two", 2)
    with pytest.raises(DicomReadError, match="only 2 usable slice"):
        read_series(tmp_path / "two", min_slices=3)


# ----------------------------------------------------------------------------- real files


def _testfile(name: str) -> Path:
    path = get_testdata_file(name)  # the singular form never touches the network
    if path is None:
        pytest.skip(f"{name} not installed (pydicom-data)")
    return Path(path)


def _read_one(tmp_path: Path, name: str) -> list:
    folder = tmp_path / name.replace(".", "_")
    folder.mkdir()
    shutil.copy(_testfile(name), folder / name)
    return read_series(folder).stacks


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_expb.dcm",
        pytest.param(  # pydicom warns about (and drops) the excess padding
            "MR_small_padded.dcm", marks=pytest.mark.filterwarnings("ignore:The pixel data is")
        ),
    ],
)
def test_pydicom_mr_small_variants_match_uncompressed(tmp_path: Path, name: str) -> None:
    (ref,) = _read_one(tmp_path, "MR_small.dcm")
    (stack,) = _read_one(tmp_path, name)
    np.testing.assert_array_equal(stack.pixels, ref.pixels)
    np.testing.assert_allclose(stack.positions, [[-83.9063, -91.2, 6.6406]])
    assert (stack.plane, stack.pixel_spacing) == ("axial", (0.3125, 0.3125))


@pytest.mark.parametrize(
    "name",
    [
        "emri_small_RLE.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "emri_small_big_endian.dcm",
    ],
)
def test_enhanced_mr_variants_match_uncompressed(tmp_path: Path, name: str) -> None:
    # These enhanced MR files carry no plane geometry: frames stay in file order, flagged.
    (ref,) = _read_one(tmp_path, "emri_small.dcm")
    (stack,) = _read_one(tmp_path, name)
    assert stack.shape == (10, 64, 64) and not stack.has_geometry
    assert stack.frame_indices.tolist() == list(range(10))
    np.testing.assert_array_equal(stack.pixels, ref.pixels)
    raw = pydicom.dcmread(_testfile("emri_small.dcm")).pixel_array
    np.testing.assert_array_equal(ref.pixels, raw.astype(np.float32))


def test_j2k_mr_matches_uncompressed_with_rescale(tmp_path: Path) -> None:
    (ref,) = _read_one(tmp_path, "MR2_UNCR.dcm")
    (lossless,) = _read_one(tmp_path, "MR2_J2KR.dcm")
    (lossy,) = _read_one(tmp_path, "MR2_J2KI.dcm")
    np.testing.assert_array_equal(lossless.pixels, ref.pixels)
    raw = pydicom.dcmread(_testfile("MR2_UNCR.dcm")).pixel_array.astype(np.float32)
    np.testing.assert_allclose(ref.pixels[0], raw * 3.774114 + 0.000061, rtol=1e-5)
    assert np.abs(lossy.pixels - ref.pixels).mean() < 0.05 * ref.pixels.std()
    assert ref.plane == "sagittal"


def test_enhanced_ct_functional_groups_order_and_rescale(tmp_path: Path) -> None:
    # A real enhanced file: per-frame positions z=-159 then -149; normal (0,0,-1) runs H->F.
    (stack,) = _read_one(tmp_path, "eCT_Supplemental.dcm")
    raw = pydicom.dcmread(_testfile("eCT_Supplemental.dcm")).pixel_array.astype(np.float32)
    assert stack.frame_indices.tolist() == [1, 0]
    assert stack.positions[:, 2].tolist() == [-149.0, -159.0]
    assert (stack.plane, stack.direction, stack.slice_spacing) == ("axial", "H->F", 10.0)
    np.testing.assert_array_equal(stack.pixels, raw[[1, 0]] - 1024.0)
    assert stack.pixel_spacing == pytest.approx((0.388672, 0.388672))


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "JPGExtended.dcm"])
def test_jpeg_lossless_and_extended_decode(tmp_path: Path, name: str) -> None:
    # Nuclear-medicine files without geometry: they exercise the JPEG decoders only.
    (stack,) = _read_one(tmp_path, name)
    raw = pydicom.dcmread(_testfile(name)).pixel_array.astype(np.float32)
    np.testing.assert_array_equal(stack.pixels[0], raw)
    assert raw.max() > 0


def test_truncated_real_file_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.copy(_testfile("MR_small.dcm"), tmp_path / "good.dcm")
    shutil.copy(_testfile("MR_truncated.dcm"), tmp_path / "cut.dcm")
    with caplog.at_level(logging.WARNING, logger="spinegrade.io"):
        series = read_series(tmp_path)
    assert series.stacks[0].files == [tmp_path / "good.dcm"]
    assert [sk.path.name for sk in series.skipped] == ["cut.dcm"]
    assert "cut.dcm" in caplog.text


# ----------------------------------------------------------------------------- small pieces


@pytest.mark.parametrize(
    ("normal", "plane", "direction"),
    [
        ((1, 0, 0), "sagittal", "R->L"),
        ((-0.99, 0.1, 0), "sagittal", "L->R"),
        ((0, 1, 0.2), "coronal", "A->P"),
        ((0, -1, 0), "coronal", "P->A"),
        ((0, 0.3, 0.95), "axial", "F->H"),
        ((0.1, 0, -1), "axial", "H->F"),
    ],
)
def test_plane_and_direction_names(normal: tuple, plane: str, direction: str) -> None:
    n = np.array(normal, dtype=float)
    assert (plane_name(n), direction_name(n)) == (plane, direction)


def test_cluster_orientations_tolerance() -> None:
    axes = [tilted_axial(t) for t in (0.0, 0.3, 8.0, 0.0, 8.5)]
    rows = np.array([a[0] for a in axes])
    cols = np.array([a[1] for a in axes])
    assert cluster_orientations(rows, cols, tol_deg=1.0).tolist() == [0, 0, 1, 0, 1]


@pytest.mark.parametrize(
    ("values", "text"),
    [
        ([1, 2, 3, 5, 7, 8, 12, 11, 10], "1-3, 5, 7-8, 12-10"),
        ([4, 4, 4], "4 (x3)"),
        ([2, 4, 6], "2, 4, 6"),
        ([], ""),
    ],
)
def test_compact_numbers(values: list[int], text: str) -> None:
    assert compact_numbers(values) == text


# ----------------------------------------------------------------------------- describe / CLI


def _study(tmp_path: Path) -> Path:
    study = tmp_path / "study"
    write_stack(
        study / "10", 6, axes=SAGITTAL, instances=range(6, 0, -1), description="Sagittal T1"
    )
    for j, tilt in enumerate((-10.0, 12.0)):
        write_stack(
            study / "20",
            3,
            axes=tilted_axial(tilt),
            origin=(-80, -90, 40 - 40 * j),
            instances=range(1 + 3 * j, 4 + 3 * j),
        )
    (study / "20" / "junk.bin").write_bytes(b"not dicom")
    return study


def test_describe_series_is_json_able(tmp_path: Path) -> None:
    info = describe_series(read_series(_study(tmp_path) / "20"))
    assert json.loads(json.dumps(info)) == info
    assert [st["instance_numbers"] for st in info["stacks"]] == [[1, 2, 3], [4, 5, 6]]
    assert [st["frame_indices"] for st in info["stacks"]] == [[0, 0, 0], [0, 0, 0]]
    assert [st["tilt_deg"] for st in info["stacks"]] == [10.0, 12.0]
    assert info["stacks"][0]["spacing_mm"] == [0.7, 0.7, 4.0]
    assert info["skipped"] == [
        {"file": "junk.bin", "reason": "not a DICOM file (no 'DICM' marker); ignored"}
    ]


def test_inspect_cli_json(tmp_path: Path) -> None:
    study = _study(tmp_path)
    (study / "30").mkdir()
    (study / "30" / "x.txt").write_text("nothing here")
    (study / ".DS_Store").write_bytes(b"Bud1")  # Finder litter does not make it a series
    result = CliRunner().invoke(app, ["inspect", str(study), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "study"
    sag, axial, empty = report["series"]
    (stack,) = sag["stacks"]
    assert (stack["plane"], stack["direction"], stack["slices"]) == ("sagittal", "L->R", 6)
    assert stack["instance_numbers"] == [6, 5, 4, 3, 2, 1]
    assert stack["instance_order"] == "descending"
    assert [st["slices"] for st in axial["stacks"]] == [3, 3]
    assert "no usable DICOM image" in empty["error"]


def test_inspect_json_lists_numbers_in_geometric_order(tmp_path: Path) -> None:
    # Programs index slices with these lists, so they are exact integers in slice order along the
    # normal, whatever order the scanner numbered them in; only the table shows compact text.
    study = tmp_path / "study"
    # Series 20: two disc blocks at different tilts; the upper one numbered out of order, the
    # lower one counting down against the normal (F->H).
    write_stack(
        study / "20", 3, axes=tilted_axial(-10.0), origin=(-80, -90, 40), instances=[3, 1, 2]
    )
    write_stack(
        study / "20", 6, axes=tilted_axial(12.0), origin=(-80, -90, 0), instances=range(10, 4, -1)
    )
    # Series 30: one enhanced multi-frame file whose frames are stored out of slice order.
    order = np.array([2, 0, 3, 1])  # frame k lies at geometric place order[k]
    frames = np.random.default_rng(2).integers(0, 4096, size=(4, 16, 12)).astype(np.uint16)
    positions = np.array([(10.0, -50.0, 30.0)]) + np.outer(order * 3.0, np.cross(*SAGITTAL))
    (study / "30").mkdir()
    write_enhanced(study / "30" / "emr.dcm", frames, positions)

    result = CliRunner().invoke(app, ["inspect", str(study), "--json"])
    assert result.exit_code == 0, result.output
    axial, enhanced = json.loads(result.stdout)["series"]
    upper, lower = axial["stacks"]
    assert (upper["instance_numbers"], upper["instance_order"]) == ([3, 1, 2], "mixed")
    assert (lower["instance_numbers"], lower["instance_order"]) == (
        [10, 9, 8, 7, 6, 5],
        "descending",
    )
    assert upper["frame_indices"] == [0, 0, 0] and not upper["multi_frame"]
    (stack,) = enhanced["stacks"]
    assert stack["multi_frame"] and stack["instance_numbers"] == [7, 7, 7, 7]
    assert stack["frame_indices"] == [1, 3, 0, 2]  # np.argsort(order): frames by place

    table = CliRunner().invoke(app, ["inspect", str(study)], env={"COLUMNS": "200"}).stdout
    for text in ("3, 1-2 (mixed)", "10-5 (descending)", "7 (x4) (constant), frames 1, 3, 0, 2"):
        assert text in table


def test_inspect_cli_human(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(_study(tmp_path) / "20")])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("series 20", "axial", "F->H", "1-3 (ascending)", "4-6", "junk.bin"):
        assert text in out


def test_inspect_cli_fails_when_nothing_readable(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("x")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2
    assert "no usable DICOM image" in " ".join(result.stdout.split())  # rich wraps lines
    missing = CliRunner().invoke(app, ["inspect", str(tmp_path / "nope"), "--json"])
    assert missing.exit_code == 2 and "not a folder" in missing.output
