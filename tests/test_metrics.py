"""The competition metric against values computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from spinegrade.cli import app
from spinegrade.evaluation.metrics import (
    SubmissionError,
    best_constant_probs,
    best_constant_submission,
    prior_submission,
    score_frames,
    uniform_submission,
)
from spinegrade.task import LABEL_COLUMNS, PROB_COLUMNS, row_id, submission_row_ids


def _labels(rows: dict[int, dict[str, str]], default: str | None = "Normal/Mild") -> pd.DataFrame:
    recs = []
    for sid, cells in rows.items():
        rec: dict[str, object] = {"study_id": sid}
        for c in LABEL_COLUMNS:
            rec[c] = cells.get(c, default)
        recs.append(rec)
    return pd.DataFrame(recs)


def _submission(studies: list[int], probs: dict[str, list[float]], default: list[float]):
    ids = submission_row_ids(studies)
    data = [probs.get(r, default) for r in ids]
    df = pd.DataFrame(data, columns=list(PROB_COLUMNS))
    df.insert(0, "row_id", ids)
    return df


def test_uniform_is_ln3_and_any_term_by_hand() -> None:
    labels = _labels({1: {}, 2: {"spinal_canal_stenosis_l4_l5": "Severe"}})
    sub = uniform_submission([1, 2])
    res = score_frames(labels, sub)
    assert res["spinal"] == pytest.approx(math.log(3))
    assert res["foraminal"] == pytest.approx(math.log(3))
    assert res["subarticular"] == pytest.approx(math.log(3))
    # any-severe: study 1 y=0 w=1, study 2 y=1 w=4, p=1/3 for both.
    expected_any = (1 * -math.log(2 / 3) + 4 * -math.log(1 / 3)) / 5
    assert res["any_severe_spinal"] == pytest.approx(expected_any)
    assert res["score"] == pytest.approx((3 * math.log(3) + expected_any) / 4)


def test_weighted_log_loss_by_hand_with_normalisation() -> None:
    # One study; spinal l1_l2 Moderate (w=2) predicted (.2, .2, .4) -> normalised (.25, .25, .5).
    labels = _labels({7: {"spinal_canal_stenosis_l1_l2": "Moderate"}})
    rid = row_id(7, "spinal_canal_stenosis_l1_l2")
    sub = _submission([7], {rid: [0.2, 0.2, 0.4]}, default=[0.8, 0.1, 0.1])
    res = score_frames(labels, sub)
    spinal = (2 * -math.log(0.25) + 4 * -math.log(0.8)) / (2 + 4)
    assert res["spinal"] == pytest.approx(spinal)
    assert res["foraminal"] == pytest.approx(-math.log(0.8))
    # No severe spinal level: y=0, weight = max spinal weight = 2, p = max SUBMITTED severe = 0.4
    # (the host does not renormalise for this term; renormalised it would be 0.5).
    assert res["any_severe_spinal"] == pytest.approx(-math.log(1 - 0.4))


def _unnormalised_case() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Study 3: spinal L4/L5 Moderate, left foraminal L5/S1 Severe, the rest Normal/Mild.

    Every row is (.5, .5, .5) (sums to 1.5) except spinal L4/L5, (.6, .3, .3) (sums to 1.2).
    """
    labels = _labels(
        {
            3: {
                "spinal_canal_stenosis_l4_l5": "Moderate",
                "left_neural_foraminal_narrowing_l5_s1": "Severe",
            }
        }
    )
    rid = row_id(3, "spinal_canal_stenosis_l4_l5")
    return labels, _submission([3], {rid: [0.6, 0.3, 0.3]}, default=[0.5, 0.5, 0.5])


def test_rows_not_summing_to_one_score_as_the_host_metric(tmp_path) -> None:
    labels, sub = _unnormalised_case()
    res = score_frames(labels, sub)
    # Condition terms: rows renormalised, (.5, .5, .5) -> 1/3 each, (.6, .3, .3) -> (.5, .25, .25).
    spinal = (4 * 1 * -math.log(1 / 3) + 2 * -math.log(0.25)) / (4 * 1 + 2)
    foraminal = (9 * 1 * -math.log(1 / 3) + 4 * -math.log(1 / 3)) / (9 + 4)  # = ln 3
    subarticular = -math.log(1 / 3)
    # any_severe_spinal: no Severe spinal level (y=0); weight = max spinal weight = 2 (Moderate);
    # p = max over the five spinal rows of the submitted severe, as it is: max(.5, .3) = .5.
    any_severe = 2 * -math.log(1 - 0.5) / 2
    expected = {
        "spinal": spinal,
        "foraminal": foraminal,
        "subarticular": subarticular,
        "any_severe_spinal": any_severe,
        "score": (spinal + foraminal + subarticular + any_severe) / 4,
    }
    assert res == pytest.approx(expected)

    # Renormalising first (what spinegrade used to do) changes only the any-severe term:
    # p = max(1/3, .25) = 1/3, so -ln(2/3) instead of -ln(1/2).
    probs = sub[list(PROB_COLUMNS)]
    renormalised = sub.assign(**(probs.div(probs.sum(axis=1), axis=0)))
    res_renorm = score_frames(labels, renormalised)
    assert res_renorm["spinal"] == pytest.approx(spinal)
    assert res_renorm["any_severe_spinal"] == pytest.approx(-math.log(2 / 3))
    assert res_renorm["score"] == pytest.approx(
        expected["score"] - (math.log(2) - math.log(1.5)) / 4
    )

    # The evaluate command scores the CSV file the same way.
    labels.to_csv(tmp_path / "train.csv", index=False)
    sub.to_csv(tmp_path / "sub.csv", index=False)
    args = ["evaluate", str(tmp_path / "sub.csv"), "--labels", str(tmp_path / "train.csv")]
    out = CliRunner().invoke(app, [*args, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == pytest.approx(expected)


def test_rows_are_clipped_before_they_are_renormalised() -> None:
    # sklearn's log_loss clips to [1e-15, 1 - 1e-15] and then divides by the row sum: a value above
    # 1 is capped first, so (2, 1, 1) scores as (1/3, 1/3, 1/3), not (.5, .25, .25).
    labels = _labels({5: {}})
    sub = _submission([5], {}, default=[2.0, 1.0, 1.0])
    res = score_frames(labels, sub)
    assert res["spinal"] == pytest.approx(math.log(3))
    # And the any-severe term clips the raw max severe (1.0) to 1 - 1e-15: confidently wrong.
    assert res["any_severe_spinal"] == pytest.approx(-math.log(1e-15), rel=1e-3)


def test_no_severe_spinal_study_and_exact_zero_one_predictions() -> None:
    labels = _labels({1: {}, 2: {}})
    # Perfectly confident and right: every term is the clip floor, ~1e-15.
    sub = _submission([1, 2], {}, default=[1.0, 0.0, 0.0])
    res = score_frames(labels, sub)
    for term in ("spinal", "foraminal", "subarticular", "any_severe_spinal"):
        assert 0 <= res[term] < 1e-12
    # Perfectly confident and wrong: -ln(1e-15) ≈ 34.54 for every scored row.
    wrong = _submission([1, 2], {}, default=[0.0, 0.0, 1.0])
    res = score_frames(labels, wrong)
    assert res["spinal"] == pytest.approx(-math.log(1e-15))
    # 1 - (1 - 1e-15) is 1.11e-15 in float64, hence the looser tolerance of the binary term.
    assert res["any_severe_spinal"] == pytest.approx(-math.log(1e-15), rel=1e-4)


def test_empty_cells_are_not_scored() -> None:
    labels = _labels({1: {"left_subarticular_stenosis_l1_l2": None}})
    rid = row_id(1, "left_subarticular_stenosis_l1_l2")
    # A terrible prediction on the empty cell must not change the score.
    sub = _submission([1], {rid: [0.0, 0.0, 1.0]}, default=[0.5, 0.25, 0.25])
    res = score_frames(labels, sub)
    assert res["subarticular"] == pytest.approx(-math.log(0.5))


def test_bad_submissions_are_clear_errors() -> None:
    labels = _labels({1: {}})
    good = uniform_submission([1])
    with pytest.raises(SubmissionError, match="missing 1 row"):
        score_frames(labels, good.iloc[1:])
    with pytest.raises(SubmissionError, match="not in the labels"):
        score_frames(labels, uniform_submission([1, 2]))
    nan = good.copy()
    nan.loc[3, "moderate"] = np.nan
    with pytest.raises(SubmissionError, match="NaN"):
        score_frames(labels, nan)
    neg = good.copy()
    neg.loc[0, "severe"] = -0.1
    with pytest.raises(SubmissionError, match="negative"):
        score_frames(labels, neg)
    # Non-strict mode ignores extra rows (out-of-fold subsets).
    assert score_frames(labels, uniform_submission([1, 2]), strict=False)["score"] > 0


def test_best_constant_beats_prior_and_uniform() -> None:
    rng = np.random.default_rng(0)
    cells = {}
    for sid in range(60):
        cells[sid] = {
            c: ["Normal/Mild", "Moderate", "Severe"][rng.choice(3, p=[0.75, 0.17, 0.08])]
            for c in LABEL_COLUMNS
        }
    labels = _labels(cells)
    ids = list(labels["study_id"])
    u = score_frames(labels, uniform_submission(ids))["score"]
    p = score_frames(labels, prior_submission(labels, ids))["score"]
    b = score_frames(labels, best_constant_submission(labels, ids))["score"]
    # With weights 1/2/4 the plain prior can be worse than uniform; the best constant beats both.
    assert b < p and b < u
    probs = best_constant_probs(labels)
    assert probs.shape == (25, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_evaluate_cli_json_and_text(tmp_path) -> None:
    labels = _labels({1: {"spinal_canal_stenosis_l5_s1": "Severe"}, 2: {}})
    labels.to_csv(tmp_path / "train.csv", index=False)
    uniform_submission([1, 2]).to_csv(tmp_path / "sub.csv", index=False)
    runner = CliRunner()
    args = ["evaluate", str(tmp_path / "sub.csv"), "--labels", str(tmp_path / "train.csv")]
    out = runner.invoke(app, [*args, "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert set(res) == {"spinal", "foraminal", "subarticular", "any_severe_spinal", "score"}
    assert res["spinal"] == pytest.approx(math.log(3))
    text = runner.invoke(
        app, ["evaluate", str(tmp_path / "sub.csv"), "--labels", str(tmp_path / "train.csv")]
    )
    assert text.exit_code == 0 and "score" in text.output
    uniform_submission([1]).to_csv(tmp_path / "short.csv", index=False)
    bad = runner.invoke(
        app, ["evaluate", str(tmp_path / "short.csv"), "--labels", str(tmp_path / "train.csv")]
    )
    assert bad.exit_code != 0
    assert "short.csv" in bad.output and "missing" in bad.output
