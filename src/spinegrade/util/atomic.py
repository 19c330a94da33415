"""Atomic file writes, and the named crash points the fault-tolerance tests kill training at.

A long run is killed at any instant (OOM killer, pre-empted GPU node, Ctrl-C twice). Every file
whose existence says "this work is finished" (``metrics.json``, ``localizer_geometry.json``,
``config.yaml``, ``fallback.json``, ``folds.csv``, ``cv.json``, weights sidecars, checkpoints) is
written through :func:`atomic_path`: to a temporary name in the same folder, then ``os.replace``d
into place, so a reader sees either the old file, or the whole new one, never half of it.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CRASH_ENV = "SPINEGRADE_CRASH_AT"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On an exception the temporary file is removed and ``path`` is left as it was. A killed writer
    leaves only ``NAME.tmp-PID``, which nothing reads.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The suffix is kept last-but-one so libraries that look at it (safetensors, pandas) still see
    # a plain file name; the pid keeps two writers (fold processes) apart.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 1, **kwargs: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically; ``kwargs`` go to :func:`json.dumps`."""
    return write_text(path, json.dumps(obj, indent=indent, **kwargs))


def write_csv(path: str | Path, frame: Any) -> Path:
    """Write a pandas frame (no index) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL when ``$SPINEGRADE_CRASH_AT`` equals ``name``.

    For the fault-tolerance tests only: they set the variable in a training subprocess to stop it
    at a named point, exactly as an OOM kill would (no cleanup, no ``finally``). Points:
    ``fit_epoch:STAGE`` (after an epoch's checkpoint), ``checkpoint_write:STAGE`` and
    ``weights_write:NAME`` (between the tensor file and its sidecar), ``fold_metrics`` (a fold's
    weights and OOF written, its ``metrics.json`` not).
    """
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
