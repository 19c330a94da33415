"""The DICOM results: a Comprehensive 3D SR (TID 1500 measurement report) and a secondary capture.

One measurement group per condition and level: the grade (coded, SCT Severity), the three
probabilities (class-weight lean removed, see :mod:`spinegrade.reporting.clinical`), the finding
site (SCT intervertebral disc) and, where the localiser found the level, its point as SCOORD3D in
the frame of reference of the series that condition is read on. Model identity goes into the device
observer context and every group's algorithm identification.

Codes: DCM and SCT where a concept exists; otherwise the private coding scheme ``99SPINEGRADE``:

- conditions (finding type): ``SPINAL_CANAL_STENOSIS``, ``LEFT_NEURAL_FORAMINAL_NARROWING``,
  ``RIGHT_NEURAL_FORAMINAL_NARROWING``, ``LEFT_SUBARTICULAR_STENOSIS``,
  ``RIGHT_SUBARTICULAR_STENOSIS``;
- probabilities (measurement names): ``P_NORMAL_MILD``, ``P_MODERATE``, ``P_SEVERE``;
- the grade value ``NORMAL_MILD`` (SNOMED has Mild but no "normal or mild");
- the method ``DEWEIGHTED`` (probabilities with the training class weights removed).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from spinegrade import __version__
from spinegrade.task import (
    CONDITION_SERIES,
    CONDITION_TITLES,
    CONDITIONS,
    LABEL_COLUMNS,
    LEVEL_TITLES,
    SEVERITIES,
)

SCHEME = "99SPINEGRADE"
MANUFACTURER = "spinegrade"
SR_SERIES_DESCRIPTION = "spinegrade AI grading (SR)"
SC_SERIES_DESCRIPTION = "spinegrade AI report figure"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902


def private(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, SCHEME, meaning)


CONDITION_CODES = {c: private(c.upper(), CONDITION_TITLES[c]) for c in CONDITIONS}
PROB_CODES = (
    private("P_NORMAL_MILD", "Probability of Normal/Mild"),
    private("P_MODERATE", "Probability of Moderate"),
    private("P_SEVERE", "Probability of Severe"),
)
GRADE_CODES = (private("NORMAL_MILD", "Normal/Mild"), codes.SCT.Moderate, codes.SCT.Severe)
DEWEIGHTED = private("DEWEIGHTED", "Probability with training class weights removed")
# The disc below a vertebra: L1/L2 is the intervertebral disc of the first lumbar vertebra.
LEVEL_SITES = {
    lv: hd.sr.CodedConcept(code.value, code.scheme_designator, f"Intervertebral disc {title}")
    for lv, title, code in (
        ("l1_l2", "L1/L2", codes.SCT.IntervertebralDiscStructureOfFirstLumbarVertebra),
        ("l2_l3", "L2/L3", codes.SCT.IntervertebralDiscStructureOfSecondLumbarVertebra),
        ("l3_l4", "L3/L4", codes.SCT.IntervertebralDiscStructureOfThirdLumbarVertebra),
        ("l4_l5", "L4/L5", codes.SCT.IntervertebralDiscStructureOfFourthLumbarVertebra),
        ("l5_s1", "L5/S1", codes.SCT.IntervertebralDiscStructureOfFifthLumbarVertebra),
    )
}  # SNOMED's meanings exceed DICOM's 64 characters; the codes are SNOMED's own
PROCEDURE = codes.SCT.LumbarSpine  # what was imaged; a procedure code for "MR L-spine" varies


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


def target_title(column: str) -> str:
    """The tracking identifier of a target: "Spinal Canal Stenosis L4/L5"."""
    return f"{CONDITION_TITLES[column[:-6]]} {LEVEL_TITLES[column[-5:]]}"


def _probability(j: int, value: float, algorithm) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=PROB_CODES[j], value=float(value), unit=codes.UCUM.NoUnits, method=DEWEIGHTED,
        algorithm_id=algorithm,
    )  # fmt: skip


def build_sr(
    evidence: dict[str, pydicom.Dataset],
    probs: np.ndarray,
    points: dict[str, list[float] | None],
    model: ModelIdentity,
    previous: pydicom.Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR of one study.

    ``evidence``: series type (e.g. "Sagittal T2/STIR") -> one header of that source series (its
    frame of reference places the points); ``probs``: (25, 3) de-weighted, LABEL_COLUMNS order;
    ``points``: column -> LPS mm or None; ``previous``: the SR this one supersedes.
    """
    algorithm = hd.sr.AlgorithmIdentification(
        name=MANUFACTURER, version=model.version, parameters=model.parameters()
    )
    groups = []
    for k, column in enumerate(LABEL_COLUMNS):
        condition, level = column[:-6], column[-5:]
        ref = evidence.get(CONDITION_SERIES[condition])
        p = probs[k]
        kwargs = dict(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(), identifier=target_title(column)
            ),
            finding_type=CONDITION_CODES[condition],
            finding_sites=[hd.sr.FindingSite(LEVEL_SITES[level])],
            algorithm_id=algorithm,
            measurements=[_probability(j, p[j], algorithm) for j in range(len(SEVERITIES))],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(codes.SCT.Severity, GRADE_CODES[int(np.argmax(p))])
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
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence.values()),
        content=report,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        previous_versions=[previous] if previous is not None else None,
    )
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    return sr


def build_sc(ref: pydicom.Dataset, figure_png: Path | str) -> hd.sc.SCImage:
    """The report figure as an RGB secondary capture in the study of ``ref``."""
    from PIL import Image

    with Image.open(figure_png) as im:
        rgb = np.asarray(im.convert("RGB"))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("A", "F"),
    )
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    # Body Part Examined: an unpaired part (PS3.16 Annex L: LSPINE <-> SCT 122496007 Lumbar spine),
    # so General Series' Laterality (type 2C, required for a paired or unknown part) is not needed.
    sc.BodyPartExamined = "LSPINE"
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


def read_sr(data: bytes | pydicom.Dataset) -> dict:
    """Re-read an SR: per column, grade and probabilities; points; the model parameters.

    Used to validate every SR before it is stored, and by the tests.
    """
    ds = pydicom.dcmread(io.BytesIO(data)) if isinstance(data, bytes) else data
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    doc = sr.content
    if not isinstance(doc, hd.sr.MeasurementReport):
        raise ValueError("not a TID 1500 measurement report")
    by_title = {target_title(c): c for c in LABEL_COLUMNS}
    out: dict = {"targets": {}, "parameters": sorted(_texts(ds, codes.DCM.AlgorithmParameters))}
    groups = list(doc.get_planar_roi_measurement_groups()) + list(
        doc.get_image_measurement_groups()
    )
    for g in groups:
        column = by_title[g.tracking_identifier]
        probs = [None] * 3
        for m in g.get_measurements():
            j = [c.value for c in PROB_CODES].index(m.name.value)
            probs[j] = float(m.value)
        grade = g.get_qualitative_evaluations(name=codes.SCT.Severity)[0].value
        point = None
        region = getattr(g, "roi", None)
        if region is not None:
            point = [float(v) for v in np.asarray(region.value).ravel()[:3]]
            for_uid = region.frame_of_reference_uid
        else:
            for_uid = None
        out["targets"][column] = {
            "probs": probs, "grade": grade.meaning, "grade_code": (grade.scheme_designator,
            grade.value), "point": point, "frame_of_reference": for_uid,
        }  # fmt: skip
    if len(out["targets"]) != len(LABEL_COLUMNS):
        raise ValueError(f"SR holds {len(out['targets'])} measurement groups, expected 25")
    return out
