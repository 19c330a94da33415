"""Folds: study-grouped, severity-stratified, deterministic, saved as data; `spinegrade folds`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from label_factory import random_labels, write_train
from spinegrade.cli import app
from spinegrade.rsna import (
    MISSING_LABEL,
    RSNAFormatError,
    fold_strata,
    fold_summary,
    load_folds,
    load_train,
    make_folds,
    matrix_to_wide,
    save_folds,
    severity_profile,
)
from spinegrade.task import GROUPS, SEVERITIES


def test_folds_cover_every_study_once_balanced_and_deterministic() -> None:
    codes = random_labels(203, seed=6)
    wide = matrix_to_wide(np.arange(203) * 7 + 1000, codes)
    folds = make_folds(wide, n_folds=5, seed=42)
    assert list(folds.columns) == ["study_id", "fold"]
    assert sorted(folds["study_id"]) == sorted(wide["study_id"]) and folds["study_id"].is_unique
    sizes = folds["fold"].value_counts().sort_index()
    assert list(sizes.index) == [0, 1, 2, 3, 4] and sizes.max() - sizes.min() <= 1
    pd.testing.assert_frame_equal(make_folds(wide, 5, 42), folds)
    shuffled = wide.sample(frac=1.0, random_state=1)  # row order must not matter
    pd.testing.assert_frame_equal(make_folds(shuffled, 5, 42), folds)
    assert not make_folds(wide, 5, 7)["fold"].equals(folds["fold"])


def test_strata_are_large_enough() -> None:
    wide = matrix_to_wide(np.arange(60), random_labels(60, seed=8))
    strata = fold_strata(wide, n_folds=5)
    assert strata.value_counts().min() >= 5
    assert strata.nunique() > 1  # the profile still splits 60 studies


@pytest.mark.parametrize("n", [5, 10, 11])
def test_folds_for_tiny_sets(n: int) -> None:
    wide = matrix_to_wide(np.arange(n), random_labels(n, seed=n))
    folds = make_folds(wide, n_folds=5, seed=0)
    sizes = folds["fold"].value_counts()
    assert sorted(sizes.index) == [0, 1, 2, 3, 4] and sizes.max() - sizes.min() <= 1


def test_fold_errors() -> None:
    wide = matrix_to_wide(np.arange(4), random_labels(4))
    with pytest.raises(ValueError, match="4 studies cannot fill 5 folds"):
        make_folds(wide, n_folds=5)
    with pytest.raises(ValueError, match="at least 2"):
        make_folds(wide, n_folds=1)
    with pytest.raises(ValueError, match="appears twice"):
        make_folds(pd.concat([wide, wide]), n_folds=2)


def _imbalance(wide: pd.DataFrame, fold: np.ndarray) -> float:
    """Spread across folds of how many studies have each worst grade per metric group."""
    profile = severity_profile(wide)
    total = 0.0
    for group in GROUPS:
        counts = pd.crosstab(fold, profile[group].to_numpy())
        total += float(counts.std(axis=0, ddof=0).sum())
    return total


def test_stratification_beats_random_on_a_skewed_set() -> None:
    n = 150
    codes = np.zeros((n, 25), dtype=np.int64)
    codes[:15, 3] = 2  # 10% severe spinal stenosis at L4/L5: the any-severe term hinges on these
    codes[15:45, 14] = 1  # 20% moderate right foraminal narrowing at L5/S1
    codes[45:51, 18] = 2  # 4% severe left subarticular stenosis at L4/L5
    wide = matrix_to_wide(np.arange(n), codes)
    rng = np.random.default_rng(0)
    stratified, random = [], []
    for seed in range(10):
        folds = make_folds(wide, n_folds=5, seed=seed)
        stratified.append(_imbalance(wide, folds["fold"].to_numpy()))
        random.append(_imbalance(wide, rng.permutation(np.arange(n) % 5)))
        severe = fold_summary(wide, folds)["severe_spinal_studies"]
        assert severe.tolist() == [3] * 5
    assert np.mean(stratified) < 0.25 * np.mean(random)


def test_fold_summary_counts(tmp_path: Path) -> None:
    codes = random_labels(30, seed=9)
    wide = matrix_to_wide(np.arange(30), codes)
    folds = make_folds(wide, n_folds=3, seed=1)
    summary = fold_summary(wide, folds)
    assert summary["studies"].sum() == 30
    assert summary[list(SEVERITIES)].to_numpy().sum() == int((codes >= 0).sum())
    assert summary["missing"].sum() == int((codes == MISSING_LABEL).sum())
    assert summary["severe_spinal_studies"].sum() == int((codes[:, :5] == 2).any(axis=1).sum())
    path = save_folds(folds, tmp_path / "run" / "folds.csv")
    pd.testing.assert_frame_equal(load_folds(path, study_ids=wide["study_id"]), folds)
    with pytest.raises(RSNAFormatError, match="1 studies have no fold"):
        load_folds(path, study_ids=[*wide["study_id"], 999])
    with pytest.raises(ValueError, match="without a fold"):
        fold_summary(wide, folds.iloc[1:])


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def test_cli_folds_writes_csv_and_prints_table(tmp_path: Path) -> None:
    codes = random_labels(40, seed=10)
    write_train(tmp_path / "train.csv", list(range(500, 540)), codes)
    out = tmp_path / "folds.csv"
    args = ["folds", str(tmp_path), "--out", str(out), "--n-folds", "4", "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    folds = load_folds(out)
    wide = load_train(tmp_path / "train.csv")
    pd.testing.assert_frame_equal(folds, make_folds(wide, n_folds=4, seed=3))
    assert "40 studies in 4 folds" in result.output and "all" in result.output
    assert "Severe" in result.output


def test_cli_folds_reports_bad_input(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["folds", str(tmp_path), "--out", str(tmp_path / "f.csv")])
    assert result.exit_code == 2 and "train.csv" in result.output
    write_train(tmp_path / "train.csv", [1, 2, 3], random_labels(3))
    result = CliRunner().invoke(app, ["folds", str(tmp_path), "--out", str(tmp_path / "f.csv")])
    assert result.exit_code == 2 and "3 studies cannot fill 5 folds" in result.output
