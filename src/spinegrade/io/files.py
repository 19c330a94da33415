"""Opening one file as DICOM, for the series reader and for discovery alike.

Hospital exports hold more than image slices: DICOMDIR indexes, text notes named ``.dcm``, empty
files left by a broken transfer, links to files that are gone, even named pipes. Each is named
with a reason that says what it is and what to do, instead of a parser's traceback. pydicom's own
logging (a decoder logs a whole traceback per plugin it tried) and warnings are captured while
spinegrade reads: what matters reaches the user as that one reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
RECOPY = "copy it again from the PACS or scanner"
REEXPORT = "re-export the series from the PACS or scanner"


class NotImage(Exception):
    """A file that is not a DICOM image (junk, a DICOMDIR, a report): skipped and named."""


class BadFile(ValueError):
    """A DICOM file that cannot be used; the message says why and what to do."""


def entry_reason(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file at all (None when it is a non-empty regular file).

    Checked before opening: opening a named pipe waits forever for a writer.
    """
    try:
        st = os.stat(path)  # follows links
    except FileNotFoundError:
        if os.path.islink(path):
            return f"cannot be opened: a link to {os.readlink(path)}, which does not exist"
        return "cannot be opened: the file disappeared while the folder was read"
    except OSError as exc:
        return f"cannot be opened ({exc.strerror or exc}): check the file and its permissions"
    if stat.S_ISDIR(st.st_mode):
        return "sub-folder ignored (a series folder holds files)"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a named pipe, socket or device); ignored"
    if st.st_size == 0:
        return "empty file (0 bytes; a transfer that did not finish?); ignored"
    return None


def open_dataset(path: Path, *, header_only: bool = False, tags: Sequence[str] = ()) -> Dataset:
    """``dcmread`` of one file, or :class:`NotImage` / :class:`BadFile` with a clear reason.

    Files without the 128-byte preamble are read only if they start like a DICOM data set
    (group 0002 or 0008), so that junk files are never parsed as DICOM.
    """
    kwargs = {"stop_before_pixels": header_only, "specific_tags": list(tags) or None}
    reason = entry_reason(path)
    if reason is not None:
        raise NotImage(reason)
    try:
        try:
            return pydicom.dcmread(path, **kwargs)
        except InvalidDicomError:
            with open(path, "rb") as fh:
                head = fh.read(2)
            if head not in (b"\x02\x00", b"\x08\x00", b"\x00\x08"):
                raise NotImage("not a DICOM file (no 'DICM' marker); ignored") from None
        ds = pydicom.dcmread(path, force=True, **kwargs)
    except NotImage:
        raise
    except PermissionError as exc:
        raise BadFile(
            f"cannot be opened ({exc.strerror}): let the user running spinegrade read it"
        ) from exc
    except OSError as exc:
        raise BadFile(f"cannot be opened ({exc.strerror or exc}); {RECOPY}") from exc
    except Exception as exc:  # a damaged header can raise nearly anything inside pydicom
        raise BadFile(f"damaged DICOM header ({describe(exc)}); {RECOPY}") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        # No file meta: the transfer syntax is the encoding pydicom detected while parsing.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    return ds


@contextlib.contextmanager
def damaged_header() -> Iterator[None]:
    """Turn a failure while reading values of an opened data set into :class:`BadFile`.

    pydicom parses elements lazily, so a damaged element (an unknown value representation, a
    length past the end) fails only when it is first read, long after ``dcmread`` returned.
    """
    try:
        yield
    except (BadFile, NotImage):
        raise
    except Exception as exc:
        raise BadFile(f"damaged DICOM header ({describe(exc)}); {RECOPY}") from exc


def is_dicomdir(ds: Dataset) -> bool:
    """A DICOMDIR names its class in the file meta only (its data set has no SOPClassUID)."""
    meta = getattr(ds, "file_meta", None)
    sop = meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""
    return DICOMDIR_CLASS in (str(sop), str(ds.get("SOPClassUID", "")))


DICOMDIR_REASON = "DICOMDIR (the index of an export, not an image); ignored"


def describe(exc: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message`` (two when the first only announces a list, as
    pydicom's "exceptions were raised by all available plugins:"), cut to ``limit`` characters."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines or [""])[0]
    text = text[:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Collect(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.sink.append(record.getMessage().strip().splitlines()[0][:200])


@contextlib.contextmanager
def pydicom_quiet() -> Iterator[list[str]]:
    """Keep pydicom's log records and warnings out of the output while spinegrade reads.

    Yields the list their first lines are collected into (WARNING and above), so a caller can
    put the decoder's own words into the reason it gives; they are also logged at DEBUG.
    """
    log = logging.getLogger("pydicom")
    sink: list[str] = []
    handler = _Collect(sink)
    old_propagate = log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        with warnings.catch_warnings():
            # pydicom warns and logs the same thing (``warn_and_log``); the log record is kept.
            warnings.simplefilter("ignore")
            yield sink
    finally:
        log.removeHandler(handler)
        log.propagate = old_propagate
        for line in sink:
            logging.getLogger(__name__).debug("pydicom: %s", line)
