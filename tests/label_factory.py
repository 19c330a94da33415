"""Small, realistic RSNA label sets for the tests: label codes shaped like the real data, CSVs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spinegrade.rsna import MISSING_LABEL, matrix_to_wide


def random_labels(n: int, seed: int = 0, first_id: int = 1000) -> np.ndarray:
    """(n, 25) codes shaped like the real data: a per-study degeneration factor, worse low down."""
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(n, 1))
    level_effect = np.tile([-1.5, -1.0, -0.4, 0.3, 0.1], 5)  # L1/L2 .. L5/S1, per condition
    score = factor + level_effect + rng.normal(scale=0.8, size=(n, 25))
    codes = np.digitize(score, [0.9, 2.0])  # ~75% Normal/Mild, ~17% Moderate, ~8% Severe
    # Axial stacks often miss the upper discs: empty subarticular cells at L1/L2.
    gap = rng.random(n) < 0.1
    codes[gap, 15] = MISSING_LABEL
    codes[gap, 20] = MISSING_LABEL
    return codes


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    lines = [",".join(header)] + [",".join("" if v is None else str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_train(path: Path, ids: list[int], codes: np.ndarray) -> Path:
    matrix_to_wide(ids, codes).to_csv(path, index=False)
    return path
