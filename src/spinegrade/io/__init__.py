"""DICOM input: the only part of spinegrade that touches DICOM files."""

from spinegrade.io.types import SeriesRead, SkippedFile, Stack

__all__ = ["SeriesRead", "SkippedFile", "Stack"]
