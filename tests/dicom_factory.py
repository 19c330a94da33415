"""Writers of small, geometrically correct MR DICOM series for the tests and the benchmark.

Coordinates are DICOM LPS (+x Left, +y Posterior, +z Head). A stack's k-th slice (in geometric
order) lies at ``origin + k * step * normal`` with ``normal = cross(row, col)``, so the truth
pixels returned by :func:`write_stack` are in the order the reader must produce.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    generate_uid,
)

# (row_dir, col_dir) of the standard planes: columns run along row_dir, rows along col_dir.
SAGITTAL = (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]))  # normal -x: L->R
AXIAL = (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]))  # normal +z: F->H
CORONAL = (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0]))  # normal +y: A->P


def tilted_axial(tilt_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Axial axes rotated about the patient's left-right axis, like an axial stack laid parallel
    to a disc (the lumbar discs are tilted by the lordosis)."""
    t = np.deg2rad(tilt_deg)
    return np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(t), np.sin(t)])


def _ds_numbers(values: Sequence[float]) -> list[float]:
    # DS values are text of at most 16 characters.
    return [round(float(v), 6) for v in values]


def mr_dataset(
    pixels: np.ndarray,
    *,
    position: Sequence[float] | None,
    row: Sequence[float] | None,
    col: Sequence[float] | None,
    pixel_spacing: Sequence[float] | None = (0.7, 0.7),
    instance: int | None = 1,
    series_uid: str = "1.2.3.4",
    description: str = "Axial T2",
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    thickness: float | None = None,
    spacing_between: float | None = None,
) -> FileDataset:
    """A classic MR Image Storage data set (uncompressed) with the given geometry and pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MR"
    ds.SeriesDescription = description
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = _ds_numbers(position)
    if row is not None and col is not None:
        ds.ImageOrientationPatient = _ds_numbers([*row, *col])
    if pixel_spacing is not None:
        ds.PixelSpacing = _ds_numbers(pixel_spacing)
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0.0
    if thickness is not None:
        ds.SliceThickness = thickness
    if spacing_between is not None:
        ds.SpacingBetweenSlices = spacing_between
    bits = bits_stored or (8 if pixels.dtype.itemsize == 1 else 12)
    ds.set_pixel_data(pixels, photometric, bits)
    return ds


def save(ds: FileDataset, path: Path, transfer_syntax: str | None = None) -> Path:
    """Write ``ds`` to ``path``, compressed with pydicom's encoders when asked."""
    if transfer_syntax == JPEGBaseline8Bit:
        _jpeg_baseline(ds)
    elif transfer_syntax is not None and transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _jpeg_baseline(ds: FileDataset) -> None:
    """Lossy 8-bit JPEG through Pillow (pydicom has no JPEG encoder), encapsulated by pydicom."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(ds.pixel_array.astype(np.uint8), mode="L").save(buf, "JPEG", quality=95)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"


def write_stack(
    folder: Path,
    n: int,
    *,
    axes: tuple[np.ndarray, np.ndarray] = AXIAL,
    origin: Sequence[float] = (-80.0, -90.0, 0.0),
    step: float = 4.0,
    shape: tuple[int, int] = (24, 20),
    instances: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    rng: np.random.Generator | None = None,
    transfer_syntax: str | None = None,
    dtype: type = np.uint16,
    skip: Sequence[int] = (),
    **kwargs,
) -> list[np.ndarray]:
    """Write slices 0..n-1 of one stack (minus ``skip``); return their truth pixels in order.

    ``instances``/``names`` give each slice's InstanceNumber and file name (default: 1..n and
    ``{instance}.dcm``, as in the RSNA layout). Extra keyword arguments go to :func:`mr_dataset`.
    """
    rng = rng or np.random.default_rng(0)
    row, col = axes
    normal = np.cross(row, col)
    instances = list(instances) if instances is not None else list(range(1, n + 1))
    truth = []
    for k in range(n):
        if k in skip:
            continue
        high = 256 if np.dtype(dtype).itemsize == 1 else 4096
        pixels = rng.integers(0, high, size=shape).astype(dtype)
        ds = mr_dataset(
            pixels,
            position=np.asarray(origin) + k * step * normal,
            row=row,
            col=col,
            instance=instances[k],
            **kwargs,
        )
        name = names[k] if names is not None else f"{instances[k]}.dcm"
        save(ds, folder / name, transfer_syntax)
        truth.append(pixels)
    return truth


def write_enhanced(
    path: Path,
    frames: np.ndarray,
    positions: np.ndarray,
    *,
    axes: tuple[np.ndarray, np.ndarray] = SAGITTAL,
    pixel_spacing: Sequence[float] = (0.8, 0.8),
    slopes: Sequence[float] | None = None,
    transfer_syntax: str | None = None,
) -> Path:
    """An Enhanced MR Image Storage file: one frame per slice, geometry in functional groups.

    Orientation and pixel spacing go in the shared group (as scanners do for a stack), the
    position and the rescale of each frame in its per-frame group.
    """
    ds = mr_dataset(frames, position=None, row=None, col=None, pixel_spacing=None, instance=7)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    shared = Dataset()
    orient, measures = Dataset(), Dataset()
    orient.ImageOrientationPatient = _ds_numbers([*axes[0], *axes[1]])
    measures.PixelSpacing = _ds_numbers(pixel_spacing)
    shared.PlaneOrientationSequence = [orient]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k, pos in enumerate(positions):
        item, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = _ds_numbers(pos)
        item.PlanePositionSequence = [plane]
        if slopes is not None:
            transform = Dataset()
            transform.RescaleSlope = slopes[k]
            transform.RescaleIntercept = 0
            item.PixelValueTransformationSequence = [transform]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    return save(ds, path, transfer_syntax)


def shuffled_names(n: int, seed: int = 1) -> list[str]:
    """File names unrelated to position or InstanceNumber (and without a .dcm suffix)."""
    return [f"IMG{k:04d}" for k in np.random.default_rng(seed).permutation(n)]
