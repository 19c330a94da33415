"""A corpus of hostile inputs, written by the tests (and the fuzz bench) themselves.

What hospitals send is messier than any dataset: exports with DICOMDIRs and stray files, broken
transfers, colour screenshots, enhanced multi-frame MR, huge matrices, headers with zero or missing
spacing. Each :class:`Kind` writes one such input as a study of its own, in one series folder
(``test_images/<study>/<series>/``, so `spinegrade preprocess` can read the same tree that
`inspect` and `predict` read), and says what every tool must make of it:

- ``graded``: read as an image series (perhaps with a note, e.g. no geometry);
- ``refused``: the culprit file (or the whole series) is left out with a message that names it
  and says what to do, matching ``expect``;
- ``ignored``: not an MR image at all (junk, a DICOMDIR); named in a skipped-files line.

Geometry is DICOM LPS millimetres, as in :mod:`dicom_factory`.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    MediaStorageDirectoryStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicom_factory import AXIAL, SAGITTAL, mr_dataset, write_enhanced

SHAPE = (32, 32)  # small slices: the corpus is about the headers and bytes, not the pixels
STEP = 4.0  # mm between slices along the normal
ORIGIN = np.array([-20.0, -60.0, 60.0])

Writer = Callable[[Path, str], None]


@dataclass(frozen=True)
class Kind:
    """One kind of hostile input and what every tool must make of it."""

    name: str
    what: str  # one line, for the tables in BENCHMARKS.md and the test ids
    outcome: str  # "graded" | "refused" | "ignored"
    culprit: str  # the file (or, "" for the series folder itself) a message must name
    expect: str  # regular expression the message about the culprit must match ("" for graded)
    write: Writer
    big: bool = False  # writes tens of MB or thousands of files (memory checks use these)
    # What `predict` (which groups files by their UIDs, not by folder) must say, where it
    # differs from the reader's tools: "" when it has nothing to say (e.g. two studies in one
    # folder are two studies to it).
    expect_predict: str | None = None
    alone: bool = False  # the culprit is all the series folder holds

    @property
    def predict_expect(self) -> str:
        return self.expect if self.expect_predict is None else self.expect_predict

    @property
    def series_refused(self) -> bool:
        """The reader's tools refuse the whole series folder (not one file of it)."""
        return (self.outcome == "refused" and not self.culprit) or self.alone


def uid(*parts: object) -> str:
    """A deterministic UID for the corpus (same kind, same UIDs)."""
    return generate_uid(entropy_srcs=["spinegrade-hostile", *map(str, parts)])


def slice_dataset(
    study_uid: str,
    series_uid: str,
    k: int,
    *,
    shape: tuple[int, int] = SHAPE,
    axes: tuple[np.ndarray, np.ndarray] = SAGITTAL,
    description: str = "SAG T2 TSE",
    rng: np.random.Generator | None = None,
    dtype: type = np.uint16,
) -> FileDataset:
    """Slice ``k`` of a small, valid sagittal (by default) T2 series of its own study."""
    rng = rng or np.random.default_rng(k)
    normal = np.cross(*axes)
    pixels = rng.integers(0, 1000, size=shape).astype(dtype)
    ds = mr_dataset(
        pixels,
        position=ORIGIN + k * STEP * normal,
        row=axes[0],
        col=axes[1],
        instance=k + 1,
        series_uid=series_uid,
        description=description,
    )
    ds.StudyInstanceUID = study_uid
    ds.PatientName, ds.PatientID = "HOSTILE^CASE", "HOSTILE-0001"
    ds.RepetitionTime, ds.EchoTime = 3500.0, 100.0
    return ds


def write_series(
    folder: Path,
    study_uid: str,
    n: int = 5,
    mutate: Callable[[FileDataset, int], None] | None = None,
    syntax: str | None = None,
    **kwargs,
) -> list[Path]:
    """``n`` slices named ``{k+1}.dcm``; ``mutate(ds, k)`` edits a slice before it is saved."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = uid(study_uid, folder.name, "series")
    paths = []
    for k in range(n):
        ds = slice_dataset(study_uid, series_uid, k, **kwargs)
        if mutate is not None:
            mutate(ds, k)
        if syntax == RLELossless:
            ds.compress(RLELossless, generate_instance_uid=False)
        elif syntax is not None:
            ds.file_meta.TransferSyntaxUID = syntax
        path = folder / f"{k + 1}.dcm"
        ds.save_as(path, enforce_file_format=syntax is None or syntax == RLELossless)
        paths.append(path)
    return paths


def _on(k0: int, fn: Callable[[FileDataset], None]) -> Callable[[FileDataset, int], None]:
    """A mutation applied to slice ``k0`` only."""

    def mutate(ds: FileDataset, k: int) -> None:
        if k == k0:
            fn(ds)

    return mutate


def _all(fn: Callable[[FileDataset], None]) -> Callable[[FileDataset, int], None]:
    return lambda ds, k: fn(ds)


def _set(**values: object) -> Callable[[FileDataset], None]:
    def fn(ds: FileDataset) -> None:
        for key, value in values.items():
            setattr(ds, key, value)

    return fn


def _delete(*keywords: str) -> Callable[[FileDataset], None]:
    def fn(ds: FileDataset) -> None:
        for key in keywords:
            if key in ds:
                delattr(ds, key)

    return fn


def _patch(path: Path, old: str, new: str) -> None:
    """Replace the text ``old`` in a saved file by ``new``, padded to the same length: values
    pydicom refuses to write (``NaN``, ``abc`` in a DS element) go in as a sender wrote them."""
    assert len(new) <= len(old)
    data = path.read_bytes()
    assert data.count(old.encode()) == 1, (path, old)
    path.write_bytes(data.replace(old.encode(), new.ljust(len(old)).encode()))


# ------------------------------------------------------------------------- pixel data


def _truncated(folder: Path, study: str) -> None:
    paths = write_series(folder, study)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 700])  # cut inside the pixel data


def _rows_disagree(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_on(2, _set(Rows=40)))


def _rows_huge(folder: Path, study: str) -> None:
    # Rows x Columns claims 8 GB of pixels for 2 KB of data: nothing may allocate that.
    write_series(folder, study, mutate=_on(2, _set(Rows=65535, Columns=65535)))


def _frames_huge(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_on(2, _set(NumberOfFrames=100000)))


def _bits_1(folder: Path, study: str) -> None:
    def one_bit(ds: FileDataset) -> None:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
        ds.PixelData = bytes([0x5A]) * (SHAPE[0] * SHAPE[1] // 8)

    write_series(folder, study, mutate=_all(one_bit))


def _bits_12(folder: Path, study: str) -> None:
    def packed(ds: FileDataset) -> None:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 12, 12, 11
        ds.PixelData = bytes(SHAPE[0] * SHAPE[1] * 3 // 2)

    write_series(folder, study, mutate=_on(2, packed))


def _bits_32(folder: Path, study: str) -> None:
    def wide(ds: FileDataset, k: int) -> None:
        px = np.random.default_rng(k).integers(0, 70000, size=SHAPE).astype("<u4")
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
        ds.PixelData = px.tobytes()
        ds["PixelData"].VR = "OW"

    write_series(folder, study, mutate=wide)


def _bits_stored_over(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_on(2, _set(BitsStored=20, HighBit=19)))


def _signed_mixed(folder: Path, study: str) -> None:
    def signed(ds: FileDataset, k: int) -> None:
        if k % 2:  # every other slice signed, shifted down, with an intercept that undoes it
            px = ds.pixel_array.astype(np.int32) - 2000
            ds.set_pixel_data(px.astype(np.int16), "MONOCHROME2", 12)
            ds.RescaleSlope, ds.RescaleIntercept = 1, 2000

    write_series(folder, study, mutate=signed)


def _slope_zero(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_all(_set(RescaleSlope=0, RescaleIntercept=0)))


def _slope_nan(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_on(2, _set(RescaleSlope=1.23456, RescaleIntercept=0)))
    _patch(folder / "3.dcm", "1.23456", "NaN")


def _no_pixel_data(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_on(2, _delete("PixelData")))


def _matrix_4096(folder: Path, study: str) -> None:
    write_series(folder, study, n=2, shape=(4096, 4096))


def _slices_2000(folder: Path, study: str) -> None:
    # A 2,000-slice series (lumbar series have tens to a few hundred): small slices, 0.2 mm apart.
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = uid(study, folder.name, "series")
    template = slice_dataset(study, series_uid, 0, shape=(16, 16), axes=AXIAL, description="AX T2")
    normal = np.cross(*AXIAL)
    for k in range(2000):
        template.ImagePositionPatient = [float(v) for v in ORIGIN + 0.2 * k * normal]
        template.InstanceNumber = k + 1
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = uid(study, k)
        template.save_as(folder / f"{k + 1}.dcm", enforce_file_format=True)


# --------------------------------------------------------------------------- geometry


def _spacing_zero(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_all(_set(PixelSpacing=[0, 0])))


def _spacing_negative(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_all(_set(PixelSpacing=[-0.7, -0.7])))


def _spacing_text(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_on(2, _set(PixelSpacing=[0.71234, 0.71234])))
    _patch(folder / "3.dcm", "0.71234\\0.71234", "abc\\def")


def _spacing_missing(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_all(_delete("PixelSpacing")))


def _orientation_zero(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_all(_set(ImageOrientationPatient=[0] * 6)))


def _orientation_skewed(folder: Path, study: str) -> None:
    # Row and column directions 45 degrees apart: not a pixel grid of any plane.
    skew = [0, 1, 0, 0, 0.7071, -0.7071]
    write_series(folder, study, mutate=_all(_set(ImageOrientationPatient=skew)))


def _orientation_missing(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_all(_delete("ImageOrientationPatient")))


def _position_nan(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_on(2, _set(ImagePositionPatient=[1.23456] * 3)))
    _patch(folder / "3.dcm", "1.23456\\1.23456\\1.23456", "NaN\\NaN\\NaN")


def _position_all_same(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_all(_set(ImagePositionPatient=list(ORIGIN))))


def _position_repeated(folder: Path, study: str) -> None:
    # Slice 5 repeats slice 4's position: a repeated stack of one slice.
    def repeat(ds: FileDataset, k: int) -> None:
        if k == 4:
            ds.ImagePositionPatient = [float(v) for v in ORIGIN + 3 * STEP * np.cross(*SAGITTAL)]

    write_series(folder, study, mutate=repeat)


def _position_missing(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_on(2, _delete("ImagePositionPatient")))


def _one_slice(folder: Path, study: str) -> None:
    write_series(folder, study, n=1)


def _two_slices(folder: Path, study: str) -> None:
    write_series(folder, study, n=2)


# ------------------------------------------------------------------ encodings, file types


def _rgb_capture(folder: Path, study: str) -> None:
    write_series(folder, study, n=3)
    rgb = np.zeros((*SHAPE, 3), np.uint8)
    rgb[..., 0] = 200  # a red screenshot
    ds = slice_dataset(study, uid(study, "sc"), 0)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    ds.set_pixel_data(rgb, "RGB", 8)
    ds.save_as(folder / "screenshot.dcm", enforce_file_format=True)


def _enhanced(folder: Path, study: str) -> None:
    frames = np.random.default_rng(0).integers(0, 1000, size=(6, *SHAPE)).astype(np.uint16)
    positions = ORIGIN + np.arange(6)[:, None] * STEP * np.cross(*SAGITTAL)
    path = write_enhanced(folder / "enhanced.dcm", frames, positions)
    _retag(path, study)


def _enhanced_no_positions(folder: Path, study: str) -> None:
    frames = np.random.default_rng(0).integers(0, 1000, size=(6, *SHAPE)).astype(np.uint16)
    path = write_enhanced(folder / "enhanced.dcm", frames, np.zeros((6, 3)))
    import pydicom

    ds = pydicom.dcmread(path)
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.PlanePositionSequence
    ds.save_as(path)
    _retag(path, study)


def _retag(path: Path, study: str) -> None:
    """Give a file written by dicom_factory its own study and a series description."""
    import pydicom

    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid(study, "series")
    ds.SeriesDescription = "SAG T2 TSE"
    ds.save_as(path)


def _unknown_syntax(folder: Path, study: str) -> None:
    write_series(folder, study, mutate=_on(2, lambda ds: None))
    _patch_syntax(folder / "3.dcm", b"1.2.840.10008.1.2.1", b"1.2.999.777.1.2.1")


def _unsupported_syntax(folder: Path, study: str) -> None:
    # MPEG2 video: a transfer syntax pydicom knows and no installed plugin decodes.
    def video(ds: FileDataset) -> None:
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = MPEG2MPML

    write_series(folder, study, mutate=_on(2, video))


def _patch_syntax(path: Path, old: bytes, new: bytes) -> None:
    """Swap the TransferSyntaxUID text in the file meta (same length, padded), bytes otherwise
    unchanged: pydicom refuses to write a syntax it cannot encode, a sender may not."""
    data = path.read_bytes()
    assert len(new) <= len(old) + 1
    padded = new + b"\x00" * (len(old) + (len(old) % 2) - len(new))
    path.write_bytes(data.replace(old + b"\x00" * (len(old) % 2), padded, 1))


def _corrupt_jpeg(folder: Path, study: str) -> None:
    def jpeg(ds: FileDataset) -> None:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(200)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit

    write_series(folder, study, mutate=_on(2, jpeg))


def _corrupt_rle(folder: Path, study: str) -> None:
    paths = write_series(folder, study, syntax=RLELossless)
    data = bytearray(paths[2].read_bytes())
    start = data.rfind(b"\xfe\xff\x00\xe0", 0, len(data) - 8)  # the last fragment's item tag
    data[start + 8 : start + 16] = b"\xff" * 8  # its RLE header: segment count and offsets
    paths[2].write_bytes(bytes(data))


def _unknown_vr(folder: Path, study: str) -> None:
    """Rows with a value representation no standard names (found by bench/bench_fuzz.py, on
    the file meta's SOP class: pydicom parses elements lazily and raised NotImplementedError on
    first read, past every check, out of predict's discovery)."""
    write_series(folder, study)
    data = (folder / "3.dcm").read_bytes()
    tag = b"\x28\x00\x10\x00US"  # (0028,0010) Rows, explicit VR 'US'
    assert data.count(tag) == 1
    (folder / "3.dcm").write_bytes(data.replace(tag, b"\x28\x00\x10\x00UH"))


def _rle_overrun(folder: Path, study: str) -> None:
    """RLE segments whose runs decode past the end of the frame (found by bench/bench_fuzz.py:
    pylibjpeg-rle panics, and its PanicException is no Exception)."""
    import struct

    import pydicom

    paths = write_series(folder, study, syntax=RLELossless)
    ds = pydicom.dcmread(paths[2])
    segment = b"\x81\x00" * 9  # nine runs of 128 zero bytes: 1,152 for a 1,024-byte segment
    header = struct.pack("<16L", 2, 64, 64 + len(segment), *([0] * 13))
    ds.PixelData = encapsulate([header + segment + segment])
    ds.save_as(paths[2])


def _deflated(folder: Path, study: str) -> None:
    write_series(folder, study, syntax=DeflatedExplicitVRLittleEndian)


def _big_endian(folder: Path, study: str) -> None:
    from pydicom.filewriter import dcmwrite

    paths = write_series(folder, study)
    import pydicom

    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.pixel_array.astype(">u2").tobytes()  # OW words swap with the syntax
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)


def _no_preamble(folder: Path, study: str) -> None:
    paths = write_series(folder, study)
    import pydicom

    for path in paths:
        ds = pydicom.dcmread(path)
        ds.preamble = None
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True)


def _zero_byte(folder: Path, study: str) -> None:
    write_series(folder, study, n=3)
    (folder / "empty.dcm").write_bytes(b"")


def _text_dcm(folder: Path, study: str) -> None:
    write_series(folder, study, n=3)
    (folder / "notes.dcm").write_text("Patient refused contrast. See paper chart.\n")


def _garbage_after_marker(folder: Path, study: str) -> None:
    write_series(folder, study, n=3)
    rng = np.random.default_rng(7)
    (folder / "garbled.dcm").write_bytes(bytes(128) + b"DICM" + rng.bytes(3000))


def _length_bomb(folder: Path, study: str) -> None:
    # A text element whose 32-bit length says 4 GB (SeriesDescription, explicit VR 'UT').
    paths = write_series(folder, study)
    data = paths[2].read_bytes()
    tag = b"\x08\x00\x3e\x10"  # (0008,103E) SeriesDescription, little endian
    at = data.index(tag)
    bomb = tag + b"UT\x00\x00" + b"\xf0\xff\xff\xff" + b"x" * 16
    end = at + 8 + int.from_bytes(data[at + 6 : at + 8], "little")
    paths[2].write_bytes(data[:at] + bomb + data[end:])


def _lone_dicomdir(folder: Path, study: str) -> None:
    """A DICOMDIR alone: the export's index, its image files missing."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = uid(study, "dicomdir")
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.FileSetID = "EXPORT"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    record = Dataset()
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = "PATIENT"
    record.PatientID = "HOSTILE-0001"
    ds.DirectoryRecordSequence = [record]
    ds.save_as(folder / "DICOMDIR", enforce_file_format=True)


def _dicomdir_beside(folder: Path, study: str) -> None:
    write_series(folder, study, n=4)
    _lone_dicomdir(folder / "index", study)
    os.replace(folder / "index" / "DICOMDIR", folder / "DICOMDIR")
    (folder / "index").rmdir()


def _ct_stray(folder: Path, study: str) -> None:
    write_series(folder, study, n=4)
    ds = slice_dataset(study, uid(study, "ct"), 0, axes=AXIAL, description="CT ABDOMEN")
    ds.Modality = "CT"
    ds.save_as(folder / "ct.dcm", enforce_file_format=True)


def _no_uids(folder: Path, study: str) -> None:
    write_series(folder, study, n=4)
    ds = slice_dataset(study, uid(study, "x"), 4)
    del ds.StudyInstanceUID, ds.SeriesInstanceUID
    ds.save_as(folder / "anonymous.dcm", enforce_file_format=True)


def _two_studies(folder: Path, study: str) -> None:
    write_series(folder, study, n=4)
    other = uid(study, "other study")
    series_uid = uid(other, "series")
    for k in range(2):
        ds = slice_dataset(other, series_uid, k)
        ds.save_as(folder / f"other{k + 1}.dcm", enforce_file_format=True)


# ----------------------------------------------------------------------- the file system


def _symlink_loop(folder: Path, study: str) -> None:
    write_series(folder, study)
    os.symlink("..", folder / "loop")


def _broken_link(folder: Path, study: str) -> None:
    write_series(folder, study, n=4)
    os.symlink("gone/5.dcm", folder / "5.dcm")


def _fifo(folder: Path, study: str) -> None:
    # A named pipe: opening it for reading waits for a writer that never comes.
    write_series(folder, study, n=4)
    os.mkfifo(folder / "pipe.dcm")


def _unreadable(folder: Path, study: str) -> None:
    write_series(folder, study)
    os.chmod(folder / "3.dcm", 0)


def _changing(folder: Path, study: str) -> None:
    # Rewritten in place while the tools read it (see ``FileChanger``).
    write_series(folder, study)


def _empty_folder(folder: Path, study: str) -> None:
    write_series(folder, study, n=4)
    (folder / "nothing_here").mkdir()


KINDS: list[Kind] = [
    # pixel data
    Kind("truncated_pixels", "pixel data cut short", "refused", "3.dcm", r"pixel data holds",
         _truncated),
    Kind("rows_disagree", "Rows larger than the pixel data", "refused", "3.dcm",
         r"pixel data holds", _rows_disagree),
    Kind("rows_huge", "Rows x Columns 65535 x 65535 on 2 KB of data", "refused", "3.dcm",
         r"pixel data holds", _rows_huge),
    Kind("frames_huge", "NumberOfFrames 100,000 on one frame of data", "refused", "3.dcm",
         r"pixel data holds", _frames_huge),
    Kind("bits_allocated_1", "BitsAllocated 1 (a bit mask)", "refused", "",
         r"BitsAllocated 1", _bits_1),
    Kind("bits_allocated_12", "BitsAllocated 12 (packed, not DICOM)", "refused", "3.dcm",
         r"Bits Allocated.*12", _bits_12),
    Kind("bits_allocated_32", "BitsAllocated 32", "graded", "", "", _bits_32),
    Kind("bits_stored_over", "BitsStored 20 in 16 allocated bits", "refused", "3.dcm",
         r"Bits Stored", _bits_stored_over),
    Kind("signed_unsigned_mixed", "signed and unsigned slices in one series", "graded", "", "",
         _signed_mixed),
    Kind("slope_zero", "RescaleSlope 0", "refused", "", r"RescaleSlope is 0", _slope_zero),
    Kind("slope_nan", "RescaleSlope NaN", "refused", "3.dcm", r"RescaleSlope is not",
         _slope_nan),
    Kind("no_pixel_data", "an image header without pixel data", "refused", "3.dcm",
         r"without pixel data", _no_pixel_data),
    Kind("matrix_4096", "two slices of 4,096 x 4,096", "graded", "", "", _matrix_4096, big=True),
    Kind("slices_2000", "a 2,000-slice series", "graded", "", "", _slices_2000, big=True),
    # geometry
    Kind("spacing_zero", "PixelSpacing 0", "refused", "", r"PixelSpacing is 0", _spacing_zero),
    Kind("spacing_negative", "PixelSpacing negative", "refused", "", r"PixelSpacing is negative",
         _spacing_negative),
    Kind("spacing_text", "PixelSpacing not a number", "refused", "3.dcm",
         r"PixelSpacing is not", _spacing_text),
    Kind("spacing_missing", "no PixelSpacing in any slice", "graded", "",
         r"no patient geometry", _spacing_missing),
    Kind("orientation_zero", "ImageOrientationPatient all zero", "refused", "",
         r"ImageOrientationPatient", _orientation_zero),
    Kind("orientation_skewed", "ImageOrientationPatient not orthogonal", "refused", "",
         r"ImageOrientationPatient", _orientation_skewed),
    Kind("orientation_missing", "no ImageOrientationPatient", "graded", "",
         r"no patient geometry", _orientation_missing),
    Kind("position_nan", "ImagePositionPatient NaN", "refused", "3.dcm",
         r"ImagePositionPatient is not", _position_nan),
    Kind("position_all_same", "every slice at one ImagePositionPatient", "refused", "",
         r"one position", _position_all_same),
    Kind("position_repeated", "one position repeated (a one-slice repeat)", "graded", "", "",
         _position_repeated),
    Kind("position_missing", "one slice without ImagePositionPatient", "refused", "3.dcm",
         r"no patient geometry", _position_missing),
    Kind("one_slice", "a one-slice series", "graded", "", "", _one_slice),
    Kind("two_slices", "a two-slice series", "graded", "", "", _two_slices),
    # encodings and file types
    Kind("rgb_secondary_capture", "an RGB secondary capture beside the slices", "refused",
         "screenshot.dcm", r"colour image", _rgb_capture),
    Kind("enhanced_multiframe", "enhanced multi-frame MR", "graded", "", "", _enhanced),
    Kind("enhanced_no_positions", "enhanced MR without per-frame positions", "graded", "",
         r"no patient geometry", _enhanced_no_positions),
    Kind("unknown_syntax", "an unknown transfer syntax UID", "refused", "3.dcm",
         r"transfer syntax", _unknown_syntax),
    Kind("unsupported_syntax", "MPEG2 video transfer syntax", "refused", "3.dcm",
         r"transfer syntax", _unsupported_syntax),
    Kind("corrupt_jpeg", "a JPEG stream that cannot be decoded", "refused", "3.dcm",
         r"cannot be decoded", _corrupt_jpeg),
    Kind("corrupt_rle", "an RLE stream with a broken header", "refused", "3.dcm",
         r"cannot be decoded", _corrupt_rle),
    Kind("unknown_vr", "Rows with an unknown value representation", "refused", "3.dcm",
         r"damaged DICOM header", _unknown_vr),
    Kind("rle_overrun", "RLE runs past the end of the frame (a decoder panic)", "refused",
         "3.dcm", r"cannot be decoded", _rle_overrun),
    Kind("deflated", "Deflated Explicit VR Little Endian", "graded", "", "", _deflated),
    Kind("big_endian", "Explicit VR Big Endian (retired)", "graded", "", "", _big_endian),
    Kind("no_preamble", "no preamble and no file meta", "graded", "", "", _no_preamble),
    Kind("zero_byte", "a zero-byte .dcm", "ignored", "empty.dcm", r"empty file", _zero_byte),
    Kind("text_dcm", "a text file named .dcm", "ignored", "notes.dcm", r"not a DICOM file",
         _text_dcm),
    Kind("garbage_after_marker", "DICM marker, then random bytes", "refused", "garbled.dcm",
         r"damaged", _garbage_after_marker),
    Kind("length_bomb", "an element claiming 4 GB", "refused", "3.dcm", r"damaged",
         _length_bomb),
    Kind("lone_dicomdir", "a DICOMDIR alone", "ignored", "DICOMDIR", r"DICOMDIR",
         _lone_dicomdir, alone=True),
    Kind("dicomdir_beside", "a DICOMDIR beside the images", "ignored", "DICOMDIR", r"DICOMDIR",
         _dicomdir_beside),
    Kind("ct_stray", "a CT slice among the MR slices", "refused", "ct.dcm", r"another series",
         _ct_stray, expect_predict=r"modality CT"),
    Kind("no_uids", "a slice without Study/SeriesInstanceUID", "refused", "anonymous.dcm",
         r"SeriesInstanceUID", _no_uids, expect_predict=r"StudyInstanceUID"),
    Kind("two_studies", "two studies mixed in one folder", "refused", "other1.dcm",
         r"another series", _two_studies, expect_predict=""),
    Kind("empty_subfolder", "an empty sub-folder in a series folder", "graded", "", "",
         _empty_folder),
    # the file system
    Kind("symlink_loop", "a link to the folder above (loop -> ..)", "ignored", "loop",
         r"sub-folder", _symlink_loop, expect_predict=r"already"),
    Kind("broken_link", "a link to a file that is gone", "refused", "5.dcm",
         r"cannot be opened", _broken_link),
    Kind("fifo", "a named pipe called .dcm", "ignored", "pipe.dcm", r"not a regular file",
         _fifo),
    Kind("unreadable", "a file nobody may read (chmod 000)", "refused", "3.dcm",
         r"cannot be opened", _unreadable),
    Kind("changing", "a file rewritten while it is read", "graded", "", "", _changing),
]  # fmt: skip
KIND_BY_NAME = {k.name: k for k in KINDS}
FIRST_STUDY = 91000  # kind i is study folder FIRST_STUDY + i, series folder 1


def kind_folder(root: Path, i: int) -> Path:
    """The series folder of kind ``i`` under a corpus root (an RSNA test layout)."""
    return root / "test_images" / str(FIRST_STUDY + i) / "1"


def write_corpus(root: Path, kinds: list[Kind] | None = None) -> dict[str, Path]:
    """Write every kind (or ``kinds``) under ``root/test_images``; name -> its series folder."""
    out = {}
    for kind in kinds or KINDS:
        i = KINDS.index(kind)
        folder = kind_folder(root, i)
        kind.write(folder, uid("study", kind.name))
        out[kind.name] = folder
    return out


class FileChanger:
    """Rewrites one file in place, over and over, while the tools read it: cut short, then
    whole again, as a file still being copied (or overwritten by a second transfer) looks."""

    def __init__(self, path: Path, period_s: float = 0.005) -> None:
        import threading

        self.path, self.period_s = path, period_s
        self.data = path.read_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.rewrites = 0

    def _run(self) -> None:
        half = len(self.data) // 2
        while not self._stop.is_set():
            with open(self.path, "r+b") as fh:
                fh.truncate(half)
                fh.seek(half)
                fh.write(self.data[half:])
            self.rewrites += 1
            self._stop.wait(self.period_s)

    def __enter__(self) -> FileChanger:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.path.write_bytes(self.data)


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> what it is: file content hash and mode, link target, folder mode.

    Links are not followed (a loop must not loop here either); unreadable files are described
    by their size and mode.
    """
    out: dict[str, str] = {}
    for folder, dirs, names in os.walk(root):
        for name in sorted(dirs + names):
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if path.is_symlink():
                out[rel] = f"link {os.readlink(path)}"
            elif path.is_dir():
                out[rel] = f"dir {st.st_mode:o}"
            elif not path.is_file():
                out[rel] = f"special {st.st_mode:o}"
            elif os.access(path, os.R_OK) and st.st_mode & 0o444:
                out[rel] = f"{st.st_mode:o} {zlib.crc32(path.read_bytes()):08x} {st.st_size}"
            else:
                out[rel] = f"{st.st_mode:o} unreadable {st.st_size}"
    return out
