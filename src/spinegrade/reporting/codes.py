"""The coded concepts of the DICOM results: which code names each condition, grade, level and side.

A PACS viewer renders, and a registry counts, SR content by its codes, so every concept carries a
standard code (SNOMED CT ``SCT``, DICOM ``DCM``, LOINC ``LN``) where one exists; the private scheme
``99SPINEGRADE`` is kept only for what no standard names (listed in :data:`PRIVATE_CODES` and the
README). Every table is keyed by the names of :mod:`spinegrade.task` (conditions, levels,
severities, sides), so the task's vocabulary and the codes cannot drift apart.

Sources (each value checked against them; ``tests/test_codes.py`` re-checks the DICOM ones against
pydicom's copy of PS3.16):

- intervertebral discs: PS3.16 CID 7604 "Intervertebral Disc";
- grades: CID 3832 "Stenosis Grade" (also CID 3716 "Severity"); concept name SCT 246112005;
- sides: CID 244 "Laterality" (via CID 247), as the finding site's laterality modifier;
- procedure: CID 100 "Quantitative Diagnostic Imaging Procedure" (TID 1500's Procedure Reported);
- conditions: not in any DICOM context group; the SNOMED CT codes and meanings are those of the
  NLM VSAC value set 2.16.840.1.113762.1.4.1021.95 "Conditions associated with chronic pain"
  (SNOMED CT US Edition 2023-03-01).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from pydicom.sr.coding import Code

from spinegrade.task import CONDITION_SIDE, CONDITIONS, LEVELS, PRIVATE_SCHEME, SEVERITIES, Task

# How the SR declares the private scheme (SOP Common, Coding Scheme Identification Sequence), so a
# receiver can tell whose codes these are.
PRIVATE_SCHEME_NAME = "spinegrade lumbar spine grading"
PRIVATE_SCHEME_ORGANIZATION = "spinegrade project"


def private(value: str, meaning: str) -> Code:
    """A concept of the private scheme (only for what no standard terminology names).

    Values stay within Code Value's 16 characters (VR SH): longer ones would go to Long Code
    Value, which older viewers do not read.
    """
    if len(value) > 16:
        raise ValueError(f"private code value {value!r} is longer than 16 characters")
    return Code(value, PRIVATE_SCHEME, meaning)


# ------------------------------------------------------------------------------------ findings

# The RSNA "spinal canal stenosis" is central stenosis of the lumbar canal.
LUMBAR_SPINAL_STENOSIS = Code("18347007", "SCT", "Spinal stenosis of lumbar region")
# Neural foraminal narrowing. A SNOMED CT US Edition concept (namespace 1000119): the International
# ones found beside it (203714006 osseous and subluxation, 203715007 connective tissue and disc
# stenosis of intervertebral foramina) name a cause, which a grade from an image does not know.
FORAMINAL_STENOSIS = Code("371000119109", "SCT", "Stenosis of intervertebral foramina")
# Subarticular (lateral recess) stenosis: no SNOMED CT or DICOM concept found; the side is coded
# by the standard laterality, so one private code serves both sides.
SUBARTICULAR_STENOSIS = private("SUBART_STENOSIS", "Subarticular (lateral recess) stenosis")

_FINDING_OF_GROUP = {
    "spinal_canal_stenosis": LUMBAR_SPINAL_STENOSIS,
    "left_neural_foraminal_narrowing": FORAMINAL_STENOSIS,
    "right_neural_foraminal_narrowing": FORAMINAL_STENOSIS,
    "left_subarticular_stenosis": SUBARTICULAR_STENOSIS,
    "right_subarticular_stenosis": SUBARTICULAR_STENOSIS,
}
CONDITION_FINDINGS: dict[str, Code] = {c: _FINDING_OF_GROUP[c] for c in CONDITIONS}

# CID 244 Laterality: the foramina and recesses are paired, the central canal is not.
SIDE_CODES: dict[str, Code] = {
    "left": Code("7771000", "SCT", "Left"),
    "right": Code("24028007", "SCT", "Right"),
}
CONDITION_LATERALITY: dict[str, Code | None] = {
    c: None if CONDITION_SIDE[c] is None else SIDE_CODES[CONDITION_SIDE[c]] for c in CONDITIONS
}

# CID 7604: the disc itself names the level (the RSNA levels are disc levels). L5/S1 is CID 7604's
# "Structure of intervertebral disc of L5 and S1" (715056000), not 75782005 "Intervertebral disc
# structure of fifth lumbar vertebra", which the SR used before and no context group lists.
_DISCS = {
    "l1_l2": Code("80064006", "SCT", "L1/L2 disc"),
    "l2_l3": Code("67459009", "SCT", "L2/L3 disc"),
    "l3_l4": Code("62551000", "SCT", "L3/L4 disc"),
    "l4_l5": Code("84020006", "SCT", "L4/L5 disc"),
    "l5_s1": Code("715056000", "SCT", "L5/S1 disc"),
}
LEVEL_SITES: dict[str, Code] = {lv: _DISCS[lv] for lv in LEVELS}

# ------------------------------------------------------------------------------------- grades

SEVERITY = Code("246112005", "SCT", "Severity")  # the qualitative evaluation's concept name
# CID 3832 Stenosis Grade has Mild, Moderate, Severe; the RSNA grade "Normal/Mild" pools normal
# with mild, which SCT Mild (255604002) would misstate, so it stays private.
_GRADES = {
    "Normal/Mild": private("NORMAL_MILD", "Normal/Mild"),
    "Moderate": Code("6736007", "SCT", "Moderate"),
    "Severe": Code("24484000", "SCT", "Severe"),
}
SEVERITY_CODES: dict[str, Code] = {s: _GRADES[s] for s in SEVERITIES}
# The model's probability of each grade: no standard concept names "probability of grade X".
_PROBABILITIES = {
    "Normal/Mild": private("P_NORMAL_MILD", "Probability of Normal/Mild"),
    "Moderate": private("P_MODERATE", "Probability of Moderate"),
    "Severe": private("P_SEVERE", "Probability of Severe"),
}
PROBABILITY_NAMES: dict[str, Code] = {s: _PROBABILITIES[s] for s in SEVERITIES}
# How the probabilities were derived (see spinegrade.reporting.clinical): ours alone.
DEWEIGHTED = private("DEWEIGHTED", "Probability with training class weights removed")

# --------------------------------------------------------------------------------- the study

# TID 1500 takes the procedure from CID 100; the lumbar spine itself is in every finding site.
PROCEDURE = Code("25056-3", "LN", "MRI unspecified body region")
# Body Part Examined of the secondary capture (PS3.16 Annex L: LSPINE <-> SCT 122496007 Lumbar
# spine): an unpaired part, so General Series needs no Laterality.
BODY_PART = "LSPINE"

PRIVATE_CODES: tuple[Code, ...] = (
    SUBARTICULAR_STENOSIS,
    SEVERITY_CODES["Normal/Mild"],
    *PROBABILITY_NAMES.values(),
    DEWEIGHTED,
)


# ----------------------------------------------------------------------------------- reading


class Coded(Protocol):
    """A pydicom ``Code`` or a highdicom ``CodedConcept`` (as read back from an SR)."""

    @property
    def value(self) -> str: ...
    @property
    def scheme_designator(self) -> str: ...


def key(code: Coded) -> tuple[str, str]:
    """(scheme, value): what identifies a concept; meanings are display text and may differ."""
    return (str(code.scheme_designator), str(code.value))


_CONDITION_OF = {
    (key(CONDITION_FINDINGS[c]), None if lat is None else key(lat)): c
    for c, lat in CONDITION_LATERALITY.items()
}
_LEVEL_OF = {key(code): lv for lv, code in LEVEL_SITES.items()}
_SEVERITY_OF = {key(code): s for s, code in SEVERITY_CODES.items()}
_PROBABILITY_OF = {key(code): s for s, code in PROBABILITY_NAMES.items()}


def condition_of(finding: Coded, laterality: Coded | None = None) -> str:
    """The task's condition named by a finding type and its site's laterality (None: unpaired)."""
    found = _CONDITION_OF.get((key(finding), None if laterality is None else key(laterality)))
    if found is None:
        raise ValueError(f"no condition is coded {key(finding)} with laterality {laterality!r}")
    return found


def level_of(site: Coded) -> str:
    """The task's level named by a finding site code."""
    if key(site) not in _LEVEL_OF:
        raise ValueError(f"{key(site)} is not the code of a graded level")
    return _LEVEL_OF[key(site)]


def severity_of(code: Coded) -> str:
    """The task's severity named by a grade code."""
    if key(code) not in _SEVERITY_OF:
        raise ValueError(f"{key(code)} is not the code of a grade")
    return _SEVERITY_OF[key(code)]


def probability_of(name: Coded) -> str:
    """The severity whose probability a measurement name codes."""
    if key(name) not in _PROBABILITY_OF:
        raise ValueError(f"{key(name)} is not the name of a grade probability")
    return _PROBABILITY_OF[key(name)]


# ------------------------------------------------------------------------------- one task's codes


@dataclass(frozen=True)
class TaskCodes:
    """Every coded concept of one task's SR, and the way back from codes to its targets.

    ``findings`` and ``laterality`` per condition (a condition is told apart by the pair),
    ``grade_name`` the qualitative evaluation's concept name, ``grades`` and ``probabilities``
    per condition one code per grade (the grade, and the measurement name of its probability),
    ``private`` the codes of the private scheme among them.
    """

    findings: Mapping[str, Code]
    laterality: Mapping[str, Code | None]
    grade_name: Code
    grades: Mapping[str, tuple[Code, ...]]
    probabilities: Mapping[str, tuple[Code, ...]]
    private: tuple[Code, ...]

    def condition_of(self, finding: Coded, laterality: Coded | None = None) -> str:
        """The condition named by a finding type and its site's laterality (None: unpaired)."""
        want = (key(finding), None if laterality is None else key(laterality))
        for c, code in self.findings.items():
            lat = self.laterality[c]
            if (key(code), None if lat is None else key(lat)) == want:
                return c
        raise ValueError(f"no condition is coded {key(finding)} with laterality {laterality!r}")

    def grade_of(self, condition: str, code: Coded) -> int:
        """Index of ``condition``'s grade named by a grade code."""
        for i, g in enumerate(self.grades[condition]):
            if key(g) == key(code):
                return i
        raise ValueError(f"{key(code)} is not the code of a grade of {condition}")

    def probability_of(self, condition: str, name: Coded) -> int:
        """Index of the grade whose probability a measurement name codes."""
        for i, g in enumerate(self.probabilities[condition]):
            if key(g) == key(name):
                return i
        raise ValueError(f"{key(name)} is not the name of a {condition} grade probability")


def _stem(name: str, width: int) -> str:
    """A private code value from a condition's name, at most ``width`` characters: the name in
    capitals, or its first ``width - 3`` and a short hash of the whole name (stable: the same
    condition name is the same code in every run and version)."""
    upper = name.upper()
    if len(upper) <= width:
        return upper
    return upper[: width - 3] + hashlib.sha1(name.encode()).hexdigest()[:3].upper()


# The concept name of another task's grade: no standard names "grade" of an arbitrary scale
# (SCT Severity would misstate Pfirrmann's, which grades degeneration, not severity).
GRADE = private("GRADE", "Grade")


@functools.cache
def codes_for(task: Task) -> TaskCodes:
    """The codes of ``task``'s SR. RSNA 2024's are the standard ones above. Another task's
    conditions and grades take the codes its ``task.yaml`` gives (``code``, ``grade_codes``: e.g.
    SNOMED CT's, which the task's author can check and we cannot offline); those it does not give
    get private codes derived from their names. The sides keep the standard laterality, the levels
    the standard discs of CID 7604, and a grade's probability a private measurement name."""
    if task.is_rsna:
        return TaskCodes(
            findings=CONDITION_FINDINGS, laterality=CONDITION_LATERALITY, grade_name=SEVERITY,
            grades={c: tuple(SEVERITY_CODES[s] for s in SEVERITIES) for c in CONDITIONS},
            probabilities={c: tuple(PROBABILITY_NAMES[s] for s in SEVERITIES) for c in CONDITIONS},
            private=PRIVATE_CODES,
        )  # fmt: skip
    findings, laterality, grades, probabilities = {}, {}, {}, {}
    for c in task.conditions:
        # Code Value holds 16 characters: the grades' codes append "_G<k>" to a shorter stem.
        stem = _stem(c.name, 12)
        findings[c.name] = Code(*c.code) if c.code else private(_stem(c.name, 16), c.title)
        laterality[c.name] = SIDE_CODES[c.side] if c.side else None
        grades[c.name] = (
            tuple(Code(*g) for g in c.grade_codes)
            if c.grade_codes
            else tuple(
                private(f"{stem}_G{i + 1}", f"{c.title}: {g}") for i, g in enumerate(c.grades)
            )
        )
        if len(set(map(key, grades[c.name]))) != len(c.grades):
            raise ValueError(f"task {task.name!r}: two grades of {c.name} share one code")
        probabilities[c.name] = tuple(
            private(f"{stem}_P{i + 1}", f"Probability of {c.title}: {g}")
            for i, g in enumerate(c.grades)
        )
    values = [key(v) for v in findings.values()]
    if len(set(zip(values, laterality.values(), strict=True))) != len(values):
        raise ValueError(f"task {task.name!r}: two conditions would share one code and side")
    every = (
        *findings.values(), GRADE, *(g for gs in grades.values() for g in gs),
        *(p for ps in probabilities.values() for p in ps), DEWEIGHTED,
    )  # fmt: skip
    private_codes = tuple(c for c in every if c.scheme_designator == PRIVATE_SCHEME)
    return TaskCodes(findings, laterality, GRADE, grades, probabilities, private_codes)
