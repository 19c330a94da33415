"""What the DICOM reader sees, as JSON-able data and as rich tables (``spinegrade inspect``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from spinegrade.io.dicom import DicomReadError, natural_key, read_series
from spinegrade.io.stacks import NO_GEOMETRY_NOTE
from spinegrade.io.types import SeriesRead, Stack


def compact_numbers(values: list[int] | np.ndarray) -> str:
    """Integers in the given order, runs of +-1 steps as ranges, repeats counted: ``1-5, 7, 12-9,
    3 (x4)`` (a multi-frame file repeats its InstanceNumber for every frame)."""
    groups: list[list[int]] = []  # [value, repeat count]
    for v in (int(x) for x in values):
        if groups and groups[-1][0] == v:
            groups[-1][1] += 1
        else:
            groups.append([v, 1])
    parts: list[str] = []
    i = 0
    while i < len(groups):
        j = i
        # Extend a range over single values stepping by +1 or -1 in a constant direction.
        if groups[i][1] == 1 and i + 1 < len(groups) and groups[i + 1][1] == 1:
            step = groups[i + 1][0] - groups[i][0]
            if abs(step) == 1:
                while (
                    j + 1 < len(groups)
                    and groups[j + 1][1] == 1
                    and groups[j + 1][0] - groups[j][0] == step
                ):
                    j += 1
        value, count = groups[i]
        if j > i:
            parts.append(f"{value}-{groups[j][0]}")
        else:
            parts.append(f"{value} (x{count})" if count > 1 else str(value))
        i = j + 1
    return ", ".join(parts)


def _instance_order(numbers: np.ndarray) -> str:
    """How InstanceNumbers run along the geometric order: the reader never trusts them for it."""
    diffs = np.diff(numbers)
    if len(diffs) == 0 or np.all(diffs == 0):
        return "single" if len(numbers) < 2 else "constant"
    if np.all(diffs > 0):
        return "ascending"
    if np.all(diffs < 0):
        return "descending"
    return "mixed"


def _tilt(normal: np.ndarray) -> float:
    """Angle (degrees) between the slice normal and its nearest patient axis: how far an axial
    stack is angled to follow its disc, or a sagittal one to follow the spine."""
    cos = float(np.max(np.abs(normal)) / np.linalg.norm(normal))
    return round(float(np.degrees(np.arccos(min(1.0, cos)))), 1)


def describe_stack(stack: Stack, index: int) -> dict[str, Any]:
    """One stack as JSON-able values (spacing in mm: row, column, slice).

    ``instance_numbers`` and ``frame_indices`` are lists of integers, one per slice in geometric
    order (along the stack normal), for programs to index with; only the table view compacts them.
    """
    return {
        "index": index,
        "plane": stack.plane,
        "direction": stack.direction,
        "slices": int(stack.shape[0]),
        "shape": [int(v) for v in stack.shape],
        "spacing_mm": [
            round(float(stack.pixel_spacing[0]), 4),
            round(float(stack.pixel_spacing[1]), 4),
            round(stack.slice_spacing, 4),
        ],
        "orientation": [round(float(v), 4) for v in (*stack.row_dir, *stack.col_dir)],
        "tilt_deg": _tilt(stack.normal),
        "instance_numbers": [int(v) for v in stack.instance_numbers],
        "instance_order": _instance_order(stack.instance_numbers),
        # A multi-frame file gives several slices; frame_indices tells them apart (0 otherwise).
        "multi_frame": len(set(stack.files)) < len(stack.files),
        "frame_indices": [int(v) for v in stack.frame_indices],
        "has_geometry": bool(stack.has_geometry),
        "series_description": stack.series_description,
        "value_range": [float(stack.pixels.min()), float(stack.pixels.max())],
        "first_file": stack.files[0].name,
    }


def describe_series(series: SeriesRead) -> dict[str, Any]:
    """A JSON-able summary of one :class:`SeriesRead`: its stacks and the files it skipped."""
    return {
        "folder": str(series.folder),
        "series_instance_uid": series.series_instance_uid,
        "stacks": [describe_stack(st, i) for i, st in enumerate(series.stacks)],
        "skipped": [{"file": sk.path.name, "reason": sk.reason} for sk in series.skipped],
    }


def _is_study(folder: Path) -> bool:
    """Sub-folders and no files of its own (hidden files such as .DS_Store do not count)."""
    entries = list(os.scandir(folder))
    has_dirs = any(e.is_dir() for e in entries)
    return has_dirs and not any(e.is_file() and not e.name.startswith(".") for e in entries)


def inspect_path(path: str | Path) -> dict[str, Any]:
    """Describe a series folder, or every series sub-folder of a study folder.

    A folder holding only sub-folders is a study, any other folder one series. A series that
    cannot be read is reported with its error and the others still are.
    """
    path = Path(path)
    if not path.is_dir():
        raise DicomReadError(f"{path}: not a folder; give a series folder or a study folder")
    if _is_study(path):
        kind = "study"
        subdirs = (p for p in path.iterdir() if p.is_dir())
        folders = sorted(subdirs, key=lambda p: natural_key(p.name))
    else:
        kind, folders = "series", [path]
    series: list[dict[str, Any]] = []
    for folder in folders:
        try:
            series.append(describe_series(read_series(folder)))
        except DicomReadError as exc:
            series.append({"folder": str(folder), "error": str(exc)})
    return {"path": str(path), "kind": kind, "series": series}


def print_inspection(report: dict[str, Any], console: Any = None) -> None:
    """Print :func:`inspect_path`'s report as one rich table per series."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    if not report["series"]:
        console.print(f"[yellow]{report['path']}: no series sub-folders found[/]")
    for s in report["series"]:
        name = Path(s["folder"]).name
        if "error" in s:
            console.print(f"[bold red]series {escape(name)}: {escape(s['error'])}[/]")
            continue
        descriptions = sorted({st["series_description"] for st in s["stacks"]} - {""})
        title = " ".join([f"series {name}", *descriptions, f"[dim]{s['series_instance_uid']}[/]"])
        table = Table(title=title, title_justify="left")
        for col in ("#", "plane", "tilt", "dir", "slices", "H x W", "spacing mm"):
            table.add_column(col, no_wrap=True)
        table.add_column("InstanceNumbers, geometric order", overflow="fold")
        for st in s["stacks"]:
            table.add_row(
                str(st["index"]),
                st["plane"],
                f"{st['tilt_deg']:g}°",
                st["direction"],
                str(st["slices"]),
                f"{st['shape'][1]}x{st['shape'][2]}",
                " x ".join(f"{v:g}" for v in st["spacing_mm"]),
                _numbers_cell(st),
            )
        console.print(table)
        if not all(st["has_geometry"] for st in s["stacks"]):
            console.print(f"  [yellow]note[/] {escape(s['folder'])}: {NO_GEOMETRY_NOTE}")
        for sk in s["skipped"]:
            console.print(f"  [yellow]skipped[/] {escape(sk['file'])}: {escape(sk['reason'])}")


def _numbers_cell(st: dict[str, Any]) -> str:
    """The compact text of the table view: ``6-1 (descending), frames 0-5``."""
    text = f"{compact_numbers(st['instance_numbers'])} ({st['instance_order']})"
    if st["multi_frame"]:
        text += f", frames {compact_numbers(st['frame_indices'])}"
    if not st["has_geometry"]:
        text += " [red]no geometry[/]"
    return text
