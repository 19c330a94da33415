"""The DICOM results: a Comprehensive 3D SR (TID 1500 measurement report) and a secondary capture.

One measurement group per condition and level: the condition as finding type, the disc of the level
as finding site (with the side as its laterality for the paired foramina and recesses), the grade
(RSNA 2024: SCT Severity), the probability of each grade (class-weight lean removed, see
:mod:`spinegrade.reporting.clinical`) and, where the localiser found the level, its point as
SCOORD3D in the frame of reference of the series that condition is read on. Model identity goes into
the device observer context and every group's algorithm identification.

Codes: :mod:`spinegrade.reporting.codes` (standard where a standard names the concept; the few
private ``99SPINEGRADE`` ones are declared in the SR's Coding Scheme Identification Sequence; a
task other than RSNA 2024 names its conditions and grades by private codes derived from their
names, :func:`spinegrade.reporting.codes.codes_for`). :func:`read_sr` recovers every target from
those codes alone.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from spinegrade import __version__
from spinegrade.reporting.codes import (
    BODY_PART,
    DEWEIGHTED,
    LEVEL_SITES,
    PRIVATE_SCHEME,
    PRIVATE_SCHEME_NAME,
    PRIVATE_SCHEME_ORGANIZATION,
    PROCEDURE,
    TaskCodes,
    codes_for,
    level_of,
)
from spinegrade.task import LEVEL_TITLES, RSNA_2024, Task

MANUFACTURER = "spinegrade"
SR_SERIES_DESCRIPTION = "spinegrade AI grading (SR)"
SC_SERIES_DESCRIPTION = "spinegrade AI report figure"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
# Patient and General Study attributes the SR copies from its first evidence header (highdicom
# reads them unconditionally). All are Type 2, present but perhaps empty; some senders leave them
# out, and a PACS stores what it is sent.
STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
               "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")  # fmt: skip


@dataclass
class ModelIdentity:
    """Who made the result: run folder name, folds, package version, a hash of the weights."""

    run: str
    folds: list[int]
    model_id: str
    version: str = __version__

    def parameters(self) -> list[str]:
        return [f"run={self.run}", f"folds={','.join(map(str, self.folds))}",
                f"model_id={self.model_id}"]  # fmt: skip

    def device_uid(self) -> str:
        return generate_uid(entropy_srcs=["spinegrade-device", self.model_id])


def target_title(column: str, task: Task = RSNA_2024) -> str:
    """The tracking identifier of a target: "Spinal Canal Stenosis L4/L5"."""
    return f"{task.column_condition(column).title} {LEVEL_TITLES[task.column_level(column)]}"


def _probability(name, value: float, algorithm) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=name, value=float(value), unit=codes.UCUM.NoUnits, method=DEWEIGHTED,
        algorithm_id=algorithm,
    )  # fmt: skip


def type2_present(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds``, or a copy holding the :data:`STUDY_TYPE2` attributes it lacks, empty (DICOM's
    "unknown"): a header without a birth date still gets its SR, which says the date is unknown."""
    missing = [k for k in STUDY_TYPE2 if k not in ds]
    if not missing:
        return ds
    out = copy.deepcopy(ds)  # a header (no pixel data); the caller's dataset stays as it came
    for k in missing:
        setattr(out, k, None)
    return out


def _private_scheme() -> pydicom.Dataset:
    """The Coding Scheme Identification item that says whose ``99SPINEGRADE`` codes are."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORGANIZATION
    return item


def build_sr(
    evidence: dict[str, pydicom.Dataset],
    probs: np.ndarray,
    points: dict[str, list[float] | None],
    model: ModelIdentity,
    previous: pydicom.Dataset | None = None,
    uids: tuple[str, str] | None = None,
    task: Task = RSNA_2024,
) -> hd.sr.Comprehensive3DSR:
    """The SR of one study.

    ``evidence``: series type (e.g. "Sagittal T2/STIR") -> one header of that source series (its
    frame of reference places the points); ``probs``: de-weighted probabilities, one row per
    column of ``task`` in its order, one value per grade of the column's condition (RSNA: (25,
    3)); ``points``: column -> LPS mm or None; ``previous``: the SR this one supersedes; ``uids``:
    (series, SOP instance) UIDs to use instead of fresh ones (the service derives them, so a
    retried store overwrites rather than duplicates).
    """
    series_uid, sop_uid = uids or (generate_uid(), generate_uid())
    algorithm = hd.sr.AlgorithmIdentification(
        name=MANUFACTURER, version=model.version, parameters=model.parameters()
    )
    tc = codes_for(task)
    if len(probs) != len(task.columns):
        raise ValueError(f"{len(probs)} probability rows for the {len(task.columns)} targets")
    groups = []
    for k, column in enumerate(task.columns):
        c, level = task.column_condition(column), task.column_level(column)
        ref = evidence.get(c.series)
        p = np.asarray(probs[k], dtype=float)
        if len(p) != len(c.grades):
            raise ValueError(f"{column}: {len(p)} probabilities for the grades {c.grades}")
        kwargs = dict(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(), identifier=target_title(column, task)
            ),
            finding_type=tc.findings[c.name],
            finding_sites=[hd.sr.FindingSite(LEVEL_SITES[level], laterality=tc.laterality[c.name])],
            algorithm_id=algorithm,
            measurements=[
                _probability(name, v, algorithm)
                for name, v in zip(tc.probabilities[c.name], p, strict=True)
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(tc.grade_name, tc.grades[c.name][int(np.argmax(p))])
            ],
        )
        point = points.get(column)
        for_uid = getattr(ref, "FrameOfReferenceUID", None) if ref is not None else None
        if point is not None and for_uid:
            region = hd.sr.ImageRegion3D(
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=np.asarray([point], dtype=float),
                frame_of_reference_uid=for_uid,
            )
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    referenced_region=region, **kwargs
                )
            )
        else:  # the level was not located on this series: grades without a point
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**kwargs))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid(), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
            model_name=f"{model.run} ({model.model_id})",
        ),
    )  # fmt: skip
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
    )
    refs = list(evidence.values())
    sr = hd.sr.Comprehensive3DSR(
        evidence=[type2_present(refs[0]), *refs[1:]],
        content=report,
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        previous_versions=[previous] if previous is not None else None,
    )
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return sr


def build_sc(
    ref: pydicom.Dataset, figure_png: Path | str, uids: tuple[str, str] | None = None
) -> hd.sc.SCImage:
    """The report figure as an RGB secondary capture in the study of ``ref`` (``uids``: as in
    :func:`build_sr`)."""
    from PIL import Image

    series_uid, sop_uid = uids or (generate_uid(), generate_uid())
    with Image.open(figure_png) as im:
        rgb = np.asarray(im.convert("RGB"))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("A", "F"),
    )
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    # The lumbar spine, an unpaired part: General Series' Laterality (type 2C, required for a
    # paired or unknown part) is then not needed.
    sc.BodyPartExamined = BODY_PART
    return sc


def _texts(item: pydicom.Dataset, concept) -> set[str]:
    """Every TEXT value under ``item`` whose concept name is ``concept``."""
    found = set()
    for child in item.get("ContentSequence", []):
        name = child.get("ConceptNameCodeSequence")
        if name and name[0].CodeValue == concept.value and "TextValue" in child:
            found.add(str(child.TextValue))
        found |= _texts(child, concept)
    return found


def target_of(group, tc: TaskCodes | None = None) -> str:
    """The column a measurement group grades, from its codes alone: finding type, disc, side.

    The tracking identifier's text is never read: another system may rewrite it, the codes are
    what a registry aggregates. ``tc``: the task's codes (default RSNA 2024's).
    """
    tc = tc or codes_for(RSNA_2024)
    sites = group.finding_sites
    if group.finding_type is None or len(sites) != 1:
        raise ValueError("a measurement group needs one finding type and one finding site")
    condition = tc.condition_of(group.finding_type, sites[0].laterality)
    return f"{condition}_{level_of(sites[0].value)}"


def read_sr(data: bytes | pydicom.Dataset, task: Task = RSNA_2024) -> dict:
    """Re-read an SR of ``task`` from its codes: per column, grade and probabilities; points;
    the model.

    Used to validate every SR before it is stored, and by the tests.
    """
    ds = pydicom.dcmread(io.BytesIO(data)) if isinstance(data, bytes) else data
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    doc = sr.content
    if not isinstance(doc, hd.sr.MeasurementReport):
        raise ValueError("not a TID 1500 measurement report")
    out: dict = {"targets": {}, "parameters": sorted(_texts(ds, codes.DCM.AlgorithmParameters))}
    groups = list(doc.get_planar_roi_measurement_groups()) + list(
        doc.get_image_measurement_groups()
    )
    tc = codes_for(task)
    for g in groups:
        column = target_of(g, tc)
        if column in out["targets"]:
            raise ValueError(f"two measurement groups grade {column}")
        c = task.column_condition(column)
        probs: list[float | None] = [None] * len(c.grades)
        for m in g.get_measurements():
            probs[tc.probability_of(c.name, m.name)] = float(m.value)
        (evaluation,) = g.get_qualitative_evaluations(name=tc.grade_name)
        grade = evaluation.value
        point = None
        region = getattr(g, "roi", None)
        if region is not None:
            point = [float(v) for v in np.asarray(region.value).ravel()[:3]]
            for_uid = region.frame_of_reference_uid
        else:
            for_uid = None
        out["targets"][column] = {
            "probs": probs, "grade": c.grades[tc.grade_of(c.name, grade)],
            "grade_code": (grade.scheme_designator,
            grade.value), "point": point, "frame_of_reference": for_uid,
        }  # fmt: skip
    if len(out["targets"]) != len(task.columns):
        raise ValueError(
            f"SR holds {len(out['targets'])} measurement groups, expected {len(task.columns)}"
        )
    return out
