"""From a probability map to five ordered disc levels: peaks, ordered assignment, the disc chain."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _local_maxima(prob: np.ndarray, k: int, radius: int) -> list[tuple[int, int]]:
    """Up to ``k`` peaks of a 2D map, each at least ``radius`` cells from the ones before."""
    work, peaks = prob.copy(), []
    for _ in range(k):
        y, x = np.unravel_index(int(np.argmax(work)), work.shape)
        if work[y, x] <= 0:
            break
        peaks.append((int(y), int(x)))
        work[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1] = 0
    return peaks


def _ordered_assignment(score: np.ndarray, ys: np.ndarray, min_gap: float) -> list[int] | None:
    """Best candidate per level, head to feet, each ``min_gap`` below the one above (DP).

    ``score`` (levels, candidates) log-probabilities, ``ys`` candidate rows (canonical y grows
    towards the feet). Returns candidate indices, or None when no ordered choice exists.
    """
    n_lv, n_c = score.shape
    best = np.full((n_lv, n_c), -np.inf)
    back = np.zeros((n_lv, n_c), dtype=np.int64)
    best[0] = score[0]
    for j in range(1, n_lv):
        for c in range(n_c):
            above = [
                p for p in range(n_c) if ys[c] - ys[p] >= min_gap and np.isfinite(best[j - 1, p])
            ]
            if above:
                p = max(above, key=lambda q: best[j - 1, q])
                best[j, c], back[j, c] = best[j - 1, p] + score[j, c], p
    if not np.isfinite(best[-1]).any():
        return None
    path = [int(np.argmax(best[-1]))]
    for j in range(n_lv - 1, 0, -1):
        path.append(int(back[j, path[-1]]))
    return path[::-1]


def _disc_chain(
    inplane: np.ndarray,
    group: Sequence[int],
    min_gap: float,
    window: int,
    prior: np.ndarray | None = None,
    prior_sd: float = 0.0,
) -> list[tuple[int, int]] | None:
    """Levels named by counting discs: ``len(group)`` neighbouring disc candidates, head to feet.

    Candidates are the peaks of the levels' pooled map ("a disc is here"), at distinct heights
    at least ``1.4 * min_gap`` apart (~21 mm: neighbouring discs are a vertebral body, >= 20 mm,
    apart; a disc and its endplates or the body beside it must not count as two discs).
    Adjacent labels are adjacent discs, so the levels take a run of consecutive candidates, the
    run whose per-level maps agree best. A level thus never
    skips a disc or shares one, and the names follow the order of the discs in the image (the
    whole chain moves together) rather than each level's own guess of its height. None when
    fewer candidates than levels are found. ``prior`` (rows per target, NaN = none) with
    ``prior_sd`` (cells) adds a Gaussian log-vote for the runs whose discs lie near those rows:
    another look's idea of where each level is.
    """
    pooled = inplane[list(group)].sum(0)
    spacing = 1.4 * min_gap
    peaks = _local_maxima(pooled, 3 * len(group), max(window, int(0.7 * min_gap)))
    if not peaks:
        return None
    floor = 0.02 * pooled[peaks[0]]
    kept: list[tuple[int, int]] = []
    for c in peaks:  # strongest first
        if pooled[c] >= floor and all(abs(c[0] - k[0]) >= spacing for k in kept):
            kept.append(c)
    if len(kept) < len(group):
        return None
    kept.sort()
    score = np.log(np.array([[_window_sum(inplane[j], c, 1) for c in kept] for j in group]) + 1e-12)
    n = len(group)
    totals = [sum(score[i, k + i] for i in range(n)) for k in range(len(kept) - n + 1)]
    if prior is not None and prior_sd > 0:
        want = np.asarray(prior, dtype=np.float64)[list(group)]
        for k in range(len(totals)):
            ys = np.array([kept[k + i][0] for i in range(n)], dtype=np.float64)
            d = ((ys - want) / prior_sd)[np.isfinite(want)]
            totals[k] -= 0.5 * float((d**2).sum())
    k = int(np.argmax(totals))
    return kept[k : k + n]


def decode_levels(
    logits: np.ndarray,
    groups: Sequence[Sequence[int]],
    min_gap: float,
    window: int = 2,
    chain: bool = False,
    prior: np.ndarray | None = None,
    prior_sd: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joint logits (T, S, h, w) -> (slice, y, x) per target in heatmap cells.

    Each group (the five levels of one side) is decoded together: candidate discs are the peaks
    of every level's in-plane map, and the levels are assigned to distinct candidates in
    head-to-feet order at least ``min_gap`` cells apart (a disc cannot be two levels, and L1/L2
    lies above L2/L3). Without this, a level whose own map is unsure tends to fall onto the
    neighbouring disc, the commonest large error of a heatmap localiser. With ``chain`` the
    levels take consecutive discs (:func:`_disc_chain`, which ``prior`` rows per target with
    ``prior_sd`` cells inform), falling back to the ordered assignment when too few discs are
    seen.
    """
    t, s, h, w = logits.shape
    flat = logits.reshape(t, -1)
    prob = np.exp(flat - flat.max(1, keepdims=True))
    prob = (prob / prob.sum(1, keepdims=True)).reshape(t, s, h, w)
    inplane = prob.sum(1)  # (T, h, w): each level's map, slices marginalised
    z, y, x = np.zeros(t), np.zeros(t), np.zeros(t)
    for group in groups:
        run = _disc_chain(inplane, group, min_gap, window, prior, prior_sd) if chain else None
        if run is not None:
            for j, c in zip(group, run, strict=True):
                z[j], y[j], x[j] = refine_peak(prob[j], c, window)
            continue
        cands = sorted({p for j in group for p in _local_maxima(inplane[j], 3, window)})
        ys = np.array([c[0] for c in cands], dtype=np.float64)
        score = np.log(
            np.array([[_window_sum(inplane[j], c, 1) for c in cands] for j in group]) + 1e-12
        )
        path = _ordered_assignment(score, ys, min_gap)
        for k, j in enumerate(group):
            c = (
                cands[path[k]]
                if path is not None
                else np.unravel_index(np.argmax(inplane[j]), (h, w))
            )
            z[j], y[j], x[j] = refine_peak(prob[j], c, window)
    return z, y, x


def _window_sum(m: np.ndarray, c: tuple[int, int], r: int) -> float:
    return float(m[max(0, c[0] - r) : c[0] + r + 1, max(0, c[1] - r) : c[1] + r + 1].sum())


def refine_peak(prob: np.ndarray, c, r: int) -> tuple[float, float, float]:
    """Most probable slice near candidate ``c``, then the probability-weighted point there."""
    y0, x0 = max(0, int(c[0]) - r), max(0, int(c[1]) - r)
    patch = prob[:, y0 : int(c[0]) + r + 1, x0 : int(c[1]) + r + 1]
    z = int(np.argmax(patch.sum((1, 2))))
    p = patch[z] / max(float(patch[z].sum()), 1e-12)
    gy, gx = np.indices(p.shape)
    return float(z), float((p * gy).sum() + y0), float((p * gx).sum() + x0)
