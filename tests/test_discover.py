"""Raw-folder discovery: grouping by UID, series typing from text, timing, geometry and contrast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from spinegrade.io.discover import (
    AX_T2,
    SAG_T1,
    SAG_T2,
    discover_studies,
    fluid_band_score,
    stable_id,
    type_from_description,
    weighting_from_timing,
)

SAG_IOP = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # rows run A->P, columns H->F: a sagittal slice
AX_IOP = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # rows R->L, columns A->P: an axial slice


def _phantom_slice(kind: str, size: int = 48) -> np.ndarray:
    """A crude mid-sagittal slice: T2 has an unbroken bright CSF band, T1 bright broken blocks."""
    rng = np.random.default_rng(0)
    img = 200 + 20 * rng.standard_normal((size, size))
    if kind == "T2":
        img[:, size // 2 - 1 : size // 2 + 2] = 1500  # thecal sac, head to foot
    else:
        for top in range(2, size, 10):  # vertebral bodies (fatty marrow) separated by discs
            img[top : top + 6, size // 2 - 8 : size // 2 - 2] = 900
    return np.clip(img, 0, 4000).astype(np.uint16)


def write_series(
    folder: Path,
    study_uid: str,
    description: str,
    iop: list[float],
    n: int = 4,
    kind: str = "T2",
    timing: tuple[float, float] | None = None,
    patient: str = "DOE^JANE",
) -> str:
    """Write ``n`` MR slices of one new series into ``folder``; returns the SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    normal = np.cross(iop[:3], iop[3:])
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{series_uid[-6:]}_{i}"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "MR", patient, "PID-0042"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        if description:
            ds.SeriesDescription = description
        if timing:
            ds.RepetitionTime, ds.EchoTime = timing
        ds.InstanceNumber = i + 1
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = list(np.array([-100.0, -100.0, 100.0]) + 4.0 * i * normal)
        ds.PixelSpacing = [1.0, 1.0]
        px = _phantom_slice(kind)
        ds.Rows, ds.Columns = px.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = px.tobytes()
        ds.save_as(path, enforce_file_format=True)
    return series_uid


def test_description_patterns() -> None:
    assert type_from_description("Sagittal T2/STIR") == ("sagittal", "T2")
    assert type_from_description("t1_tse_sag_384") == ("sagittal", "T1")
    assert type_from_description("AX T2 FRFSE") == ("axial", "T2")
    assert type_from_description("SAG STIR") == ("sagittal", "T2")
    assert type_from_description("Localizer") == (None, None)


def test_timing_rules() -> None:
    assert weighting_from_timing(te=12.0, tr=550.0, ti=None) == "T1"
    assert weighting_from_timing(te=100.0, tr=3500.0, ti=None) == "T2"
    assert weighting_from_timing(te=40.0, tr=4000.0, ti=160.0, scanning_sequence="IR") == "T2"
    assert weighting_from_timing(te=None, tr=None, ti=None) is None


def test_fluid_band_score_separates_t2_from_t1() -> None:
    assert fluid_band_score(_phantom_slice("T2")) > 0.9
    assert fluid_band_score(_phantom_slice("T1")) < 0.6


def test_stable_id_keeps_rsna_ids_and_hashes_dotted_uids() -> None:
    assert stable_id("44036939") == 44036939
    uid = "1.2.826.0.1.3680043.8.498.1"
    assert stable_id(uid) == stable_id(uid)
    assert 0 <= stable_id(uid) < 2**32
    assert stable_id(uid) != stable_id(uid + "0")


def test_discovers_nested_and_flat_layouts(tmp_path: Path) -> None:
    root = tmp_path / "export"
    study_a, study_b = generate_uid(), "3000001"
    # Study A: typed by descriptions, files of two series mixed in one flat folder.
    write_series(root / "flat", study_a, "SAG T1 TSE", SAG_IOP, kind="T1")
    write_series(root / "flat", study_a, "SAG T2 TSE", SAG_IOP, kind="T2")
    write_series(root / "deep" / "x" / "y", study_a, "AX T2", AX_IOP)
    # Study B: no descriptions: timing for one sagittal, elimination for the other.
    write_series(root / "b1", study_b, "", SAG_IOP, kind="T1", timing=(500.0, 10.0))
    write_series(root / "b2", study_b, "", SAG_IOP, kind="T2")
    write_series(root / "b3", study_b, "", AX_IOP)
    (root / "notes.txt").write_text("not a dicom file")

    found = discover_studies(root)
    table = found.table()
    assert sorted(found.study_ids) == sorted([stable_id(study_a), 3000001])
    assert len(table) == 6 and (table["n_files"] == 4).all()
    a = table[table["study_id"] == stable_id(study_a)]
    assert sorted(a["series_description"]) == sorted([SAG_T1, SAG_T2, AX_T2])
    assert (a["type_source"] == "description").all() and not a["guessed"].any()
    b = table[table["study_id"] == 3000001].set_index("type_source")
    assert b.loc["sequence timing", "series_description"] == SAG_T1
    assert b.loc["elimination", "series_description"] == SAG_T2
    assert b.loc["plane only", "series_description"] == AX_T2
    assert any("3000001" in w and "guess" in w for w in found.warnings)
    assert [p.name for p, _ in found.skipped] == ["notes.txt"]
    # Every file of a series is listed, and the description table has the RSNA columns.
    sid = int(a[a["series_description"] == SAG_T2]["series_id"].iloc[0])
    assert len(found.files_of(stable_id(study_a), sid)) == 4
    assert list(found.series_descriptions().columns) == [
        "study_id",
        "series_id",
        "series_description",
    ]


def test_two_untyped_sagittals_are_told_apart_by_contrast(tmp_path: Path) -> None:
    study = generate_uid()
    write_series(tmp_path / "s1", study, "", SAG_IOP, kind="T2")
    write_series(tmp_path / "s2", study, "", SAG_IOP, kind="T1")
    found = discover_studies(tmp_path)
    by_folder = {s.files[0].parent.name: s for s in found.series}
    assert by_folder["s1"].series_description == SAG_T2
    assert by_folder["s2"].series_description == SAG_T1
    assert by_folder["s1"].guessed and by_folder["s1"].type_source == "image contrast"
    assert any("missing" in w or "no Axial T2" in w for w in found.warnings)


def test_geometry_overrides_a_wrong_description(tmp_path: Path) -> None:
    write_series(tmp_path, generate_uid(), "AX T2", SAG_IOP, kind="T2")
    (s,) = discover_studies(tmp_path).series
    assert s.plane == "sagittal" and s.series_description == SAG_T2
    assert "geometry is sagittal" in s.note


def test_no_identifier_in_table(tmp_path: Path) -> None:
    write_series(tmp_path, generate_uid(), "SAG T2", SAG_IOP, patient="SECRET^NAME")
    text = discover_studies(tmp_path).table().to_csv()
    assert "SECRET" not in text and "PID-0042" not in text


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no MR DICOM series"):
        discover_studies(tmp_path)
    with pytest.raises(FileNotFoundError):
        discover_studies(tmp_path / "missing")


def test_header_only_read_leaves_files_untouched(tmp_path: Path) -> None:
    write_series(tmp_path, generate_uid(), "SAG T1", SAG_IOP, kind="T1")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    discover_studies(tmp_path)
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert pydicom.dcmread(next(iter(before))).PatientName == "DOE^JANE"


# ------------------------------------------------------------------ identifiers in folder names


def test_folders_naming_the_patient_are_blanked(tmp_path: Path) -> None:
    from spinegrade.io.identifiers import REDACTED, patient_identifiers, redact_folder

    folder = tmp_path / "DOE^JANE_PID-0042"
    write_series(folder, generate_uid(), "SAG T2", SAG_IOP, n=1, patient="DOE^JANE")
    secrets = patient_identifiers(folder.iterdir())
    assert {"doe", "jane", "doe jane", "pid-0042"} <= secrets
    # Any component holding a name part or the id goes, case-insensitively; the rest stays.
    assert redact_folder("ward3/Doe_Jane/mri 2024", secrets) == f"ward3/{REDACTED}/mri 2024"
    assert redact_folder("pid-0042/series1", secrets) == f"{REDACTED}/series1"
    assert redact_folder(".", secrets) == "."
    # A short id is matched only as a whole folder name, not inside ordinary ones.
    assert redact_folder("7/exam7", {"7"}) == f"{REDACTED}/exam7"
