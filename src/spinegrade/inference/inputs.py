"""What predict reads: an RSNA test layout, or any folder of DICOM studies behind symlinks."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from spinegrade.util.atomic import write_csv

log = logging.getLogger(__name__)
SPLIT = "test"
SERIES_CSV = "test_series_descriptions.csv"
LAYOUT_DIR = "layout"  # inside the work folder: symlinks to a raw input, in the RSNA layout
STUDIES_CSV = "studies.csv"  # beside the submission: study id -> input folder and series
SKIPPED_CSV = "skipped_inputs.csv"  # in the work folder: input entries not read, and why
# One row per series found. Folders are POSIX paths relative to INPUT ("." for INPUT itself), with
# any component naming the patient shown as "[patient]". series_description is the RSNA type the
# model reads the series as ("" when it is not used, e.g. coronal); type_source says where that
# type came from ("csv" for an RSNA layout, else description / sequence timing / image contrast /
# elimination / plane only / default) and guessed whether it is a guess. dicom_description is the
# header's SeriesDescription (or ProtocolName).
STUDIES_COLUMNS: list[str] = [
    "study_id", "study_folder", "series_id", "series_folder", "series_description",
    "type_source", "guessed", "plane", "n_files", "dicom_description", "note",
]  # fmt: skip


# ------------------------------------------------------------------------------------ input


@dataclass
class PreparedInput:
    """An input folder made ready for ``preprocess_dataset(data_dir, cache, split="test")``."""

    kind: str  # "rsna" | "raw"
    data_dir: Path  # the RSNA-layout root preprocess reads (the input, or the symlink layout)
    series: pd.DataFrame  # study_id, series_id, series_description (typed series only)
    study_ids: list[int]
    warnings: list[str] = field(default_factory=list)
    discovery: pd.DataFrame | None = None  # raw input: every series found and how it was typed
    # studies.csv: which input folder and series each study id stands for (STUDIES_COLUMNS)
    studies: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=STUDIES_COLUMNS))
    # raw input: (study, series) -> the input path (as shown to the user) of each layout link,
    # in link order (00000.dcm, 00001.dcm, ...)
    links: dict[tuple[int, int], list[str]] = field(default_factory=dict)

    def in_input_terms(self, rows: list[dict]) -> list[dict]:
        """Rows of the cache (failures, notes) whose reasons name the input's files and folders
        instead of the work folder's links to them (``00003.dcm`` -> ``ward/case1/IM0004``)."""
        out = []
        for row in rows:
            key = (int(row["study_id"]), int(row["series_id"]))
            names = self.links.get(key)
            reason = str(row["reason"])
            if self.kind == "rsna":  # the user's own files: name them relative to INPUT
                reason = reason.replace(f"{self.data_dir}{os.sep}", "")
            elif names:
                folder = self.data_dir / "test_images" / str(key[0]) / str(key[1])
                shown = os.path.commonpath(names) if len(names) > 1 else os.path.dirname(names[0])
                reason = reason.replace(str(folder), shown or ".")
                reason = _LINK.sub(functools.partial(_link_target, names=names), reason)
            out.append({**row, "reason": reason})
        return out


_LINK = re.compile(r"\b(\d{5})\.dcm\b")  # the layout's link names, see build_symlink_layout


def _link_target(match: re.Match, names: list[str]) -> str:
    k = int(match.group(1))
    return names[k] if k < len(names) else match.group(0)


def is_rsna_test_layout(path: Path) -> bool:
    """True when ``path`` holds ``test_images/`` and ``test_series_descriptions.csv``."""
    return (path / "test_images").is_dir() and (path / SERIES_CSV).is_file()


def default_work_dir(out_csv: Path, input_dir: Path) -> Path:
    """``OUT's folder/.spinegrade_cache/<hash of the input path>``, or a temp folder.

    Hashing the input's absolute path keeps the caches of different inputs apart without writing
    the path itself (folder names can carry patient names). A location inside the input folder is
    never used: the temp folder is taken instead.
    """
    key = hashlib.sha1(str(Path(input_dir).resolve()).encode()).hexdigest()[:12]
    base = Path(out_csv).resolve().parent / ".spinegrade_cache"
    if _inside(base, input_dir):
        base = Path(tempfile.gettempdir()) / "spinegrade_cache"
    return base / key


def _inside(path: Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def prepare_input(input_dir: Path | str, work_dir: Path | str) -> PreparedInput:
    """Recognise the input kind; for raw DICOM folders build the symlink layout in ``work_dir``."""
    from spinegrade.rsna import load_series_descriptions

    input_dir, work_dir = Path(input_dir), Path(work_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(
            f"{input_dir}: no such folder; INPUT is an RSNA test layout (test_images/ + "
            f"{SERIES_CSV}) or a folder of DICOM files"
        )
    if _inside(work_dir, input_dir):
        raise ValueError(
            f"work/cache folder {work_dir} lies inside the input {input_dir}; spinegrade never "
            "writes into its input: choose --cache elsewhere"
        )
    if is_rsna_test_layout(input_dir):
        series = load_series_descriptions(input_dir / SERIES_CSV)
        study_ids = [int(s) for s in pd.unique(series["study_id"])]
        studies = rsna_studies(input_dir, series)
        return PreparedInput("rsna", input_dir, series, study_ids, studies=studies)
    # A raw folder (or a test_images/ without its CSV): group and type series from the headers.
    from spinegrade.io.discover import discover_studies

    found = discover_studies(input_dir)
    skipped = found.skipped_paths()
    if skipped:
        listed = write_csv(
            work_dir / SKIPPED_CSV, pd.DataFrame(skipped, columns=["path", "reason"])
        )
        for line in skipped_lines(skipped, listed):
            log.warning(line)
    layout = build_symlink_layout(found, work_dir / LAYOUT_DIR)
    return PreparedInput(
        "raw",
        layout,
        found.series_descriptions(),
        found.study_ids,
        warnings=list(found.guesses),  # missing series are reported after caching
        discovery=found.table(),
        studies=discovered_studies(found),
        links={(s.study_id, s.series_id): [found.shown(f) for f in s.files] for s in found.series},
    )


def rsna_studies(input_dir: Path, series: pd.DataFrame) -> pd.DataFrame:
    """The studies.csv table of an RSNA layout: its series CSV with folders and file counts."""
    from spinegrade.io.discover import type_from_description

    rows = []
    for sid, ser, desc in series[["study_id", "series_id", "series_description"]].itertuples(
        index=False
    ):
        folder = Path("test_images") / str(sid) / str(ser)
        files = _visible_files(input_dir / folder)
        rows.append(
            {
                "study_id": int(sid),
                "study_folder": folder.parent.as_posix(),
                "series_id": int(ser),
                "series_folder": folder.as_posix(),
                "series_description": desc,
                "type_source": "csv",
                "guessed": False,
                "plane": type_from_description(str(desc))[0] or "unknown",
                "n_files": len(files),
                "dicom_description": "",
                "note": "" if files else "folder missing or empty",
            }
        )
    return _studies_frame(rows)


def discovered_studies(found) -> pd.DataFrame:
    """The studies.csv table of a raw input: every series discovery found, where it lies.

    A study's folder is the deepest folder holding all its files, a series' folder likewise.
    Components that carry the study's patient identifiers are blanked (io.identifiers).
    """
    from spinegrade.io.identifiers import input_folder, patient_identifiers, redact_folder

    root = Path(found.root)
    by_study: dict[int, list] = {}
    for s in found.series:
        by_study.setdefault(s.study_id, []).append(s)
    rows = []
    for study_id, series in sorted(by_study.items()):
        secrets = patient_identifiers(s.files[0] for s in series if s.files)
        for s in sorted(series, key=lambda s: s.series_id):
            rows.append(
                {
                    "study_id": study_id,
                    "study_folder": found.study_folders[study_id],
                    "series_id": s.series_id,
                    "series_folder": input_folder(s.files, root, secrets),
                    "series_description": s.series_description,
                    "type_source": s.type_source,
                    "guessed": bool(s.guessed),
                    "plane": s.plane,
                    "n_files": len(s.files),
                    "dicom_description": redact_folder(s.header_description, secrets),
                    "note": s.note,
                }
            )
    return _studies_frame(rows)


def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]


def _studies_frame(rows: list[dict]) -> pd.DataFrame:
    out = pd.DataFrame(rows, columns=STUDIES_COLUMNS)
    return out.sort_values(["study_id", "series_id"], kind="stable").reset_index(drop=True)


# At most this many skipped input entries are named one by one (a folder of thousands of
# screenshots would otherwise bury the rest of the output); SKIPPED_CSV lists them all.
MAX_NAMED_SKIPS = 50


def skipped_lines(
    skipped: list[tuple[str, str]], listed: Path, limit: int = MAX_NAMED_SKIPS
) -> list[str]:
    """The lines naming input entries discovery did not read: a count, then one per entry.

    ``skipped``: (path relative to INPUT, reason); ``listed``: the CSV that holds them all.
    Zero-byte files, text files named ``.dcm``, a lone DICOMDIR, links back up the tree: none of
    them may vanish without a word.
    """
    if not skipped:
        return []
    lines = [
        f"{len(skipped)} input entr{'y was' if len(skipped) == 1 else 'ies were'} not read as "
        "MR slices (each named below); remove or fix them if they should have been"
    ]
    lines += [f"skipped {path}: {reason}" for path, reason in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"... and {len(skipped) - limit} more: all are listed in {listed}")
    return lines


def name_study_folder(warning: str, study_id: int, folders: dict[int, str]) -> str:
    """``study <id>: ...`` -> ``study <id> (<its input folder>): ...``; any other text as is.

    Study ids are hashes of UIDs: without its folder a warning cannot be traced to an input.
    """
    head = f"study {study_id}:"
    if study_id in folders and warning.startswith(head):
        return f"study {study_id} ({folders[study_id]}):{warning[len(head) :]}"
    return warning


def study_folders(studies: pd.DataFrame) -> dict[int, str]:
    """study_id -> its input folder (relative to INPUT), from a studies.csv table."""
    first = studies.drop_duplicates("study_id")
    return dict(zip(first["study_id"].astype(int), first["study_folder"], strict=True))


def build_symlink_layout(found, layout_dir: Path) -> Path:
    """``layout_dir/test_images/{study}/{series}/{k}.dcm`` links to the user's files + the CSV.

    Links, not copies: the user's files stay where they are and nothing is duplicated. The layout
    is rebuilt on every call (links are cheap; preprocess' resume looks at the linked files' sizes,
    which do not change).
    """
    images = layout_dir / "test_images"
    if images.exists():
        shutil.rmtree(images)  # removes the links only, never their targets
    table = found.series_descriptions()
    for study_id, series_id in table[["study_id", "series_id"]].itertuples(index=False):
        folder = images / str(study_id) / str(series_id)
        folder.mkdir(parents=True, exist_ok=True)
        for k, src in enumerate(found.files_of(int(study_id), int(series_id))):
            _link(Path(src).resolve(), folder / f"{k:05d}.dcm")
    images.mkdir(parents=True, exist_ok=True)
    write_csv(layout_dir / SERIES_CSV, table)
    return layout_dir


def _link(src: Path, dst: Path) -> None:
    """Symbolic link, else a hard link (same disk), else a clear error."""
    try:
        os.symlink(src, dst)
    except OSError:
        try:
            os.link(src, dst)
        except OSError as exc:
            raise ValueError(
                f"cannot link {dst.name} to an input file in the work folder {dst.parent} "
                f"({exc}); put --cache on a file system that allows symbolic links"
            ) from exc


def write_studies_csv(studies: pd.DataFrame, path: Path) -> Path:
    """Write the studies.csv table atomically; returns ``path``."""
    return write_csv(path, studies)
