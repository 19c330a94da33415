"""Latent degeneration and the reader model of the phantom: where labels and their truth come from.

Every (study, condition, level, side) cell has a latent continuous severity ``z`` on a scale where
the Moderate threshold is 0 and the Severe threshold is 1. The anatomy is drawn from ``z`` (see
:func:`anatomical_severity`); the label is what a reader says after looking at that anatomy, and
readers disagree near the thresholds: an ordinal probit,

    P(grade >= Moderate | z) = Phi(z / s_r),   P(Severe | z) = Phi((z - 1) / s_r),

with reader noise ``s_r``. So the true class probabilities of every cell are known exactly; they
are the best any model can do from images that show ``z`` perfectly (the Bayes limit).

``z`` is a correlated Gaussian with the shape of the real RSNA labels (rsna-stats.md): a study-wide
degeneration factor, a per-level factor shared by all conditions at that level, a factor shared by
the spinal canal and both recesses of a level (they narrow together), an AR(1) chain along the
levels of each condition and side, a left/right factor per level, and idiosyncratic noise. The mean
and spread of each cell are solved so that its marginal P(>= Moderate) and P(Severe) match the real
per-level tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

from spinegrade.task import (
    CLASS_WEIGHTS,
    COLUMN_CONDITION,
    COLUMN_LEVEL,
    CONDITION_GROUP,
    CONDITION_SIDE,
    CONDITIONS,
    LABEL_COLUMNS,
    LEVELS,
)

# Real per-level marginals, L1/L2 -> L5/S1 (rsna-stats.md): (P(>= Moderate), P(Severe)).
LEVEL_TARGETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "spinal": ((0.045, 0.103, 0.178, 0.249, 0.035), (0.011, 0.027, 0.062, 0.129, 0.010)),
    "foraminal": ((0.036, 0.090, 0.230, 0.388, 0.359), (0.004, 0.005, 0.021, 0.069, 0.101)),
    "subarticular": ((0.071, 0.173, 0.330, 0.549, 0.286), (0.014, 0.042, 0.099, 0.234, 0.082)),
}


@dataclass(frozen=True)
class LabelModel:
    """Knobs of the latent-severity and reader model (variance shares of the standardised latent).

    The defaults were fitted (random + local search on 3,000 simulated studies) to the real
    correlations and per-study counts of rsna-stats.md: adjacent levels r ~0.32 (real 0.40),
    left/right 0.44 (0.41), other condition 0.39 (0.36), spinal-subarticular 0.53 (0.5-0.6),
    13% of studies all Normal/Mild (12.9%), 50% without a Severe cell (50.4%), 18% with a
    Severe spinal level (18.5%), 5.6 cells >= Moderate per study (5.6).
    """

    reader_sd: float = 0.5  # probit noise of the reader, in units of the Moderate->Severe gap
    w_study: float = 0.30  # study-wide degeneration factor
    w_level: float = 0.38  # one factor per level shared by all five conditions, AR(1) over levels
    level_rho: float = 0.6  # correlation of the level factor between adjacent levels
    w_canal: float = 0.15  # spinal + both subarticular at a level (central and lateral canal)
    w_chain: float = 0.15  # AR(1) along the levels of one condition and side
    chain_rho: float = 0.5  # correlation of the chain between adjacent levels
    # the rest (1 - sum of the shares) is idiosyncratic per cell

    def __post_init__(self) -> None:
        shares = (self.w_study, self.w_level, self.w_canal, self.w_chain)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError(f"LabelModel variance shares must be >= 0 and sum to <= 1: {shares}")
        if self.reader_sd <= 0:
            raise ValueError("LabelModel.reader_sd must be > 0")
        if not (0 <= self.level_rho < 1 and 0 <= self.chain_rho < 1):
            raise ValueError("LabelModel level_rho and chain_rho must lie in [0, 1)")


def cell_mean_scale(reader_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """(25,) mean and spread of the latent ``z`` per label column, matching LEVEL_TARGETS.

    With ``z = mu + scale * xi`` (xi ~ N(0, 1)) and the probit reader, the marginal
    P(>= Moderate) is Phi(mu / tau) and P(Severe) is Phi((mu - 1) / tau) with
    tau = sqrt(scale^2 + reader_sd^2): two equations, two unknowns per column.
    """
    mu, scale = np.zeros(len(LABEL_COLUMNS)), np.zeros(len(LABEL_COLUMNS))
    for j, col in enumerate(LABEL_COLUMNS):
        group = CONDITION_GROUP[COLUMN_CONDITION[col]]
        li = LEVELS.index(COLUMN_LEVEL[col])
        p_mod, p_sev = LEVEL_TARGETS[group][0][li], LEVEL_TARGETS[group][1][li]
        a, b = ndtri(p_mod), ndtri(p_sev)
        tau = 1.0 / (a - b)
        if tau <= reader_sd:
            raise ValueError(f"reader_sd {reader_sd} too large for column {col} (tau {tau:.2f})")
        mu[j], scale[j] = a * tau, np.sqrt(tau**2 - reader_sd**2)
    return mu, scale


def _ar1(rng: np.random.Generator, shape: tuple[int, ...], rho: float) -> np.ndarray:
    """Stationary unit-variance AR(1) series along the last axis (the five levels)."""
    eps = rng.standard_normal(shape)
    out = np.empty(shape)
    out[..., 0] = eps[..., 0]
    for k in range(1, shape[-1]):
        out[..., k] = rho * out[..., k - 1] + np.sqrt(1 - rho**2) * eps[..., k]
    return out


def _standard_latents(rng: np.random.Generator, n: int, m: LabelModel) -> np.ndarray:
    """(n, 25) correlated standard normal latents (unit variance per cell), condition-major."""
    n_lv = len(LEVELS)
    study = rng.standard_normal((n, 1))
    level = _ar1(rng, (n, n_lv), m.level_rho)
    canal = rng.standard_normal((n, n_lv))
    chains = _ar1(rng, (n, len(CONDITIONS), n_lv), m.chain_rho)
    idio = rng.standard_normal((n, len(CONDITIONS), n_lv))
    xi = np.empty((n, len(CONDITIONS), n_lv))
    for c, cond in enumerate(CONDITIONS):
        # Central canal and recesses share their narrowing (disc bulge, flavum); foramina do not.
        w_canal = m.w_canal if CONDITION_GROUP[cond] != "foraminal" else 0.0
        w_idio = 1.0 - m.w_study - m.w_level - w_canal - m.w_chain
        xi[:, c] = (
            np.sqrt(m.w_study) * study
            + np.sqrt(m.w_level) * level
            + np.sqrt(w_canal) * canal
            + np.sqrt(m.w_chain) * chains[:, c]
            + np.sqrt(w_idio) * idio[:, c]
        )
    return xi.reshape(n, len(LABEL_COLUMNS))


def sample_latents(rng: np.random.Generator, n: int, model: LabelModel) -> np.ndarray:
    """(n, 25) latent severities ``z`` (0 = Moderate threshold, 1 = Severe threshold)."""
    mu, scale = cell_mean_scale(model.reader_sd)
    return mu + scale * _standard_latents(rng, n, model)


def class_probs(z: np.ndarray, reader_sd: float) -> np.ndarray:
    """(..., 3) true probabilities of Normal/Mild, Moderate, Severe given the latent ``z``."""
    p_ge1 = ndtr(z / reader_sd)
    p_sev = ndtr((z - 1.0) / reader_sd)
    return np.stack([1.0 - p_ge1, p_ge1 - p_sev, p_sev], axis=-1)


def sample_grades(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """Integer grades 0/1/2 drawn from ``probs`` (..., 3): one reader's reading of each cell."""
    u = rng.random(probs.shape[:-1])
    return (u[..., None] > np.cumsum(probs, axis=-1)[..., :2]).sum(axis=-1)


def weighted_optimal(probs: np.ndarray) -> np.ndarray:
    """The submission that minimises the competition's expected *weighted* log loss.

    With sample weights 1/2/4 by the true class, the expected loss of a prediction q is
    sum_k w_k p_k (-ln q_k) (up to the normaliser), which is smallest at q proportional to w_k p_k:
    this, not ``probs`` itself, is the Bayes-optimal submission for the metric.
    """
    q = probs * np.asarray(CLASS_WEIGHTS)
    return q / q.sum(axis=-1, keepdims=True)


def anatomical_severity(z: np.ndarray) -> np.ndarray:
    """Map the latent ``z`` to the anatomical narrowing fraction in [0, 1] that the renderer draws.

    Smooth and strictly increasing, close to linear over the range that decides the grade
    (z in [-1.5, 2.5]): about 0.08 far below Moderate, 0.35 at the Moderate threshold, 0.65 at the
    Severe threshold, 0.93 well above it. So "Moderate" looks the same at every level and side.
    """
    return 1.0 / (1.0 + np.exp(-1.25 * (np.asarray(z, dtype=float) - 0.5)))


def side_of(column: str) -> str | None:
    """'left', 'right' or None (spinal) for a label column."""
    return CONDITION_SIDE[COLUMN_CONDITION[column]]
