"""The run folder: its layout, the config it keeps, its folds and where each fold lives.

Run folder (self-contained: prediction rebuilds everything from it)::

    RUN_DIR/config.yaml            resolved config (data and cache folders included)
    RUN_DIR/folds.csv              study_id,fold,source,patient_id (made once, then reused)
    RUN_DIR/fold_K/                one per fold; a fold is complete when metrics.json exists
        localizer_{spinal,foraminal}.safetensors + .json, localizer_geometry.json
        grader_{spinal,foraminal,subarticular}.safetensors + .json
        grader_{group}.m{K}.safetensors + .json   the group's further members (train.members)
        fallback.json              training-fold constant for targets no series can show
        log.jsonl                  a runtime line (world size, device), then one line per stage
                                   and epoch (loss, val metrics, speed, steps)
        oof.csv, oof_points.csv, localizer_errors.csv, metrics.json
        checkpoints/               per-epoch checkpoints while a stage trains (removed after)
    RUN_DIR/oof.csv, oof_points.csv, localizer_errors.csv, cv.json   by :func:`.cv.merge_run`

A run folder keeps one config: calls that train its folds may differ only in where and how they
run (:data:`RUNTIME_KEYS`), so folds can be trained on different machines and merged.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from spinegrade.config import Config, ConfigError, load_config, save_config
from spinegrade.task import RSNA_2024, TASK_FILE, Task, load_task, save_task

if TYPE_CHECKING:
    from spinegrade.util.runtime import Runtime

# Config keys that say where and how a run executes, not what it trains: they may differ
# between the calls that train the folds of one run folder.
RUNTIME_KEYS = frozenset(
    f"train.{k}"
    for k in ("folds", "fold_workers", "num_workers", "accelerator", "strategy",
              "amp", "channels_last", "eval_batch_size", "log_every", "eval_every", "ddp_timeout_s")
)  # fmt: skip


def fold_dir(run_dir: Path, fold: int) -> Path:
    """``RUN_DIR/fold_K``."""
    return Path(run_dir) / f"fold_{fold}"


def grader_file(folder: Path, group: str, member: int = 0) -> Path:
    """Where a fold keeps ``group``'s grader: member 0 where runs always kept it, the others
    (``train.members``) beside it as ``grader_{group}.m{member}.safetensors``."""
    suffix = f".m{member}" if member else ""
    return Path(folder) / f"grader_{group}{suffix}.safetensors"


def fold_done(run_dir: Path, fold: int) -> bool:
    """A fold is complete when its ``metrics.json`` exists (written last)."""
    return (fold_dir(run_dir, fold) / "metrics.json").is_file()


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config of a run folder."""
    return load_config(Path(run_dir) / "config.yaml")


def write_or_check_config(cfg: Config, run_dir: Path) -> None:
    """Save the resolved config; a run folder keeps one config.

    Only where and how it runs may differ between calls (which folds, devices, workers,
    precision), so folds can be trained on different machines and merged.
    """
    path = run_dir / "config.yaml"
    if path.is_file():
        old = _flat(load_config(path).to_dict())
        new = _flat(cfg.to_dict())
        keys = sorted((set(old) | set(new)) - RUNTIME_KEYS)
        diff = [k for k in keys if old.get(k) != new.get(k)]
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
            raise ConfigError(
                f"{path} holds a run with another config ({shown}); use the same config and "
                "data to continue it, or a new --out folder"
            )
        return
    save_config(cfg, path)


def write_or_check_task(task: Task, run_dir: Path) -> None:
    """Record what the run grades (``task.yaml``); a run folder keeps one task."""
    path = run_dir / TASK_FILE
    if path.is_file():
        old = load_task(path)
        if old != task:
            raise ConfigError(
                f"{path}: the run grades task {old.name!r}, its data now {task.name!r}; use the "
                "same data to continue it, or a new --out folder"
            )
        return
    save_task(task, path)


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested config dict -> ``{"section.key": value}`` (backbone kwargs stay one value)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "backbone_kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def ensure_folds(
    run_dir: Path,
    labels: pd.DataFrame,
    cfg: Config,
    runtime: Runtime,
    studies: pd.DataFrame | None = None,
    task: Task = RSNA_2024,
) -> pd.DataFrame:
    """The run's folds.csv: made once (seeded; stratified by source and severity, grouped by
    patient; ``studies``: study_id, source, patient_id), then reused."""
    from spinegrade.rsna import load_folds, make_folds, save_folds

    path = run_dir / "folds.csv"
    if runtime.is_main and not path.is_file():
        save_folds(make_folds(labels, cfg.data.n_folds, cfg.seed, studies, task), path)
    runtime.barrier()
    return load_folds(path, labels["study_id"].tolist())
