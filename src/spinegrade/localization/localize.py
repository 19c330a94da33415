"""Studies -> points: every study's levels located by a fold's nets, and the folds' consensus.

The canal and the foramina come from the sagittal looks (:mod:`.looks`), the recesses and any
missing canal from the learned offsets (:mod:`.derived`); in prediction every fold localises and
the folds' points are combined by their median, so one fold that names the discs a level off is
outvoted.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from spinegrade.localization.derived import derive_points, fuse_level_points
from spinegrade.localization.frames import sagittal_frame
from spinegrade.localization.localizer import Localizer
from spinegrade.localization.looks import LookCache, locate_in_stacks, look_centre
from spinegrade.localization.points import StudyPoints
from spinegrade.localization.tasks import LOCALIZER_TASKS
from spinegrade.preprocessing.cache import CachedStack


def localize_study(
    localizer: Localizer, stacks: Mapping[str, Sequence[CachedStack]]
) -> StudyPoints:
    """All 25 points of a study from its chosen stacks (description -> stacks; first = chosen).

    Networks read the sagittal series; the canal from the foramina (no T2) and the recesses come
    from the learned offsets. Points that cannot be found stay NaN (the grader then falls back).
    """
    return localize_studies(localizer, {0: stacks})[0]


# A study's centre of the levels, per localiser task: full-resolution canonical (y, x) of the task's
# chosen stack (see SagittalFrame; these coordinates depend on the stack only, so folds share them).
Centres = Mapping[int, Mapping[str, tuple[float, float]]]


def _task_stacks(
    localizer: Localizer, studies: Mapping[int, Mapping[str, Sequence[CachedStack]]], name: str
) -> list[tuple[int, CachedStack]]:
    """(study, chosen stack) of every study the localiser's ``name`` net can read."""
    task = LOCALIZER_TASKS[name]
    if localizer.nets.get(name) is None:
        return []
    return [(sid, st[task.description][0]) for sid, st in studies.items()
            if st.get(task.description)]  # fmt: skip


def first_looks(
    localizer: Localizer,
    studies: Mapping[int, Mapping[str, Sequence[CachedStack]]],
    batch_size: int = 8,
    cache: LookCache | None = None,
) -> dict[int, dict[str, np.ndarray]]:
    """Each study's whole look: the levels' full-resolution canonical rows per task, (T,).

    ``cache``: the folds' shared volumes (:class:`.looks.LookCache`)."""
    out: dict[int, dict[str, np.ndarray]] = {sid: {} for sid in studies}
    for name in LOCALIZER_TASKS:
        todo = _task_stacks(localizer, studies, name)
        if not todo:
            continue
        frames = [sagittal_frame(s, localizer.image_size, localizer.max_slices) for _, s in todo]
        found = locate_in_stacks(
            localizer.nets[name], [s for _, s in todo], frames, 0.0, batch_size,
            decoder=localizer.decoder, cache=cache,
        )  # fmt: skip
        for (sid, _), f in zip(todo, found, strict=True):
            out[sid][name] = np.stack(f)  # (3, T): z, y, x
    return out


def localize_studies(
    localizer: Localizer,
    studies: Mapping[int, Mapping[str, Sequence[CachedStack]]],
    batch_size: int = 8,
    centres: Centres | None = None,
    cache: LookCache | None = None,
    votes: Mapping[int, Mapping[str, np.ndarray]] | None = None,
) -> dict[int, StudyPoints]:
    """:func:`localize_study` for many studies, the network passes batched across studies.

    ``centres`` (study -> task -> (y, x), e.g. :func:`localize_consensus`'s) centre the zoomed
    looks of the studies and tasks they are given for, in place of the study's own whole look;
    ``votes`` (study -> task -> rows per target) are then the whole look's rows that vote on the
    zoomed look's run of discs (``localizer.vote_mm``).
    ``cache``: the folds' shared volumes (:class:`.looks.LookCache`).
    """
    found: dict[int, StudyPoints] = {sid: StudyPoints() for sid in studies}
    for name, task in LOCALIZER_TASKS.items():
        todo = _task_stacks(localizer, studies, name)
        if not todo:
            continue
        frames = [sagittal_frame(s, localizer.image_size, localizer.max_slices) for _, s in todo]
        stacks = [s for _, s in todo]
        given = [(centres or {}).get(sid, {}).get(name) for sid, _ in todo]
        rows = [(votes or {}).get(sid, {}).get(name) for sid, _ in todo]
        located = locate_in_stacks(
            localizer.nets[name],
            stacks,
            frames,
            localizer.zoom,
            batch_size,
            decoder=localizer.decoder,
            fine=localizer.fine,
            centres=given,
            cache=cache,
            vote_mm=localizer.vote_mm,
            votes=rows,
        )
        for (sid, stack), frame, (z, y, x) in zip(todo, frames, located, strict=True):
            lps = stack.voxel_to_patient(*frame.from_full(z, y, x))
            for i, (condition, level) in enumerate(task.targets):
                found[sid].set(condition, level, lps[i])
    return {
        sid: derive_points(
            fuse_level_points(p, localizer.offsets, localizer.fuse_mm, localizer.fuse_lead),
            localizer.offsets,
        )
        for sid, p in found.items()
    }


def localize_consensus(
    localizers: Sequence[Localizer],
    stacks: Mapping[str, Sequence[CachedStack]],
    map_fn: Callable[..., Iterable[Any]] = map,
) -> StudyPoints:
    """Several folds' localisers on one study -> one point per target (see
    :func:`localize_consensus_many`)."""
    return localize_consensus_many(localizers, {0: stacks}, map_fn)[0]


def localize_consensus_many(
    localizers: Sequence[Localizer],
    studies: Mapping[int, Mapping[str, Sequence[CachedStack]]],
    map_fn: Callable[..., Iterable[Any]] = map,
    batch_size: int = 8,
) -> dict[int, StudyPoints]:
    """Several folds' localisers on many studies -> one point per study and target.

    The zoomed look names the levels, and it names them by where it is centred more than by
    what it sees: centred on the true middle of the discs, the quick localisers name real
    spines far better than centred on their own whole look (BENCHMARKS.md, "Real anatomy",
    fourth round). So the folds first agree on the centre (the median of their whole looks'
    centres, which outvotes a fold whose whole look slid by a disc), every fold looks there,
    and their points are combined by :func:`consensus_points`. The same number of network
    passes as each fold localising alone; each pass takes ``batch_size`` studies' looks, and
    the whole and zoomed looks' volumes, alike for every fold, are cut once
    (:class:`.looks.LookCache`). ``map_fn`` runs the folds (e.g. a thread pool's ``map``;
    results in the folds' order, so the points do not depend on it).
    """
    if not studies:
        return {}
    cache = LookCache()
    if len(localizers) == 1 or not all(0 < loc.zoom < 1 for loc in localizers):
        per_fold = list(
            map_fn(lambda loc: localize_studies(loc, studies, batch_size, cache=cache), localizers)
        )
    else:
        own = list(map_fn(lambda loc: first_looks(loc, studies, batch_size, cache), localizers))
        shared: dict[int, dict[str, tuple[float, float]]] = {sid: {} for sid in studies}
        rows: dict[int, dict[str, np.ndarray]] = {sid: {} for sid in studies}
        for sid in studies:
            for name in LOCALIZER_TASKS:
                looks = [f[sid][name] for f in own if name in f[sid]]
                if looks:
                    cy, cx = np.median(np.array([look_centre(tuple(f)) for f in looks]), axis=0)
                    shared[sid][name] = (float(cy), float(cx))
                    rows[sid][name] = np.median(np.array([f[1] for f in looks]), axis=0)

        def look_there(loc: Localizer) -> dict[int, StudyPoints]:
            return localize_studies(
                loc, studies, batch_size, centres=shared, cache=cache, votes=rows
            )

        per_fold = list(map_fn(look_there, localizers))
    return {sid: consensus_points([p[sid] for p in per_fold]) for sid in studies}


def consensus_points(points: Sequence[StudyPoints]) -> StudyPoints:
    """Several folds' points of one study -> one point per target: the per-coordinate median.

    Folds name the discs independently, and the commonest large error on real spines is a fold
    taking a run of levels one disc too high or too low (BENCHMARKS.md, "Real anatomy"). With the
    median, a fold that did so is outvoted when the others agree (a mean would put the point
    between two discs). Targets that no fold located stay NaN.
    """
    xyz = np.stack([p.xyz for p in points])
    disc = np.stack([p.disc for p in points])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN targets: NaN, as meant
        return StudyPoints(np.nanmedian(xyz, axis=0), np.nanmedian(disc, axis=0))
