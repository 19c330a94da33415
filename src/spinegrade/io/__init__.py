"""DICOM input: the only part of spinegrade that touches DICOM files."""

from spinegrade.io.describe import describe_series, inspect_path
from spinegrade.io.dicom import DicomReadError, read_series
from spinegrade.io.types import SeriesRead, SkippedFile, Stack

__all__ = [
    "DicomReadError",
    "SeriesRead",
    "SkippedFile",
    "Stack",
    "describe_series",
    "inspect_path",
    "read_series",
]
