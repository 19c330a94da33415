"""DICOM files and CSV tables of the phantom dataset, in the exact RSNA 2024 layout.

Every image is a complete MR Image Storage file (file meta, Study/Series/SOP Instance UIDs, a
frame of reference, patient geometry in LPS, uint16 pixels with RescaleSlope/Intercept). UIDs are
derived from the generator's seed (``pydicom.uid.generate_uid`` with entropy sources), and no
clock is read, so the same seed gives the same bytes.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from spinegrade.phantom.render import SlicePlan

# Sequence parameters by contrast: (ScanningSequence, SequenceVariant, TR, TE, TI or None).
_SEQUENCE = {
    "T1": ("SE", "SK", 550.0, 10.0, None),
    "T2": ("SE", "SK", 3500.0, 105.0, None),
    "STIR": ("IR", "SK", 4200.0, 60.0, 150.0),
}


def uid(*parts: object) -> str:
    """A deterministic DICOM UID from the given parts (seed, study, series, instance...)."""
    return generate_uid(entropy_srcs=["spinegrade-phantom", *map(str, parts)])


@dataclass
class StudyMeta:
    """Study-level DICOM attributes (one patient, one study)."""

    study_uid: str
    frame_uid: str
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_date: str
    accession: str
    field_strength: float


@dataclass
class SeriesMeta:
    """Series-level DICOM attributes."""

    series_uid: str
    series_number: int
    description: str
    contrast: str
    rescale: tuple[float, float] = (1.0, 0.0)  # slope, intercept
    write_thickness: bool = True  # the hidden RSNA test files lack SliceThickness
    compress: bool = False  # RLE Lossless instead of explicit VR little endian


class SeriesWriter:
    """Writes the images of one series: the study and series attributes are built once."""

    def __init__(self, study: StudyMeta, series: SeriesMeta) -> None:
        self.series = series
        self.template = Dataset()
        _patient_study(self.template, study)
        _series(self.template, series)

    def write(
        self, path: Path, pixels: np.ndarray, plan: SlicePlan, instance_number: int, sop_uid: str
    ) -> None:
        """Write one MR image file."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "SPINEGRADE_PH"
        ds = self.template.copy()
        ds.file_meta = meta
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = int(instance_number)
        _geometry(ds, plan, self.series.write_thickness)
        slope, intercept = self.series.rescale
        stored = pixels if slope == 1.0 and intercept == 0.0 else (pixels - intercept) / slope
        stored = np.clip(np.rint(stored), 0, 65535).astype(np.uint16)
        ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
        # A display window a scanner would suggest: the central 1-99.5% of the values.
        lo, hi = np.percentile(pixels[::4, ::4], [1, 99.5])
        ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2:.0f}", f"{max(hi - lo, 1):.0f}"
        if self.series.compress:
            ds.compress(RLELossless, stored, encoding_plugin="pylibjpeg")
        else:
            ds.PixelData = stored.tobytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)


def _patient_study(ds: Dataset, study: StudyMeta) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.study_date
    ds.StudyTime = "093000"
    ds.StudyID = "1"
    ds.AccessionNumber = study.accession
    ds.StudyDescription = "MRI LUMBAR SPINE"
    ds.ReferringPhysicianName = ""
    ds.FrameOfReferenceUID = study.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Modality = "MR"
    ds.Manufacturer = "spinegrade phantom"
    ds.MagneticFieldStrength = f"{study.field_strength:g}"
    ds.BodyPartExamined = "LSPINE"
    ds.PatientPosition = "HFS"


def _series(ds: Dataset, series: SeriesMeta) -> None:
    ds.SOPClassUID = MRImageStorage
    ds.SeriesInstanceUID = series.series_uid
    ds.SeriesNumber = series.series_number
    ds.SeriesDescription = series.description
    ds.ProtocolName = series.description
    ds.AcquisitionNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    seq, variant, tr, te, ti = _SEQUENCE[series.contrast]
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = seq, variant, ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime, ds.EchoTime = f"{tr:g}", f"{te:g}"
    if ti is not None:
        ds.InversionTime = f"{ti:g}"
    ds.EchoTrainLength = 4 if series.contrast == "T1" else 17
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    slope, intercept = series.rescale
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "US"


def _geometry(ds: Dataset, plan: SlicePlan, thickness: bool) -> None:
    """Patient-space geometry (LPS): position of pixel (0, 0), row/column directions, spacing."""
    ds.ImagePositionPatient = [f"{v:.6f}" for v in plan.position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*plan.row_dir, *plan.col_dir)]
    ds.PixelSpacing = [f"{plan.spacing[0]:.8f}", f"{plan.spacing[1]:.8f}"]
    ds.SliceLocation = f"{float(plan.position @ plan.normal):.6f}"
    if thickness:
        ds.SliceThickness = f"{plan.thickness:.4f}"


# ------------------------------------------------------------------------------------ CSVs


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A plain CSV with Unix newlines (the RSNA files' style)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow(row)


def fmt_float(v: float) -> str:
    """Coordinates as the RSNA file writes them (plain decimals)."""
    return f"{v:.6f}".rstrip("0").rstrip(".")
