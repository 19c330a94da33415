"""Clinician-facing probabilities: the class-weight lean removed, in the report as in the SR."""

from __future__ import annotations

import numpy as np

from spinegrade.reporting.clinical import deweight
from spinegrade.reporting.report import StudyPrediction, grades_payload
from spinegrade.task import LABEL_COLUMNS


def test_deweight_undoes_the_class_weight_lean() -> None:
    # The weighted-loss optimum is q ~ w * p: de-weighting a q built that way returns p.
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    q = p * np.array([1.0, 2.0, 4.0])
    q /= q.sum(axis=1, keepdims=True)
    assert np.allclose(deweight(q), p)
    assert np.allclose(deweight(q).sum(axis=1), 1.0)


def test_grades_json_keeps_the_metric_values_and_adds_the_clinical_ones() -> None:
    probs = np.tile([0.8, 0.15, 0.05], (25, 1))
    probs[0] = [0.3, 0.3, 0.4]  # "Severe 40%" as trained; mostly Normal/Mild once de-weighted
    pred = StudyPrediction(1, probs, ["model"] * 25)
    t = grades_payload(pred)["targets"][LABEL_COLUMNS[0]]
    assert t["grade"] == "Severe" and t["probabilities"]["Severe"] == 0.4
    assert t["clinical"]["grade"] == "Normal/Mild"
    shown = [t["clinical"]["probabilities"][s] for s in ("Normal/Mild", "Moderate", "Severe")]
    assert np.allclose(shown, [0.3 / 0.55, 0.15 / 0.55, 0.1 / 0.55], atol=1e-6)
