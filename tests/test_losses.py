"""Losses: hand-computed values, agreement with the competition metric, and the localiser loss."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from spinegrade.evaluation.metrics import score_frames
from spinegrade.models.localizer_net import MASKED_LOGIT
from spinegrade.task import LABEL_COLUMNS, LEVELS, PROB_COLUMNS, SEVERITIES, row_id
from spinegrade.training.losses import (
    any_severe_loss,
    any_severe_loss_grouped,
    grading_loss,
    localizer_loss,
    weighted_ce,
)


def _logits(*probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def test_weighted_ce_by_hand() -> None:
    logits = _logits([0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6])
    labels = torch.tensor([0, 2, -1])  # third row unlabelled: not scored
    # (1 * -ln 0.5 + 4 * -ln 0.8) / (1 + 4)
    expected = (-math.log(0.5) - 4 * math.log(0.8)) / 5
    assert weighted_ce(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    # Same rows with a target axis (B, T, 3) give the same value.
    assert weighted_ce(logits[None], labels[None]).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_ce_all_missing_is_zero_with_grad() -> None:
    logits = torch.randn(4, 1, 3, requires_grad=True)
    loss = weighted_ce(logits, torch.full((4, 1), -1))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_any_severe_by_hand() -> None:
    severe = torch.tensor([[0.1, 0.2, 0.6, 0.1, 0.05], [0.1, 0.3, 0.2, 0.9, 0.1]])
    labels = torch.tensor([[0, 1, 2, 0, 0], [0, 0, 1, -1, 0]])
    # Study 1: severe at L3/L4 -> target 1, weight 4, p = max = 0.6.
    # Study 2: worst Moderate -> target 0, weight 2, p = 0.3 (the unlabelled L4/L5 row is not
    # part of the metric's solution, so its 0.9 does not count).
    expected = (4 * -math.log(0.6) + 2 * -math.log(1 - 0.3)) / 6
    assert any_severe_loss(severe, labels).item() == pytest.approx(expected, rel=1e-6)
    # No labelled level at all: zero, not NaN.
    assert any_severe_loss(severe, torch.full((2, 5), -1)).item() == 0.0


def test_grouped_any_severe_equals_row_layout() -> None:
    gen = torch.Generator().manual_seed(0)
    severe = torch.rand(6, 5, generator=gen)
    labels = torch.randint(-1, 3, (6, 5), generator=gen)
    study = torch.tensor([11, 42, 7, 1000, 5, 8])[:, None].expand(6, 5)
    perm = torch.randperm(30, generator=gen)  # shuffled one-row-per-level layout
    rows = severe.flatten()[perm].clone().requires_grad_(True)
    grouped = any_severe_loss_grouped(rows, labels.flatten()[perm], study.flatten()[perm])
    assert grouped.item() == pytest.approx(any_severe_loss(severe, labels).item(), rel=1e-6)
    grouped.backward()  # the gradient reaches each study's max row, and only labelled rows
    assert (rows.grad != 0).sum() >= 1
    assert (rows.grad[labels.flatten()[perm] == -1] == 0).all()


def _metric_frames(probs: np.ndarray, grades: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Wide labels and a submission where only the spinal columns vary (others certain & right)."""
    studies = list(range(1, len(grades) + 1))
    labels = pd.DataFrame({"study_id": studies})
    rows = []
    for col in LABEL_COLUMNS:
        labels[col] = "Normal/Mild"
    for i in range(len(studies)):
        for j, lv in enumerate(LEVELS):
            col = f"spinal_canal_stenosis_{lv}"
            labels.loc[i, col] = SEVERITIES[grades[i, j]] if grades[i, j] >= 0 else None
    for i, s in enumerate(studies):
        for col in LABEL_COLUMNS:
            if col.startswith("spinal"):
                p = probs[i, LEVELS.index(col.removeprefix("spinal_canal_stenosis_"))]
            else:
                p = np.array([1.0, 0.0, 0.0])
            rows.append({"row_id": row_id(s, col), **dict(zip(PROB_COLUMNS, p, strict=True))})
    return labels, pd.DataFrame(rows)


def test_grading_loss_matches_the_competition_metric() -> None:
    gen = np.random.default_rng(3)
    probs = gen.dirichlet([2, 1, 1], size=(8, 5))
    grades = gen.integers(0, 3, size=(8, 5))
    grades[0] = 0  # a study without any severe level
    grades[1, 4] = -1  # an empty cell
    labels_wide, submission = _metric_frames(probs, grades)
    metric = score_frames(labels_wide, submission)
    logits = torch.tensor(probs).log()
    out = grading_loss(logits, torch.tensor(grades), any_severe_weight=1.0)
    assert out["ce"].item() == pytest.approx(metric["spinal"], rel=1e-6)
    assert out["any_severe"].item() == pytest.approx(metric["any_severe_spinal"], rel=1e-6)
    assert out["loss"].item() == pytest.approx(metric["spinal"] + metric["any_severe_spinal"])


def test_grading_loss_grouped_and_errors() -> None:
    logits = torch.randn(10, 1, 3, requires_grad=True)
    labels = torch.randint(0, 3, (10, 1))
    study = torch.arange(10) // 5
    out = grading_loss(logits, labels, study_index=study, any_severe_weight=0.5)
    expected = out["ce"] + 0.5 * out["any_severe"]
    assert out["loss"].item() == pytest.approx(expected.item())
    out["loss"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # Without grouping information the any-severe term needs the five levels in one row.
    with pytest.raises(ValueError, match="study_index or 5 levels"):
        grading_loss(torch.randn(4, 2, 3), torch.zeros(4, 2, dtype=torch.long), any_severe_weight=1)
    with pytest.raises(ValueError, match="T=1"):
        grading_loss(
            torch.randn(4, 5, 3),
            torch.zeros(4, 5, dtype=torch.long),
            study_index=torch.arange(4),
            any_severe_weight=1,
        )
    # Weight 0 disables the term entirely.
    assert grading_loss(logits, labels)["any_severe"].item() == 0.0


def _output(heatmaps: torch.Tensor, image_hw: tuple[int, int]) -> dict:
    b, t = heatmaps.shape[:2]
    return {
        "heatmaps": heatmaps,
        "slice_logits": torch.logsumexp(heatmaps.flatten(3), -1),
        "xy": torch.zeros(b, t, 2),
        "z": torch.zeros(b, t),
        "image_hw": image_hw,
    }


def test_localizer_loss_by_hand_single_cell() -> None:
    # One heatmap cell per slice: the in-plane term is exactly 0 and two equally likely slices
    # give a slice term of ln 2, whatever the (normalised) Gaussian target over slices.
    out = _output(torch.zeros(1, 1, 2, 1, 1), (4, 4))
    res = localizer_loss(out, torch.tensor([[[1.5, 1.5]]]), torch.tensor([[0]]), torch.ones(1, 1))
    assert res["heatmap"].item() == pytest.approx(0.0, abs=1e-7)
    assert res["slice"].item() == pytest.approx(math.log(2), rel=1e-6)


def test_localizer_loss_is_lowest_at_the_truth() -> None:
    s, h, w = 6, 16, 16
    target_xy = torch.tensor([[[22.0, 41.0]]])  # input 64 x 64 -> stride 4 -> cell (5, 10)
    target_z = torch.tensor([[3]])

    def peaked(z: int, cx: int, cy: int) -> torch.Tensor:
        heat = torch.full((1, 1, s, h, w), -8.0)
        heat[0, 0, z, cy, cx] = 8.0
        return heat

    valid = torch.ones(1, 1, dtype=torch.bool)
    right = localizer_loss(_output(peaked(3, 5, 10), (64, 64)), target_xy, target_z, valid)
    wrong_xy = localizer_loss(_output(peaked(3, 12, 2), (64, 64)), target_xy, target_z, valid)
    wrong_z = localizer_loss(_output(peaked(0, 5, 10), (64, 64)), target_xy, target_z, valid)
    assert right["heatmap"] < wrong_xy["heatmap"] and right["slice"] < wrong_z["slice"]
    # Padded slices (mask logit) get no target mass even when the truth is at the stack's edge.
    padded = peaked(5, 5, 10)
    padded[0, 0, 5:] = MASKED_LOGIT
    edge = localizer_loss(_output(padded, (64, 64)), target_xy, torch.tensor([[5]]), valid)
    assert edge["slice"].item() < 10
    # Unlabelled targets (NaN coordinates) add neither loss nor NaN gradients.
    heat = peaked(3, 5, 10).repeat(1, 2, 1, 1, 1).requires_grad_(True)
    both = localizer_loss(
        _output(heat, (64, 64)),
        torch.cat([target_xy, torch.full((1, 1, 2), float("nan"))], 1).expand(1, 2, 2),
        torch.tensor([[3.0, float("nan")]]),
        torch.tensor([[True, False]]),
    )
    both["loss"].backward()
    assert torch.isfinite(heat.grad).all()
    # All unlabelled gives 0.
    none = localizer_loss(_output(peaked(0, 0, 0), (64, 64)), target_xy, target_z, ~valid)
    assert none["loss"].item() == 0.0
