"""The SR's codes against their sources: PS3.16's context groups (pydicom's copy of them).

A wrong digit in a SNOMED code is invisible in a viewer (it shows the meaning we wrote) but makes a
registry count the finding as something else; these tests compare every DICOM-listed code with the
standard, and check that every target can be told apart, and read back, by its codes alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.sr.codedict import codes

from spinegrade.reporting import codes as sg
from spinegrade.task import (
    CONDITION_SIDE,
    CONDITIONS,
    LABEL_COLUMNS,
    LEVEL_TITLES,
    LEVELS,
    SEVERITIES,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def in_group(code, cid) -> bool:
    """Whether the context group lists this very code (scheme and value) with this meaning."""
    return any(
        (c.scheme_designator, c.value) == sg.key(code) and c.meaning.lower() == code.meaning.lower()
        for c in cid.concepts.values()
    )


def test_levels_are_the_discs_of_cid_7604() -> None:
    for lv in LEVELS:
        site = sg.LEVEL_SITES[lv]
        assert in_group(site, codes.CID7604), (lv, site)
        assert site.meaning == f"{LEVEL_TITLES[lv]} disc"  # the disc of this level, not a neighbour
    assert sg.key(sg.LEVEL_SITES["l5_s1"]) == sg.key(codes.CID7604.L5S1Disc)


def test_grades_sides_and_procedure_are_from_their_context_groups() -> None:
    for severity in ("Moderate", "Severe"):
        assert in_group(sg.SEVERITY_CODES[severity], codes.CID3832)  # Stenosis Grade
        assert in_group(sg.SEVERITY_CODES[severity], codes.CID3716)  # Severity
    for side, code in sg.SIDE_CODES.items():
        assert in_group(code, codes.CID244), side  # Laterality
    assert sg.key(sg.SEVERITY) == sg.key(codes.SCT.Severity)
    assert in_group(sg.PROCEDURE, codes.CID100)  # TID 1500 Procedure Reported


def test_sides_follow_the_task() -> None:
    for c in CONDITIONS:
        side = CONDITION_SIDE[c]
        lat = sg.CONDITION_LATERALITY[c]
        assert (lat is None) == (side is None), c
        if side is not None:
            assert lat.meaning.lower() == side


def test_every_target_is_read_back_from_its_codes_alone() -> None:
    seen = set()
    for column in LABEL_COLUMNS:
        condition, level = column[:-6], column[-5:]
        finding, lat = sg.CONDITION_FINDINGS[condition], sg.CONDITION_LATERALITY[condition]
        site = sg.LEVEL_SITES[level]
        seen.add((sg.key(finding), lat and sg.key(lat), sg.key(site)))
        assert sg.condition_of(finding, lat) == condition and sg.level_of(site) == level
    assert len(seen) == len(LABEL_COLUMNS)  # no two targets share their codes
    for s in SEVERITIES:
        assert sg.severity_of(sg.SEVERITY_CODES[s]) == s
        assert sg.probability_of(sg.PROBABILITY_NAMES[s]) == s
    with pytest.raises(ValueError):  # a paired finding without its side is not a target
        sg.condition_of(sg.FORAMINAL_STENOSIS)
    with pytest.raises(ValueError):
        sg.level_of(codes.CID7604.T12L1Disc)


def test_private_codes_are_few_listed_and_documented() -> None:
    tables = [
        *sg.CONDITION_FINDINGS.values(),
        *sg.LEVEL_SITES.values(),
        *sg.SIDE_CODES.values(),
        *sg.SEVERITY_CODES.values(),
        *sg.PROBABILITY_NAMES.values(),
        sg.DEWEIGHTED,
        sg.SEVERITY,
        sg.PROCEDURE,
    ]
    private = {sg.key(c) for c in tables if c.scheme_designator == sg.PRIVATE_SCHEME}
    assert private == {sg.key(c) for c in sg.PRIVATE_CODES}
    readme = README.read_text(encoding="utf-8")
    for c in sg.PRIVATE_CODES:
        assert f"`{c.value}`" in readme, f"README does not list the private code {c.value}"
        assert len(c.value) <= 16  # Code Value (SH), which every viewer reads
    for c in tables:
        assert len(c.meaning) <= 64, c  # Code Meaning is LO
    with pytest.raises(ValueError):
        sg.private("A_VERY_LONG_PRIVATE_CODE", "too long for Code Value")
