"""The one submission builder: row order, values by column, and the baselines built with it."""

from __future__ import annotations

import numpy as np

from spinegrade.evaluation.metrics import constant_submission
from spinegrade.rsna.submission import submission_frame
from spinegrade.task import LABEL_COLUMNS, PROB_COLUMNS, submission_row_ids

# One study's rows in the sample submission's order, written out: row ids sort as strings, so
# the conditions come alphabetically (left before right before spinal), each level top down.
ONE_STUDY = [
    f"{c}_{lv}"
    for c in ("left_neural_foraminal_narrowing", "left_subarticular_stenosis",
              "right_neural_foraminal_narrowing", "right_subarticular_stenosis",
              "spinal_canal_stenosis")
    for lv in ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
]  # fmt: skip
# Where a few columns sit in a study's (25, 3) array: conditions as in train.csv (spinal first,
# then left/right foramina, left/right subarticular), five levels each.
ROW_OF = {
    "spinal_canal_stenosis_l1_l2": 0,
    "spinal_canal_stenosis_l5_s1": 4,
    "left_neural_foraminal_narrowing_l1_l2": 5,
    "right_neural_foraminal_narrowing_l4_l5": 13,
    "left_subarticular_stenosis_l3_l4": 17,
    "right_subarticular_stenosis_l5_s1": 24,
}


def test_submission_rows_follow_the_sample_submission_order() -> None:
    probs = {sid: np.tile([0.7, 0.2, 0.1], (25, 1)) for sid in (44036939, 4003253, 1000)}
    probs[1000][ROW_OF["spinal_canal_stenosis_l1_l2"]] = [0.1, 0.1, 0.8]
    sub = submission_frame(probs)
    assert list(sub.columns) == ["row_id", "normal_mild", "moderate", "severe"]
    by_hand = [f"{s}_{c}" for s in (1000, 4003253, 44036939) for c in ONE_STUDY]
    assert sub["row_id"].tolist() == by_hand
    assert submission_row_ids([44036939, 1000, 4003253]) == by_hand
    row = sub.set_index("row_id").loc["1000_spinal_canal_stenosis_l1_l2"]
    assert row.tolist() == [0.1, 0.1, 0.8]
    assert (sub.iloc[:, 1:].to_numpy() == [0.7, 0.2, 0.1]).all(axis=1).sum() == 74


def test_every_column_keeps_its_own_probabilities_and_numpy_ids_work() -> None:
    rng = np.random.default_rng(0)
    probs = {np.int64(s): rng.dirichlet([1, 1, 1], size=25) for s in (7, 12)}
    sub = submission_frame(probs).set_index("row_id")
    for sid, p in probs.items():
        for j, col in enumerate(LABEL_COLUMNS):
            assert sub.loc[f"{sid}_{col}"].tolist() == p[j].tolist()
        for col, j in ROW_OF.items():
            assert sub.loc[f"{sid}_{col}"].tolist() == p[j].tolist()


def test_constant_baselines_put_each_columns_probabilities_on_every_study() -> None:
    # Row j of the constant table is (j, 25 - j, 100) / 125: its values name the column.
    j = np.arange(25.0)
    column_probs = np.stack([j, 25 - j, np.full(25, 100.0)], axis=1) / 125
    const = constant_submission([30, 10, 20], column_probs)
    assert const["row_id"].tolist() == [f"{s}_{c}" for s in (10, 20, 30) for c in ONE_STUDY]
    assert list(const.columns[1:]) == list(PROB_COLUMNS)
    values = const.set_index("row_id")
    for study in (10, 20, 30):
        for col, row in ROW_OF.items():
            assert values.loc[f"{study}_{col}"].tolist() == [row / 125, (25 - row) / 125, 0.8]
    # Every study's block is the same 25 rows.
    blocks = const.iloc[:, 1:].to_numpy().reshape(3, 25, 3)
    assert (blocks == blocks[0]).all()
