"""Start a run's nets from another run's weights: ``localizer.init_from`` and ``model.init_from``.

Each key names a run folder written by ``spinegrade train`` (RUN1). With it, every fold's
stage-1 nets (``localizer``) or graders (``model``) are built from this run's config and then
take RUN1's trained weights, the whole network (backbone and heads), strictly: every tensor
present, of the same shape, none left over, and the net built with the same architecture
arguments. Anything else is an :class:`InitFromError` naming the file; a net never starts
half-loaded or silently random.

Which of RUN1's folds: fold K starts from RUN1's ``fold_K`` when RUN1 has that fold complete,
else from RUN1's lowest complete fold. A source run may have other folds than this one (another
``data.n_folds``, or only ``--folds 0`` trained): fold-for-fold is kept where it can be, and
every fold still gets a trained start. Out-of-fold scores are honest only when RUN1's fold K
held out the same studies as this run's fold K (same data, seed and ``data.n_folds``, fold for
fold); otherwise :func:`check_init_from` warns that they will be optimistic.

:func:`check_init_from` runs in :func:`spinegrade.training.cv.cross_validate` before anything
is read or trained; :func:`start_net` builds a fold's net where the stage trainers build it. The
start is recorded as the net's init source (``{"source": "run", "path", "fold", "file",
"sha256"}``), so weight sidecars, ``metrics.json["init"]`` and ``cv.json["init"]`` say where
each net started. Only the starting weights change: a fold with checkpoints resumes from them,
and the seed fixes everything else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file
from torch import nn

from spinegrade.config import Config, ConfigError
from spinegrade.inference.run_folder import fold_dir, fold_done, load_run_config
from spinegrade.localization.tasks import configured_tasks
from spinegrade.models.registry import build_grader, build_localizer
from spinegrade.models.weights import read_sidecar, sha256, weights_complete
from spinegrade.task import RSNA_2024, Task, dataset_task

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# Config section -> the prefix of its nets' weight files in a fold folder.
FILE_PREFIX = {"localizer": "localizer", "model": "grader"}

# Build arguments (a net's ``spec``) that change no tensor and no arithmetic of a trained net:
# they may differ from the source run's. Every other argument must be the same.
FREE_ARGS = frozenset({"dropout", "attn_dropout", "drop_path", "pretrained", "pretrained_path"})

# Build arguments named by another config key than ``<section>.<argument>``.
ARG_KEYS = {
    "model": {"in_slices": "crops.slices", "n_levels": "model.level_embedding"},
    "localizer": {"n_targets": "localizer.tasks (targets of the task)"},
}

# The config keys that shape each section's nets, for the error's way out.
ARCH_KEYS = {
    "model": "model.backbone, model.backbone_kwargs, model.feature_index, model.token_grid, "
    "model.dim, model.depth, model.heads, model.mlp_ratio, model.level_embedding, crops.slices",
    "localizer": "localizer.backbone, localizer.backbone_kwargs, localizer.context, "
    "localizer.decoder_channels, localizer.slice_layers, localizer.slice_heads",
}


class InitFromError(ValueError):
    """An ``init_from`` run folder that is missing, incomplete or does not fit this run's nets."""


# ------------------------------------------------------------------------------ the source run


def source_run(cfg: Config, key: str) -> Path | None:
    """The run folder ``{key}.init_from`` names (absolute), checked to be a run; None when unset."""
    raw = getattr(cfg, key).init_from
    if not raw:
        return None
    run = Path(raw).expanduser().resolve()
    if not run.is_dir():
        raise InitFromError(
            f"{key}.init_from: run folder {str(run)!r} does not exist; give the --out folder of "
            f"a finished `spinegrade train`, or drop {key}.init_from"
        )
    if not (run / "config.yaml").is_file():
        raise InitFromError(
            f"{key}.init_from: {str(run)!r} is not a run folder (no config.yaml); give the --out "
            "folder of a finished `spinegrade train`"
        )
    return run


def complete_folds(run: Path) -> list[int]:
    """The folds of ``run`` that finished (``fold_K/metrics.json``), lowest first."""
    folds = []
    for path in run.glob("fold_*"):
        suffix = path.name.removeprefix("fold_")
        if suffix.isdigit() and fold_done(run, int(suffix)):
            folds.append(int(suffix))
    return sorted(folds)


def source_fold(run: Path, fold: int | None, key: str) -> int:
    """RUN1's fold that this run's ``fold`` starts from: the same fold when RUN1 has it complete,
    else RUN1's lowest complete fold (a source run with other folds; ``fold`` None: a caller
    outside cross-validation)."""
    done = complete_folds(run)
    if not done:
        raise InitFromError(
            f"{key}.init_from: run folder {str(run)!r} has no complete fold (fold_K/metrics.json); "
            "finish it first (rerun its `spinegrade train` command)"
        )
    return fold if fold in done else done[0]


# ------------------------------------------------------------------------------ building, loading


def _build(
    cfg: Config, key: str, name: str, task: Task = RSNA_2024, seg: bool = False
) -> nn.Module:
    """This run's net of section ``key`` for localiser task / grader group ``name`` (of the
    grading ``task``); random when it will be replaced by a run's weights (its ImageNet backbone
    would be overwritten: never fetched for nothing). ``seg``: a localiser with the label maps'
    head."""
    pretrained = False if getattr(cfg, key).init_from else None
    if key == "localizer":
        loc_task = configured_tasks(cfg)[name]
        return build_localizer(cfg, n_targets=len(loc_task.targets), pretrained=pretrained, seg=seg)
    return build_grader(
        cfg, n_targets=len(task.heads(name)), n_classes=task.group_classes(name),
        pretrained=pretrained,
    )  # fmt: skip


def start_net(
    cfg: Config, key: str, name: str, fold: int | None, task: Task = RSNA_2024, seg: bool = False
) -> nn.Module:
    """The net a fold's training starts from: built from ``cfg`` (``key``: ``localizer`` for task
    ``name``, ``model`` for grader group ``name``; ``seg``: a localiser with the label maps'
    head), then, with ``{key}.init_from``, loaded with that run's weights for ``fold`` (see
    :func:`source_fold`) and recorded as its init source. A localiser started from a run keeps
    that run's net: with the head where the run's had one, whatever ``seg`` says."""
    run = source_run(cfg, key)
    if run is None:
        return _build(cfg, key, name, task, seg)
    start = source_fold(run, fold, key)
    net = _build(cfg, key, name, task, _has_seg_head(run, start, name, key))
    load_from_run(net, run, start, name, key)
    return net


def _has_seg_head(run: Path, fold: int, name: str, key: str) -> bool:
    """Whether ``run``'s fold_K localiser ``name`` was built with the label maps' head."""
    if key != "localizer":
        return False
    path = fold_dir(run, fold) / f"{FILE_PREFIX[key]}_{name}.safetensors"
    try:
        spec = read_sidecar(path).get("spec") or {}
    except Exception:  # missing or torn: load_from_run says so in its own words
        return False
    return bool((spec.get("kwargs") or {}).get("seg_classes"))


def load_from_run(net: nn.Module, run: Path, fold: int, name: str, key: str) -> dict[str, Any]:
    """Load ``run``'s ``fold_K`` weights of ``name`` into ``net`` strictly; record and return the
    init source."""
    file = f"{FILE_PREFIX[key]}_{name}.safetensors"
    path = fold_dir(run, fold) / file
    if not weights_complete(path):
        raise InitFromError(
            f"{key}.init_from: {path} is missing (with its .json sidecar): run {str(run)!r} "
            f"did not train {FILE_PREFIX[key]} {name!r} in fold {fold}; start from a run that "
            f"did, or drop {key}.init_from"
        )
    try:
        spec = read_sidecar(path).get("spec") or {}
        state = load_file(str(path), device="cpu")
    except Exception as err:  # a torn or foreign file: say which, in one line
        first = str(err).splitlines()[0][:160] if str(err) else ""
        raise InitFromError(
            f"{key}.init_from: {path} cannot be read ({err.__class__.__name__}: {first})"
        ) from err
    problems = _tensor_problems(net.state_dict(), state) + _spec_problems(net, spec, key)
    if problems:
        raise InitFromError(
            f"{key}.init_from: {path} does not fit this run's {FILE_PREFIX[key]} {name!r}: "
            + "; ".join(problems)
            + f". Build it as {run / 'config.yaml'} does (same {ARCH_KEYS[key]}), or drop "
            f"{key}.init_from"
        )
    net.load_state_dict(state, strict=True)
    record = {
        "source": "run", "path": str(run), "fold": fold, "file": file, "sha256": sha256(path),
    }  # fmt: skip
    getattr(net, "encoder", net).init_source = record  # read by weights.init_source
    return record


def _tensor_problems(own: dict[str, Any], state: dict[str, Any]) -> list[str]:
    """Missing, unexpected and other-shaped tensors of a file against a net, a few of each."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} there, {tuple(own[k].shape)} here"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    found = [("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)]
    return [f"{len(v)} tensors {what} ({_some(v)})" for what, v in found if v]


def _spec_problems(net: nn.Module, spec: dict[str, Any], key: str) -> list[str]:
    """Build arguments that differ from the source net's: same tensors, other arithmetic (e.g.
    ``heads``, or ``tf_efficientnet_lite0`` vs ``efficientnet_lite0``) is not the same net."""
    theirs = spec.get("kwargs") or {}
    ours = (getattr(net, "spec", None) or {}).get("kwargs") or {}
    if not theirs or not ours:  # a sidecar without a spec: the tensors alone decide
        return []
    differ = [
        f"{ARG_KEYS[key].get(arg, f'{key}.{arg}')} {theirs.get(arg)!r} there, {value!r} here"
        for arg, value in ours.items()
        if arg not in FREE_ARGS and theirs.get(arg) != value
    ]
    return [f"built with {_some(differ)}"] if differ else []


def _some(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ------------------------------------------------------------------------------ the check


def check_init_from(
    cfg: Config,
    folds: Iterable[int] | None = None,
    run_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Check ``localizer.init_from`` / ``model.init_from`` before anything is read or trained.

    Each named folder must be a run with a complete fold; for every fold this run trains
    (``folds``, else ``train.folds``, else all ``data.n_folds``) the source fold's file of every
    configured task / grader group must exist and load strictly into a freshly built net.
    Raises :class:`InitFromError` naming the folder or file. The paths in ``cfg`` are made
    absolute (as ``data.data_dir`` is), so the run's config.yaml names them wherever it is read.
    Warns when the source run's folds cannot be this run's (other data, seed or ``n_folds``, or a
    fold taken from another fold): the out-of-fold scores would be optimistic.
    Returns ``{key: source run}`` for the keys that are set.
    """
    wanted = sorted(
        set(folds if folds is not None else (cfg.train.folds or range(cfg.data.n_folds)))
    )
    task = dataset_task(data_dir or cfg.data.data_dir)
    names = {
        "localizer": list(configured_tasks(cfg)),
        "model": task.select_groups(cfg.train.groups),
    }
    out: dict[str, Path] = {}
    for key in ("localizer", "model"):
        run = source_run(cfg, key)
        if run is None:
            continue
        if run_dir is not None and Path(run_dir).resolve() == run:
            raise InitFromError(
                f"{key}.init_from: {str(run)!r} is the run being trained (--out); start from "
                "another run folder"
            )
        getattr(cfg, key).init_from = str(run)
        out[key] = run
        starts = {k: source_fold(run, k, key) for k in wanted}
        for name in names[key]:
            for fold in sorted(set(starts.values())):
                net = _build(cfg, key, name, task, _has_seg_head(run, fold, name, key))
                load_from_run(net, run, fold, name, key)
        _warn_if_leaky(cfg, key, run, starts, data_dir, run_dir)
    return out


def leaked_studies(
    ours: pd.DataFrame, theirs: pd.DataFrame, starts: dict[int, int]
) -> dict[int, list[int]]:
    """This run's fold -> the studies it validates on that its start (the source run's fold
    ``starts[fold]``) trained on: those the source run has, in another fold."""
    fold_there = dict(zip(theirs["study_id"].astype(int), theirs["fold"].astype(int), strict=True))
    out: dict[int, list[int]] = {}
    for sid, k in zip(ours["study_id"].astype(int), ours["fold"].astype(int), strict=True):
        there = fold_there.get(sid)
        if k in starts and there is not None and there != starts[k]:
            out.setdefault(k, []).append(sid)
    return out


def _warn_if_leaky(
    cfg: Config,
    key: str,
    run: Path,
    starts: dict[int, int],
    data_dir: str | Path | None,
    run_dir: str | Path | None = None,
) -> None:
    """A fold whose start was trained on studies this fold validates on makes optimistic OOF
    scores: say so (it is a legitimate start, e.g. for a new data set, so not an error).

    Where both runs' ``folds.csv`` are there (this run's written ahead, e.g. the demo's disc
    grades take the demo run's folds of the real spines, or a resumed run), the studies are
    compared one by one; otherwise the runs' data folder, seed and fold count.
    """
    from spinegrade.rsna import load_folds

    ours = Path(run_dir) / "folds.csv" if run_dir is not None else None
    if ours is not None and ours.is_file() and (run / "folds.csv").is_file():
        leaked = leaked_studies(load_folds(ours), load_folds(run / "folds.csv"), starts)
        if leaked:
            n = sum(len(v) for v in leaked.values())
            log.warning(
                "%s.init_from %s: %d studies this run validates on (fold %s) trained the "
                "fold it starts from; this run's out-of-fold scores will be optimistic",
                key, run, n, ", fold ".join(str(k) for k in sorted(leaked)),
            )  # fmt: skip
        return
    try:
        theirs = load_run_config(run)
    except (ConfigError, OSError) as err:
        where = run / "config.yaml"
        raise InitFromError(f"{key}.init_from: {where} cannot be read: {err}") from err
    ours_data = Path(data_dir or cfg.data.data_dir).resolve()
    other = [
        f"{what} {a!r} there, {b!r} here"
        for what, a, b in (
            ("data", str(Path(theirs.data.data_dir).resolve()), str(ours_data)),
            ("seed", theirs.seed, cfg.seed),
            ("data.n_folds", theirs.data.n_folds, cfg.data.n_folds),
        )
        if a != b
    ]
    crossed = [f"{k} starts from its fold {j}" for k, j in starts.items() if k != j]
    why = ([f"its folds were made differently ({'; '.join(other)})"] if other else []) + (
        [f"this run's fold {', fold '.join(crossed)}"] if crossed else []
    )
    if why:
        log.warning(
            "%s.init_from %s: %s, so a fold may start from weights trained on studies it "
            "validates on; this run's out-of-fold scores will be optimistic",
            key,
            run,
            "; ".join(why),
        )
