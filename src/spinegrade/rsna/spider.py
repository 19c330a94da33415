"""``spinegrade import spider``: the SPIDER T2-SPACE set as an RSNA-layout training folder.

The source is the derived SPIDER set (``series/<case_id>/<InstanceNumber>.dcm``, ``truth.csv``
disc centres, ``canal.csv`` canal points, ``cases.csv``, ``gradings.csv``), as a folder or as a
tarball holding that layout at its root (``vendor/spider-t2space/spider-t2space.tar.xz``). The
output reads like any RSNA training folder (``load_dataset``, ``spinegrade preprocess``):

* ``train_images/<study_id>/<series_id>/<InstanceNumber>.dcm``: the DICOM files, byte copies;
* ``train_series_descriptions.csv``: one ``Sagittal T2/STIR`` series a study;
* ``train_label_coordinates.csv``: one ``Spinal Canal Stenosis`` point per canal.csv row;
* ``train_disc_coordinates.csv``: the disc centres of truth.csv (read by
  :func:`~spinegrade.rsna.tables.load_disc_coordinates`; kept out of the label coordinates so
  those hold RSNA's five conditions only);
* ``train.csv`` and ``task.yaml``: SPIDER's gradings of the five lumbar discs as the task
  ``spider_discs`` (Pfirrmann 1-5, disc narrowing, bulging, herniation, spondylolisthesis;
  :data:`spinegrade.task.SPIDER_DISCS`). A run whose first folder is the import learns them; in a
  run that grades RSNA (the phantom first) the import teaches the localiser only;
* ``cases.csv``: study_id, case_id, patient_id (what cross-validation must group by: each SPIDER
  case is one patient), source, subset (SPIDER's training/validation);
* ``gradings.csv``: SPIDER's own disc gradings, every row, with study_id in front;
* ``train_label_maps/<study_id>/<series_id>/<InstanceNumber>.png`` and ``label_maps.json``:
  the source's ``masks/`` (disc, vertebra, spinal canal on every slice; checked, then copied
  byte for byte), which the localiser learns beside its points
  (:mod:`spinegrade.data.label_maps`); none when the source has no ``masks/``;
* ``SOURCE.md`` (origin and CC BY 4.0 attribution) and ``import.json`` (the completion marker).

Ids: ``study_id = id_base + source_patient`` with ``id_base`` = :data:`ID_BASE` (5 100 000 000),
above every uint32, so an imported study can never share an id with an RSNA study (uint32) or a
phantom one (below 4.29e9); ``series_id = study_id + SERIES_OFFSET`` (100 000 000), unique over
all studies (one series each) and never equal to a study id as long as patient numbers stay
below the offset. Both are fixed by the source alone: importing again gives the same ids.

The import writes into ``OUT.partial-<pid>`` beside OUT and renames it at the end, so a killed
import leaves no half dataset under OUT's name. A second run into a finished OUT of the same
source (same fingerprint and ids in ``import.json``) does nothing; any other content in OUT is an
error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from spinegrade.rsna.label_maps import (
    LABEL_MAPS_DIR,
    LABEL_MAPS_FILE,
    LabelMapError,
    classes_json,
    read_png,
)
from spinegrade.rsna.tables import (
    COORDINATE_COLUMNS,
    DISC_COORDINATE_COLUMNS,
    SERIES_COLUMNS,
    Parser,
    RSNAFormatError,
    _choice_cell,
    _float_cell,
    _int_cell,
    _load,
)
from spinegrade.task import (
    CONDITION_TITLES,
    LEVEL_TITLES,
    LEVELS,
    SAG_T2,
    SPIDER_DISCS,
    TASK_FILE,
    TITLE_TO_LEVEL,
    save_task,
)
from spinegrade.util.progress import progress_bar

log = logging.getLogger(__name__)

SOURCE_NAME = "spider-t2space"
ID_BASE = 5_100_000_000  # first id above RSNA's uint32 study ids (and the phantom's)
SERIES_OFFSET = 100_000_000  # series_id = study_id + SERIES_OFFSET
MIN_ID_BASE = 2**32  # below this an imported id could equal an RSNA (uint32) id
MARKER = "import.json"
# 2: train.csv holds SPIDER's disc grades (task.yaml: spider_discs); 3: the label maps too
MARKER_FORMAT = 3
REQUIRED_CSVS = ("truth.csv", "canal.csv", "cases.csv", "gradings.csv")
_LEVEL_ORDER = {LEVEL_TITLES[lv]: k for k, lv in enumerate(LEVELS)}
_CANAL = CONDITION_TITLES["spinal_canal_stenosis"]
_LAYOUT = (
    "a SPIDER T2-SPACE set is a folder (or a .tar.xz of one, at its root) holding series/"
    "<case_id>/<InstanceNumber>.dcm, truth.csv, canal.csv, cases.csv and gradings.csv"
)

DOI_PAPER = "https://doi.org/10.1038/s41597-024-03090-w"
DOI_DATA = "https://doi.org/10.5281/zenodo.10159290"
LICENCE_URL = "https://creativecommons.org/licenses/by/4.0/"
CITATION = (
    "J. W. van der Graaf, M. L. van Hooff, C. F. M. Buckens, M. Rutten, J. L. C. van Susante, "
    'R. J. Kroeze, M. de Kleuver, B. van Ginneken, N. Lessmann. "Lumbar spine segmentation in MR '
    f'images: a dataset and a public benchmark." Scientific Data 11, 264 (2024). {DOI_PAPER}'
)


class SpiderFormatError(RSNAFormatError):
    """A CSV of the SPIDER source is not as the importer needs it; ``problems`` lists each."""

    kind = "SPIDER T2-SPACE CSV"
    fix = "fix the file or take a fresh copy of the SPIDER T2-SPACE set, then import again"


class SpiderSourceError(ValueError):
    """The SPIDER source folder or tarball is missing a file, or a file is not as expected."""


@dataclass(frozen=True)
class SpiderImport:
    """What an import wrote (or found already written, ``skipped``)."""

    out: Path
    studies: int
    canal_points: int  # rows of train_label_coordinates.csv (one per named lumbar level)
    disc_points: int  # rows of train_disc_coordinates.csv
    files: int  # DICOM files under train_images/
    fingerprint: str  # sha256 of the source's CSVs and DICOM files (see source_fingerprint)
    skipped: bool = False
    label_maps: int = 0  # PNGs under train_label_maps/ (one per slice that has a map)

    def describe(self) -> str:
        """One line for the command line."""
        done = "already imported, nothing to do" if self.skipped else "imported"
        return (
            f"{SOURCE_NAME} {done}: {self.studies} studies, {self.canal_points} canal points, "
            f"{self.disc_points} disc centres, {self.files} DICOM files, {self.label_maps} "
            f"label maps in {self.out}"
        )


# ---------------------------------------------------------------------------------- the source
@dataclass(frozen=True)
class _Source:
    root: Path  # the folder read (a temporary one for a tarball)
    shown: str  # how errors name it: the folder, or the tarball the user gave

    def path(self, rel: str) -> Path:
        return self.root / rel

    def name(self, rel: str) -> str:
        """``rel`` as the user can find it: a path, or ``TARBALL:member`` inside a tarball."""
        if self.shown == str(self.root):
            return str(self.root / rel)
        return f"{self.shown}:{rel}" if rel else self.shown


@contextlib.contextmanager
def _open_source(src: Path) -> Iterator[_Source]:
    """The source as a folder: ``src`` itself, or a tarball unpacked into a temporary folder."""
    if src.is_dir():
        yield _Source(src, str(src))
        return
    if not src.exists():
        raise FileNotFoundError(f"{src}: not found; {_LAYOUT}")
    if not tarfile.is_tarfile(src):
        raise SpiderSourceError(f"{src}: neither a folder nor a tarball; {_LAYOUT}")
    with tempfile.TemporaryDirectory(prefix="spinegrade-spider-") as tmp:
        _extract(src, Path(tmp))
        root = Path(tmp)
        if not (root / "truth.csv").exists():
            # Also take a tarball that wraps the layout in one top folder (tar -C .. spider/).
            tops = [p for p in root.iterdir() if p.is_dir()]
            if len(tops) == 1 and (tops[0] / "truth.csv").exists():
                root = tops[0]
        yield _Source(root, str(src))


def _extract(tar_path: Path, dest: Path) -> None:
    """Unpack plain files and folders with harmless relative names; refuse anything else."""
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                parts = Path(m.name).parts
                if Path(m.name).is_absolute() or ".." in parts or not (m.isfile() or m.isdir()):
                    raise SpiderSourceError(
                        f"{tar_path}: member {m.name!r} is not a plain file or folder inside the "
                        f"tarball; refusing to unpack it ({_LAYOUT})"
                    )
            # The data filter (Python >= 3.11.4 / 3.12) also drops modes and owners; the check
            # above already keeps older Pythons safe.
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **kwargs)
    except (tarfile.TarError, EOFError, OSError) as exc:  # a truncated .xz raises EOFError
        raise SpiderSourceError(
            f"{tar_path}: cannot unpack ({exc}); download or rebuild the tarball"
        ) from exc


def _series_files(source: _Source, case_id: str) -> list[Path]:
    folder = source.path(f"series/{case_id}")
    if not folder.is_dir():
        raise SpiderSourceError(
            f"{source.name(f'series/{case_id}')}: folder missing for case {case_id} of cases.csv; "
            f"restore it or drop the case from cases.csv ({_LAYOUT})"
        )
    files = sorted(folder.glob("*.dcm"), key=lambda p: (len(p.stem), p.stem))
    if not files:
        raise SpiderSourceError(
            f"{source.name(f'series/{case_id}')}: no .dcm file for case {case_id}; restore the "
            "series or drop the case from cases.csv"
        )
    return files


def source_fingerprint(root: Path, csv_names: Sequence[str] = REQUIRED_CSVS) -> tuple[str, int]:
    """sha256 over the CSVs and every ``series/*/*.dcm`` (name, size, bytes), and the file count.

    The DICOM bytes count too: the vendored copy has other pixel values than the shared folder
    under the same CSVs, and an OUT made from one is not an import of the other.
    """
    digest = hashlib.sha256()
    dicoms = sorted(p.relative_to(root).as_posix() for p in root.glob("series/*/*.dcm"))
    for rel in [*csv_names, *dicoms]:
        data = (root / rel).read_bytes()
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest(), len(dicoms)


# ---------------------------------------------------------------------------------- tables
def _text_cell(text: str) -> str:
    if not text:
        raise ValueError("empty cell, a name is required")
    return text


_LEVEL_CELL = _choice_cell(tuple(LEVEL_TITLES.values()), nullable=False)
POINT_PARSERS: dict[str, Parser] = {
    "case_id": _text_cell,
    "level": _LEVEL_CELL,
    "x_mm": _float_cell,
    "y_mm": _float_cell,
    "z_mm": _float_cell,
    "instance_number": _int_cell,
    "x": _float_cell,  # column in that instance's pixel grid (0-based, pixel centres)
    "y": _float_cell,  # row
}
CASE_PARSERS: dict[str, Parser] = {
    "case_id": _text_cell,
    "source_patient": _int_cell,
    "subset": _text_cell,
}
GRADING_PARSERS: dict[str, Parser] = {"case_id": _text_cell, "level": _text_cell}


def _read(
    source: _Source, rel: str, parsers: dict[str, Parser], unique: list[str]
) -> tuple[pd.DataFrame, list[int]]:
    """One source CSV through the RSNA loader's checks; errors name the file as the user sees it."""
    path = source.path(rel)
    if not path.is_file():
        raise FileNotFoundError(f"{source.name(rel)}: file not found; {_LAYOUT}")
    try:
        return _load(path, parsers, unique, extra_ok=True)
    except RSNAFormatError as err:
        raise SpiderFormatError(source.name(rel), err.problems) from None


def _check_cases(source: _Source, cases: pd.DataFrame, lines: list[int], id_base: int) -> None:
    problems = []
    for line, patient in zip(lines, cases["source_patient"], strict=True):
        if not 0 <= patient < SERIES_OFFSET:
            problems.append(
                f"line {line}, column 'source_patient': {patient} is outside 0..{SERIES_OFFSET - 1}"
                " (the study id is id_base + source_patient)"
            )
    for line in (lines[i] for i in cases.index[cases.duplicated("source_patient")]):
        problems.append(f"line {line}: source_patient repeats an earlier case's")
    if problems:
        raise SpiderFormatError(source.name("cases.csv"), problems)
    if id_base + int(cases["source_patient"].max()) + SERIES_OFFSET >= 2**63:
        raise ValueError(f"--id-base {id_base} is too large: ids must fit a signed 64-bit integer")


def _check_points(
    source: _Source,
    rel: str,
    points: pd.DataFrame,
    lines: list[int],
    instances: dict[str, dict[int, tuple[int, int]]],
) -> None:
    """Every point names a known case, an existing instance file and lies on its image."""
    problems = []
    for line, row in zip(lines, points.itertuples(index=False), strict=True):
        if row.case_id not in instances:
            problems.append(f"line {line}: case_id {row.case_id!r} is not in cases.csv")
            continue
        shape = instances[row.case_id].get(row.instance_number)
        dcm = f"series/{row.case_id}/{row.instance_number}.dcm"
        if shape is None:
            problems.append(
                f"line {line}: instance_number {row.instance_number} has no file "
                f"{source.name(dcm)}; restore the file or fix the row"
            )
            continue
        rows, cols = shape
        if not (-0.5 <= row.x <= cols - 0.5 and -0.5 <= row.y <= rows - 0.5):
            problems.append(
                f"line {line}: (x, y) = ({row.x}, {row.y}) lies outside the {cols} x {rows} "
                f"image of {dcm}; the x/y columns must be pixel column and row in that image"
            )
    if problems:
        raise SpiderFormatError(source.name(rel), problems)


def _dicom_shape(source: _Source, path: Path) -> tuple[int, int]:
    """(Rows, Columns) of one series file, after checking it is DICOM named by its instance."""
    rel = path.relative_to(source.root).as_posix()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise SpiderSourceError(
            f"{source.name(rel)}: not a readable DICOM file ({exc}); restore it from the source"
        ) from exc
    number = ds.get("InstanceNumber")
    if number is None or str(int(number)) != path.stem:
        raise SpiderSourceError(
            f"{source.name(rel)}: InstanceNumber {number} does not match the file name; the "
            "layout names every file <InstanceNumber>.dcm, which the points rely on"
        )
    return int(ds.Rows), int(ds.Columns)


# ---------------------------------------------------------------------------------- output
def study_id_of(source_patient: int, id_base: int = ID_BASE) -> int:
    """The RSNA-layout study id of a SPIDER patient."""
    return id_base + int(source_patient)


def series_id_of(study_id: int) -> int:
    """The one series id of an imported study."""
    return int(study_id) + SERIES_OFFSET


def _level_sorted(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows by study, then level L1/L2 ... L5/S1 (the order of the label columns)."""
    key = frame["level"].map(_LEVEL_ORDER)
    return frame.assign(_k=key).sort_values(["study_id", "_k"], kind="stable").drop(columns="_k")


def _point_table(points: pd.DataFrame, ids: dict[str, int], columns: Sequence[str]) -> pd.DataFrame:
    study = points["case_id"].map(ids)
    table = points.assign(study_id=study, series_id=study.map(series_id_of))
    if "condition" in columns:
        table = table.assign(condition=_CANAL)
    return _level_sorted(table)[list(columns)].reset_index(drop=True)


def _source_md(src: Path, fingerprint: str, files: int, id_base: int) -> str:
    return f"""# Where this data set came from

Made by `spinegrade import spider` from `{src}` (sha256 of its CSVs and DICOM files
`{fingerprint}`, {files} DICOM files). The DICOM files under `train_images/` are copies of the
source's, byte for byte. The points of `truth.csv` (disc centres) and `canal.csv` (spinal canal)
were given RSNA ids and column names: study_id = {id_base} + SPIDER patient number, series_id =
study_id + {SERIES_OFFSET}; `cases.csv` maps each study back to its SPIDER case.

## Credit and licence

The images and the segmentations the points were computed from belong to the SPIDER lumbar spine
data set:

> {CITATION}
>
> Data: Zenodo, {DOI_DATA}

SPIDER is shared under the Creative Commons Attribution 4.0 International licence (CC BY 4.0,
{LICENCE_URL}). This folder is a modified version of it: a subset of the sagittal T2 SPACE
series, with groups of four source slices averaged into 4 mm slices, images halved in size and
rescaled, new DICOM headers and UIDs, and the disc and canal points computed from SPIDER's masks
and named by level. In the copy that spinegrade keeps in its repository
(`vendor/spider-t2space`) the pixel values are also rounded to multiples of 8. Whoever passes
this data on must keep this credit and the licence link and say what was changed. The SPIDER
authors have not reviewed or endorsed spinegrade or this copy.

Each SPIDER case is one patient (`cases.csv`, `patient_id`): fold this set by patient, and count
a figure on it only when it comes from a model that never saw the case.
"""


def _check_out(out: Path, fingerprint: str, id_base: int) -> SpiderImport | None:
    """The summary of a finished import of this source in ``out``; None when ``out`` is free.

    Anything else in ``out`` is an error: the import never writes into a folder it did not make.
    """
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    refuse = f"{out} already exists and is not"
    marker = out / MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("source") != SOURCE_NAME:
        raise ValueError(
            f"{refuse} a finished SPIDER import (no valid {MARKER}); choose another OUT or "
            "remove that folder"
        )
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{refuse} an import of this source: it was imported from {meta.get('src')} "
            f"(fingerprint {str(meta.get('fingerprint'))[:12]}, this source "
            f"{fingerprint[:12]}); choose another OUT or remove that folder"
        )
    if meta.get("id_base") != id_base:
        raise ValueError(
            f"{refuse} an import with --id-base {id_base} (it used {meta.get('id_base')}); "
            "choose another OUT, or remove that folder to import again"
        )
    if meta.get("format") != MARKER_FORMAT:
        # Our own import of this very source, by an older spinegrade (format 1: no disc grades
        # in train.csv): written again and swapped in, so a demo folder keeps working.
        raise _Outdated(meta.get("format"))
    files = int(meta.get("files", -1))
    found = sum(1 for _ in (out / "train_images").glob("*/*/*.dcm"))
    if found != files:
        raise ValueError(
            f"{out} is an import of this source but holds {found} of its {files} DICOM files; "
            "remove that folder and import again"
        )
    return SpiderImport(
        out=out, studies=int(meta["studies"]), canal_points=int(meta["canal_points"]),
        disc_points=int(meta["disc_points"]), files=files, fingerprint=fingerprint, skipped=True,
        label_maps=int(meta.get("label_maps", 0)),
    )  # fmt: skip


class _Outdated(Exception):
    """OUT holds a finished import of the same source in an older format (the format)."""


def _remove_stale_partials(out: Path) -> None:
    """Drop ``OUT.partial-<pid>`` folders of imports that were killed (their pid is gone), and
    ``OUT.old-<pid>`` folders of outdated imports a killed upgrade had moved aside."""
    for stale in [
        *out.parent.glob(f"{out.name}.partial-*"),
        *out.parent.glob(f"{out.name}.old-*"),
    ]:
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def import_spider(
    src: str | Path, out: str | Path, *, id_base: int = ID_BASE, progress: bool = True
) -> SpiderImport:
    """Write the SPIDER T2-SPACE set at ``src`` (folder or tarball) into ``out`` (RSNA layout).

    See the module docstring for the layout and ids. Idempotent: a finished import of the same
    source into ``out`` is left as it is (``skipped``); one made by an older spinegrade (an
    older ``format`` in ``import.json``) is written again and replaces it.
    """
    src, out = Path(src), Path(out)
    if id_base < MIN_ID_BASE:
        raise ValueError(
            f"--id-base {id_base} is below 2**32 = {MIN_ID_BASE}: imported ids could then equal "
            f"RSNA study or series ids (uint32); use e.g. the default {ID_BASE}"
        )
    with _open_source(src) as source:
        missing = [n for n in REQUIRED_CSVS if not source.path(n).is_file()]
        if missing or not source.path("series").is_dir():
            what = ", ".join(missing + ([] if source.path("series").is_dir() else ["series/"]))
            raise FileNotFoundError(f"{source.name('')}: {what} not found; {_LAYOUT}")
        fingerprint, n_source_files = source_fingerprint(source.root)
        outdated = False
        try:
            done = _check_out(out, fingerprint, id_base)
        except _Outdated as old:
            log.info("%s: an import in format %s; importing again (format %d)", out, old,
                     MARKER_FORMAT)  # fmt: skip
            done, outdated = None, True
        if done is not None:
            return done

        cases, case_lines = _read(source, "cases.csv", CASE_PARSERS, ["case_id"])
        _check_cases(source, cases, case_lines, id_base)
        patients = zip(cases["case_id"], cases["source_patient"], strict=True)
        ids = {case: study_id_of(patient, id_base) for case, patient in patients}
        series = {c: _series_files(source, c) for c in cases["case_id"]}
        n_files = sum(len(files) for files in series.values())  # case folders not listed: left
        shapes = {c: {int(p.stem): _dicom_shape(source, p) for p in fs} for c, fs in series.items()}
        canal, canal_lines = _read(source, "canal.csv", POINT_PARSERS, ["case_id", "level"])
        _check_points(source, "canal.csv", canal, canal_lines, shapes)
        discs, disc_lines = _read(source, "truth.csv", POINT_PARSERS, ["case_id", "level"])
        _check_points(source, "truth.csv", discs, disc_lines, shapes)
        gradings, grading_lines = _read(source, "gradings.csv", GRADING_PARSERS, [])
        unknown = [
            f"line {line}: case_id {case!r} is not in cases.csv"
            for line, case in zip(grading_lines, gradings["case_id"], strict=True)
            if case not in ids
        ]
        if unknown:
            raise SpiderFormatError(source.name("gradings.csv"), unknown)

        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(out)
        partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            n_maps = _write(
                partial, source, cases, ids, series, shapes, canal, discs, gradings, progress
            )
            summary = SpiderImport(
                out=out, studies=len(cases), canal_points=len(canal), disc_points=len(discs),
                files=n_files, fingerprint=fingerprint, label_maps=n_maps,
            )  # fmt: skip
            meta = {
                "source": SOURCE_NAME, "format": MARKER_FORMAT, "src": str(src),
                "fingerprint": fingerprint, "source_files": n_source_files, "files": n_files,
                "id_base": id_base,
                "series_offset": SERIES_OFFSET, "studies": summary.studies,
                "canal_points": summary.canal_points, "disc_points": summary.disc_points,
                "label_maps": n_maps,
            }  # fmt: skip
            (partial / MARKER).write_text(json.dumps(meta, indent=1) + "\n")
            (partial / "SOURCE.md").write_text(
                _source_md(src, fingerprint, n_source_files, id_base)
            )
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # an empty OUT made beforehand: take its place
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            if outdated:
                os.rename(out, old)  # two renames: OUT is either the old import or the new
            try:
                os.rename(partial, out)
            except OSError as exc:  # OUT appeared meanwhile (another import)
                raise ValueError(f"{out} appeared during the import ({exc}); import again") from exc
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return summary


def disc_grades(gradings: pd.DataFrame, ids: dict[str, int], where: str) -> pd.DataFrame:
    """train.csv of the ``spider_discs`` task from SPIDER's gradings (lumbar discs; thoracic
    rows are kept in gradings.csv only: the localiser finds L1/L2..L5/S1). Every study gets a
    row; a disc without a grading stays empty. Unknown values are an error naming ``where``."""
    task = SPIDER_DISCS
    train = pd.DataFrame({"study_id": sorted(ids.values())})
    for col in task.columns:
        train[col] = None
    train = train.set_index("study_id")
    # gradings.csv names its columns as the task's conditions; a 0/1 finding becomes
    # absent/present, Pfirrmann keeps its number.
    missing = [c for c in task.condition_names if c not in gradings.columns]
    if missing:
        raise SpiderFormatError(where, [f"lacks the columns {missing}"])
    problems = []
    lumbar = gradings[gradings["level"].isin(TITLE_TO_LEVEL)]
    for row in lumbar.itertuples(index=False):
        study, level = ids[row.case_id], TITLE_TO_LEVEL[row.level]
        for name in task.condition_names:
            value = str(getattr(row, name)).strip()
            grades = task.condition(name).grades
            grade = value if name == "pfirrmann" else {"0": grades[0], "1": grades[1]}.get(value)
            if grade not in grades:
                problems.append(f"{row.case_id} {row.level}: {name} = {value!r}")
                continue
            train.loc[study, f"{name}_{level}"] = grade
    if problems:
        raise SpiderFormatError(where, problems)
    return train.reset_index()


def _write(
    dest: Path,
    source: _Source,
    cases: pd.DataFrame,
    ids: dict[str, int],
    series: dict[str, list[Path]],
    shapes: dict[str, dict[int, tuple[int, int]]],
    canal: pd.DataFrame,
    discs: pd.DataFrame,
    gradings: pd.DataFrame,
    progress: bool,
) -> int:
    """Write every file of the import into ``dest`` (a fresh folder); the label maps written."""
    images = dest / "train_images"
    bar = progress_bar(list(cases["case_id"]), "SPIDER cases", unit="case", enabled=progress)
    for case_id in bar:
        study = ids[case_id]
        folder = images / str(study) / str(series_id_of(study))
        folder.mkdir(parents=True)
        for path in series[case_id]:
            shutil.copyfile(path, folder / path.name)  # the bytes as they are
    n_maps = _write_label_maps(dest, source, ids, shapes)
    order = sorted(ids.values())
    described = {"study_id": order, "series_id": [series_id_of(s) for s in order]}
    described["series_description"] = [SAG_T2] * len(order)
    pd.DataFrame(described)[list(SERIES_COLUMNS)].to_csv(
        dest / "train_series_descriptions.csv", index=False
    )
    disc_grades(gradings, ids, source.name("gradings.csv")).to_csv(dest / "train.csv", index=False)
    save_task(SPIDER_DISCS, dest / TASK_FILE)
    _point_table(canal, ids, COORDINATE_COLUMNS).to_csv(
        dest / "train_label_coordinates.csv", index=False
    )
    _point_table(discs, ids, DISC_COORDINATE_COLUMNS).to_csv(
        dest / "train_disc_coordinates.csv", index=False
    )
    patients = cases["source_patient"]
    table = pd.DataFrame(
        {
            "study_id": cases["case_id"].map(ids),
            "case_id": cases["case_id"],
            "patient_id": [f"SPIDER{p}" for p in patients],  # as the DICOM PatientID says
            "source": SOURCE_NAME,
            "subset": cases["subset"],
        }
    )
    table.sort_values("study_id").to_csv(dest / "cases.csv", index=False)
    graded = gradings.assign(study_id=gradings["case_id"].map(ids))
    graded = graded[["study_id", *gradings.columns]].sort_values("study_id", kind="stable")
    graded.to_csv(dest / "gradings.csv", index=False)
    return n_maps


def _write_label_maps(
    dest: Path, source: _Source, ids: dict[str, int], shapes: dict[str, dict[int, tuple[int, int]]]
) -> int:
    """Copy ``masks/<case_id>/<InstanceNumber>.png`` of the cases into ``train_label_maps/``
    after checking each lies on its slice's grid with our classes; the number copied."""
    if not source.path("masks").is_dir():
        return 0
    n = 0
    for case_id, study in ids.items():
        maps = sorted(source.path(f"masks/{case_id}").glob("*.png"))
        folder = dest / LABEL_MAPS_DIR / str(study) / str(series_id_of(study))
        for path in maps:
            where = source.name(path.relative_to(source.root).as_posix())
            if not path.stem.isdigit() or int(path.stem) not in shapes[case_id]:
                raise SpiderSourceError(
                    f"{where}: no slice {path.stem} in series/{case_id}; a label map is named "
                    "by its slice's InstanceNumber"
                )
            try:
                read_png(path, shapes[case_id][int(path.stem)])
            except LabelMapError as exc:
                why = str(exc).removeprefix(f"{path}: ")  # named as the source names it
                raise SpiderSourceError(f"{where}: {why}") from exc
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, folder / path.name)
            n += 1
    if n:
        (dest / LABEL_MAPS_FILE).write_text(classes_json() + "\n")
    return n
