"""Training data from one or more folders: every study with its source and its patient.

A run may learn from several data folders at once (the phantom and real spines imported with
``spinegrade import spider``; RSNA and a hospital's own studies), each preprocessed into its own
cache. Their tables are joined here, study ids must not collide, and every study keeps

- its **source** (a name per folder: ``phantom``, the ``source`` column of an imported set's
  ``cases.csv``, else the folder's name), recorded in folds.csv, metrics.json and cv.json and
  used to stratify the folds so that every fold validates on every source;
- its **patient** (``cases.csv``'s ``patient_id`` where a folder has one, else the study): folds
  are grouped by it, so two studies of one patient never sit on both sides of a fold.

A source whose studies have no grades teaches the localiser only. So does a source whose grades
belong to another task (its ``task.yaml``) than the run's: the run grades the task of its first
folder (RSNA 2024 where the folder has no ``task.yaml``), e.g. the phantom's 25 RSNA targets
beside SPIDER's spines, whose disc gradings another run (first folder SPIDER) learns.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from spinegrade.config import Config, ConfigError
from spinegrade.data.label_maps import stack_labels
from spinegrade.data.studies import StudyData, load_studies
from spinegrade.localization.points import add_disc_points
from spinegrade.rsna import is_phantom, label_matrix, load_dataset, normalize_coordinates
from spinegrade.rsna.label_maps import has_label_maps
from spinegrade.task import RSNA_2024, TITLE_TO_LEVEL, Task

log = logging.getLogger(__name__)

CASES_FILE = "cases.csv"  # study_id -> patient_id (+ source), written by `spinegrade import`
DISCS_FILE = "train_disc_coordinates.csv"  # labelled disc centres (imported real sets)
PHANTOM, REAL = "phantom", "real"


@dataclass(frozen=True)
class Source:
    """One training data folder and its cache."""

    name: str
    kind: str  # "phantom" (spinegrade synth) or "real" (images of real spines)
    data_dir: Path
    cache_dir: Path


def configured_sources(cfg: Config) -> list[Source]:
    """``data.data_dir``/``cache_dir`` first, then every ``data.sources`` entry, named."""
    pairs = [(cfg.data.data_dir, cfg.data.cache_dir)]
    for i, entry in enumerate(cfg.data.sources):
        if not isinstance(entry, dict) or set(entry) != {"data_dir", "cache_dir"}:
            raise ConfigError(
                f"data.sources[{i}] = {entry!r}: each source is {{data_dir: D, cache_dir: C}}"
            )
        pairs.append((entry["data_dir"], entry["cache_dir"]))
    out: list[Source] = []
    for data_dir, cache_dir in pairs:
        data_dir, cache_dir = Path(data_dir), Path(cache_dir)
        kind = PHANTOM if is_phantom(data_dir) else REAL
        name = PHANTOM if kind == PHANTOM else _declared_name(data_dir) or data_dir.name
        taken = {s.name for s in out}
        base, n = name, 2
        while name in taken:  # two folders of one kind: phantom, phantom-2
            name, n = f"{base}-{n}", n + 1
        out.append(Source(name, kind, data_dir, cache_dir))
    seen = [s.data_dir.resolve() for s in out]
    if len(set(seen)) < len(seen):
        raise ConfigError(f"the same data folder is given twice: {[str(p) for p in seen]}")
    return out


def _declared_name(data_dir: Path) -> str | None:
    """The one ``source`` named in an imported folder's cases.csv, if any."""
    cases = _read_cases(data_dir)
    if cases is None or "source" not in cases.columns:
        return None
    names = cases["source"].dropna().astype(str).unique()
    return str(names[0]) if len(names) == 1 else None


def _read_cases(data_dir: Path) -> pd.DataFrame | None:
    path = data_dir / CASES_FILE
    if not path.is_file():
        return None
    cases = pd.read_csv(path, dtype=str)
    if not {"study_id", "patient_id"} <= set(cases.columns):
        raise ValueError(
            f"{path}: needs the columns study_id and patient_id (one row per study; the "
            "patient groups the cross-validation folds)"
        )
    return cases


@dataclass
class TrainingTables:
    """The joined tables of a run's sources (package vocabulary for points)."""

    sources: list[Source]
    labels: pd.DataFrame  # wide train.csv rows of every source
    coordinates: pd.DataFrame | None  # normalize_coordinates rows
    discs: pd.DataFrame | None  # study_id, series_id, instance_number, level, x, y
    studies: pd.DataFrame  # study_id, source, patient_id (one row a study, labels' order)
    task: Task = RSNA_2024  # what the run grades (its first folder's task)

    def source_of(self) -> dict[int, str]:
        return dict(zip(self.studies["study_id"], self.studies["source"], strict=True))

    def source_ids(self, name: str) -> list[int]:
        return self.studies.loc[self.studies["source"] == name, "study_id"].tolist()

    @property
    def kinds(self) -> dict[str, str]:
        return {s.name: s.kind for s in self.sources}

    def graded_ids(self) -> list[int]:
        """Studies with at least one graded label cell (what the metric can score)."""
        return graded_ids(self.labels, self.task)


def graded_ids(labels: pd.DataFrame, task: Task = RSNA_2024) -> list[int]:
    """Studies of a wide label table with at least one graded cell."""
    codes = label_matrix(labels, task)
    return labels["study_id"][(codes >= 0).any(axis=1)].astype(int).tolist()


def load_tables(sources: Sequence[Source]) -> TrainingTables:
    """Read and join the training tables of every source; a study id in two sources is an error.

    The run's task is the first source's; other sources' grades of another task are left out.
    """
    labels, coords, discs, studies = [], [], [], []
    owner: dict[int, Source] = {}
    task: Task | None = None
    for src in sources:
        ds = load_dataset(src.data_dir)
        task = task or ds.task  # the first folder's
        if ds.task != task:
            log.warning(
                "%s grades the task %r, not this run's %r (the first folder's): its %d studies "
                "teach the localiser only",
                src.data_dir, ds.task.name, task.name, len(ds.labels),
            )  # fmt: skip
            ds.labels = pd.DataFrame(
                {"study_id": ds.labels["study_id"], **dict.fromkeys(task.columns, None)}
            )
        ids = ds.labels["study_id"].astype(int).tolist()
        clash = [s for s in ids if s in owner]
        if clash:
            raise ValueError(
                f"study {clash[0]} (and {len(clash) - 1} more) is in both "
                f"{owner[clash[0]].data_dir} and {src.data_dir}: a study must come from one "
                "folder (import one of them again with other ids: `import spider --id-base`)"
            )
        owner.update(dict.fromkeys(ids, src))
        labels.append(ds.labels)
        if ds.coordinates is not None:
            coords.append(normalize_coordinates(ds.coordinates))
        disc_path = src.data_dir / DISCS_FILE
        if disc_path.is_file():
            from spinegrade.rsna.tables import load_disc_coordinates

            d = load_disc_coordinates(disc_path)
            discs.append(d.assign(level=d["level"].map(TITLE_TO_LEVEL)))
        studies.append(_study_rows(src, ids))
    return TrainingTables(
        list(sources),
        pd.concat(labels, ignore_index=True),
        pd.concat(coords, ignore_index=True) if coords else None,
        pd.concat(discs, ignore_index=True) if discs else None,
        pd.concat(studies, ignore_index=True),
        task or RSNA_2024,
    )


def _study_rows(src: Source, ids: list[int]) -> pd.DataFrame:
    """study_id, source, patient_id of one source (patient: cases.csv, else the study itself)."""
    patient = {s: str(s) for s in ids}
    cases = _read_cases(src.data_dir)
    if cases is not None:
        ids_, pats = cases["study_id"].astype(int), cases["patient_id"].astype(str)
        known = dict(zip(ids_, pats, strict=True))
        patient.update({s: known[s] for s in ids if s in known})
    # Prefixed by the source: patient "12" of one hospital is not patient "12" of another.
    groups = [f"{src.name}:{patient[s]}" for s in ids]
    return pd.DataFrame({"study_id": ids, "source": src.name, "patient_id": groups})


def load_training_studies(
    tables: TrainingTables, progress: bool = True, label_maps: Collection[str] = ()
) -> dict[int, StudyData]:
    """Every study of every source from its own cache, with true points (disc centres too) and
    the label maps of the chosen stack of each series description in ``label_maps`` (those the
    localiser reads) where the folder has them."""
    out: dict[int, StudyData] = {}
    for src in tables.sources:
        ids = tables.source_ids(src.name)
        labels = tables.labels[tables.labels["study_id"].isin(ids)]
        coords = None
        if tables.coordinates is not None:
            coords = tables.coordinates[tables.coordinates["study_id"].isin(ids)]
        part = load_studies(src.cache_dir, ids, labels, coords, progress=progress, task=tables.task)
        if tables.discs is not None:
            for sid, rows in tables.discs[tables.discs["study_id"].isin(ids)].groupby("study_id"):
                study = part[int(sid)]
                stacks = [s for v in study.stacks.values() for s in v]
                study.points = add_disc_points(study.points, rows, stacks)
        if label_maps and has_label_maps(src.data_dir):
            for study in part.values():
                for stack in (study.stacks[d][0] for d in label_maps if study.stacks.get(d)):
                    maps = stack_labels(src.data_dir, stack)
                    if maps is not None:
                        study.label_maps[(int(stack.series_id), int(stack.stack))] = maps
        out.update(part)
    return out


def group_counts(studies: dict[int, str], ids: Sequence[int]) -> dict[str, int]:
    """Studies per source among ``ids`` (sources with none left out), in first-seen order."""
    counts: dict[str, int] = {}
    for s in ids:
        counts[studies[int(s)]] = counts.get(studies[int(s)], 0) + 1
    return counts
