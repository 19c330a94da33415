"""Looks at a stack: the whole field, a zoomed look at the spine, close looks at the canal."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from spinegrade.localization.decode import decode_levels, refine_peak
from spinegrade.localization.frames import SagittalFrame, canonical_volume
from spinegrade.preprocessing.cache import CachedStack
from spinegrade.task import LEVELS


def _decode_look(
    heat: np.ndarray,
    look: SagittalFrame,
    groups,
    mm_y: float,
    min_gap_mm: float,
    decoder: str = "ordered",
    prior_y: np.ndarray | None = None,
    prior_mm: float = 0.0,
):
    """Heatmaps (T, S, h, w) of one look -> full-resolution canonical (z, y, x) per target.

    ``prior_y`` (full-resolution canonical rows per target, e.g. the whole look's) votes on the
    chain's run of discs with a Gaussian of SD ``prior_mm`` (see :func:`.decode._disc_chain`).
    """
    hh, ww = heat.shape[-2:]
    y0, x0, lh, lw = look.view_window()
    cell_y, cell_x = lh / hh, lw / ww  # full-resolution pixels per heatmap cell
    prior = None if prior_y is None else (np.asarray(prior_y) - y0 + 0.5) / cell_y - 0.5
    zc, yc, xc = decode_levels(
        heat, groups, min_gap_mm / (mm_y * cell_y), chain=decoder == "chain", prior=prior,
        prior_sd=prior_mm / (mm_y * cell_y),
    )  # fmt: skip
    z, y, x = zc + look.z0, (yc + 0.5) * cell_y - 0.5, (xc + 0.5) * cell_x - 0.5
    return z, y + y0, x + x0


# How far a close look may move a level (mm): about a third of the distance between neighbouring
# discs (~35 mm), so that a level refined by it stays on the disc the zoomed look named.
FINE_SEARCH_MM = 12.0


def _decode_fine(
    heat: np.ndarray, group: Sequence[int], look: SagittalFrame, mm_y: float, window: int = 2
) -> tuple[float, float]:
    """A close look's heatmaps (T, S, h, w), centred on one level's estimate -> in-plane (y, x).

    The close look sees two or three discs, and which of them is which level is unsure there;
    the naming was settled by the zoomed look. So the maps of the side's levels (``group``) are
    pooled into "a disc is here", and the point moves to the pooled peak nearest the centre,
    at most :data:`FINE_SEARCH_MM` away, refined there. The slice stays the zoomed look's: that
    look sees the spine's whole width, the close look a few centimetres around one level (on
    the demo's 5 folds, keeping it: right slice of the canal 83 -> 86%, foramina 74 -> 76%).
    """
    s, hh, ww = heat.shape[1:]
    flat = heat[list(group)].reshape(len(group), -1)
    prob = np.exp(flat - flat.max(1, keepdims=True))
    prob = (prob / prob.sum(1, keepdims=True)).sum(0).reshape(s, hh, ww)
    y0, x0, lh, lw = look.view_window()
    cell_y, cell_x = lh / hh, lw / ww
    gy, gx = np.indices((hh, ww))
    r = FINE_SEARCH_MM / (mm_y * cell_y)  # cells (pixels are square in mm)
    near = (gy - (hh - 1) / 2) ** 2 + (gx - (ww - 1) / 2) ** 2 <= r**2
    c = np.unravel_index(int(np.argmax(np.where(near, prob.sum(0), -1.0))), (hh, ww))
    _, yc, xc = refine_peak(prob, c, window)  # in-plane, on the close look's clearest slice
    return (yc + 0.5) * cell_y - 0.5 + y0, (xc + 0.5) * cell_x - 0.5 + x0


class LookCache:
    """Network inputs of looks that several folds take alike, cut once.

    Every fold's whole look at a stack is the same volume, and so is its zoomed look once the
    folds agree on where to centre it (:func:`.localize.localize_consensus`); only the close looks,
    centred on each fold's own levels, differ. An ensemble passes one cache to all its folds for
    those two looks; thread-safe, as folds may run side by side. Holds the volumes until dropped.
    """

    def __init__(self) -> None:
        self._volumes: dict[tuple[int, SagittalFrame], tuple[CachedStack, np.ndarray]] = {}
        self._lock = threading.Lock()

    def volume(self, stack: CachedStack, look: SagittalFrame) -> np.ndarray:
        """:func:`canonical_volume` of ``stack`` through ``look``, cut on first use."""
        key = (id(stack), look)  # the stack is kept with its volume, so its id stays its own
        with self._lock:
            hit = self._volumes.get(key)
            if hit is None:
                hit = self._volumes[key] = (stack, canonical_volume(stack, look))
        return hit[1]


def _run_looks(
    net: nn.Module,
    stacks: Sequence[CachedStack],
    looks: Sequence[SagittalFrame],
    batch_size: int,
    cache: LookCache | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(index, heatmaps (T, S, h, w)) of each (stack, look); looks of one input shape share a pass.

    Volumes are cut a batch at a time (or taken from ``cache``) and heatmaps handed on as they
    come, so memory holds one batch whatever the number of stacks (a fold of the RSNA set at
    256 px: ~400 stacks, each with five close looks). Only the heatmaps are computed
    (:meth:`.LevelLocalizer.heatmaps`): the looks decode them, not the training read-out.
    """
    from spinegrade.models.registry import device_of

    device = device_of(net)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, look in enumerate(looks):  # canonical_volume's shape: (n_slices, size, size)
        by_shape.setdefault((look.n_slices, look.size), []).append(i)
    for idx in by_shape.values():
        for j in range(0, len(idx), batch_size):
            part = idx[j : j + batch_size]
            vols = [
                canonical_volume(stacks[i], looks[i])
                if cache is None
                else cache.volume(stacks[i], looks[i])
                for i in part
            ]
            heat = net.eval().heatmaps(torch.from_numpy(np.stack(vols)).to(device))
            yield from zip(part, heat.float().cpu().numpy(), strict=True)


@torch.no_grad()
def locate_in_stacks(
    net: nn.Module,
    stacks: Sequence[CachedStack],
    frames: Sequence[SagittalFrame],
    zoom: float,
    batch_size: int = 8,
    min_gap_mm: float = 15.0,
    decoder: str = "ordered",
    fine: float = 0.0,
    centres: Sequence[tuple[float, float] | None] | None = None,
    cache: LookCache | None = None,
    vote_mm: float = 0.0,
    votes: Sequence[np.ndarray | None] | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Targets' full-resolution canonical (z, y, x) of each stack, each (T,): a whole look, then a
    zoomed one, then (``fine`` > 0) one close look per level.

    The zoomed look is centred on the middle of the first look's points (:func:`look_centre`),
    so that the top and bottom levels (L1/L2 and L5/S1 lie ~15 cm apart) both stay inside its
    window; ``centres`` (full-resolution canonical (y, x) per stack, e.g. several folds'
    consensus, see :func:`localize_consensus`) replace the whole look of the stacks they are
    given for (None: its own whole look). Levels are
    decoded in groups of five (one per side) with :func:`decode_levels`; the close looks only
    refine each level where the zoomed look named it (see :func:`_decode_fine`). Each look's
    volumes of equal shape go through the network ``batch_size`` at a time (the same numbers up
    to float rounding; a batch only shares the pass). ``cache`` holds the whole and zoomed looks'
    volumes for other folds (:class:`LookCache`). With ``vote_mm`` > 0 (chain decoder) the whole
    look's rows of the levels vote on which run of discs the zoomed look names: a stack's own
    whole look, or ``votes`` (full-resolution canonical rows per target, e.g. the folds' median)
    where a centre was given.
    """
    n_targets = int(net.n_targets)
    groups = [list(range(i, i + len(LEVELS))) for i in range(0, n_targets, len(LEVELS))]
    mm_y = [
        s.spacing[1] if f.transpose else s.spacing[0] for s, f in zip(stacks, frames, strict=True)
    ]
    zoomed = 0 < zoom < 1
    given = list(centres) if centres is not None and zoomed else [None] * len(stacks)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [(np.zeros(0),) * 3] * len(stacks)
    whole = [i for i, c in enumerate(given) if c is None]  # stacks that need their own look
    sub = [stacks[i] for i in whole], [frames[i] for i in whole]
    for q, h in _run_looks(net, *sub, batch_size, cache):
        i = whole[q]
        found[i] = _decode_look(h, frames[i], groups, mm_y[i], min_gap_mm, decoder)
    if zoomed:
        mids = [c if c is not None else look_centre(f) for c, f in zip(given, found, strict=True)]
        looks = [f.zoomed(*c, zoom) for f, c in zip(frames, mids, strict=True)]
        # The whole look's levels vote on which run of discs the zoomed look names (vote_mm > 0).
        given_votes = list(votes) if votes is not None else [None] * len(stacks)
        rows = [
            (f[1] if len(f[1]) else v) if vote_mm > 0 else None
            for f, v in zip(found, given_votes, strict=True)
        ]
        for i, h in _run_looks(net, stacks, looks, batch_size, cache):
            found[i] = _decode_look(
                h, looks[i], groups, mm_y[i], min_gap_mm, decoder, rows[i], vote_mm
            )
    if not 0 < fine < 1:
        return found
    # One close look per level (shared by its left and right targets), centred on the estimate.
    jobs = [(i, [g[lv] for g in groups]) for i in range(len(stacks)) for lv in range(len(LEVELS))]
    close = [
        _close_look(frames[i], found[i], js, fine, single_side=len(groups) == 1) for i, js in jobs
    ]
    out = [tuple(v.copy() for v in f) for f in found]
    for q, h in _run_looks(net, [stacks[i] for i, _ in jobs], close, batch_size):
        i, js = jobs[q]
        for j, g in zip(js, groups, strict=True):
            out[i][1][j], out[i][2][j] = _decode_fine(h, g, close[q], mm_y[i])
    for i in range(len(stacks)):
        _keep_levels_apart(out[i], found[i], groups, min_gap_mm / mm_y[i])
    return out  # type: ignore[return-value]


# Slices each side of the level's slice that a canal's close look reads. The close look moves a
# level in-plane only (its slice is the zoomed look's, see _decode_fine), and the canal lies on
# the midline, so the slices far lateral of it only cost time. Two each side keep the network's
# neighbour channels and some slice context around the canal.
CLOSE_SLICES = 2


def _close_look(
    frame: SagittalFrame,
    found: tuple[np.ndarray, np.ndarray, np.ndarray],
    targets: Sequence[int],
    fine: float,
    single_side: bool,
) -> SagittalFrame:
    """The close look at one level: ``fine`` of the field centred on its ``targets``' points.

    A single-sided task (the canal) reads only the slices near the level's slice; a paired one
    (left and right foramina share the look) keeps the whole stack, as both sides need it.
    """
    z, y, x = (np.asarray(v)[list(targets)] for v in found)
    look = frame.zoomed(float(np.mean(y)), float(np.mean(x)), fine)
    if not single_side or frame.n_slices <= 2 * CLOSE_SLICES + 1:
        return look
    n = 2 * CLOSE_SLICES + 1
    lo, hi = frame.z0, frame.z0 + frame.n_slices - n  # the sub-stack stays inside the frame's
    z0 = int(np.clip(round(float(np.mean(z))) - CLOSE_SLICES, lo, hi))
    return dataclasses.replace(look, z0=z0, n_slices=n)


def look_centre(found: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Middle (y, x) of a look's located targets: where the next, zoomed look is centred."""
    _, y, x = found
    return float(np.min(y) + np.max(y)) / 2, float(np.min(x) + np.max(x)) / 2


def _keep_levels_apart(fine, coarse, groups, min_gap: float) -> None:
    """Undo close-look moves that put two neighbouring levels on one disc (in place).

    Between two discs, the close looks of both neighbours can snap to the same disc. While a
    pair of neighbouring levels lies less than ``min_gap`` (full-resolution pixels) apart along
    the spine, the level that the close look moved further goes back to its zoomed-look point.
    """
    for g in groups:
        moved = np.hypot(fine[1][g] - coarse[1][g], fine[2][g] - coarse[2][g])
        back = np.zeros(len(g), dtype=bool)
        for _ in range(len(g)):
            ys = fine[1][g]
            bad = [k for k in range(len(g) - 1) if ys[k + 1] - ys[k] < min_gap]
            if not bad:
                break
            k = bad[0]
            cand = [m for m in (k, k + 1) if not back[m]]
            if not cand:
                break
            m = max(cand, key=lambda q: moved[q])
            back[m] = True
            for a in range(3):
                fine[a][g[m]] = coarse[a][g[m]]
