"""Pixel handling for the reader: decoding options, unused bits, float32 stacks, modality LUT.

Cost matters here (a study has ~70 slices, a dataset ~150,000): each file is decoded once with
pydicom as a read-only view on its PixelData where the transfer syntax allows it (uncompressed
little endian), and cast to float32 exactly once, straight into its place in the final stack.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless

from spinegrade.io.files import RECOPY, REEXPORT, BadFile, describe

_UNCOMPRESSED = "re-export the series uncompressed (Explicit VR Little Endian)"


def check_pixel_data(ds: Dataset) -> int:
    """Pixels (rows x columns x frames) ``ds`` declares, checked before anything is decoded.

    Refuses, with what to do: a header that cannot describe an image, a 1-bit image (a mask or
    overlay, not MR), an unknown transfer syntax, and uncompressed pixel data shorter than the
    header says (a file cut short, or Rows/Columns/NumberOfFrames that lie; nothing is allocated
    for the size the header claims).
    """
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:
        raise BadFile(f"image header incomplete ({describe(exc)}); {REEXPORT}") from exc
    if min(rows, cols, frames) <= 0:
        raise BadFile(
            f"Rows {rows} x Columns {cols} x {frames} frame(s) describe no image; {REEXPORT}"
        )
    if bits == 1:
        raise BadFile(
            "BitsAllocated 1: a bit mask (segmentation or overlay), not an MR image; leave it "
            "out of the series"
        )
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if not syntax:
        raise BadFile(f"no transfer syntax in the file meta (damaged header); {RECOPY}")
    if not syntax.is_transfer_syntax:
        raise BadFile(f"transfer syntax {syntax} is unknown: it cannot be decoded; {_UNCOMPRESSED}")
    if not syntax.is_compressed and bits % 8 == 0:
        needed = rows * cols * frames * samples * bits // 8
        have = len(ds.PixelData)
        if have < needed:
            raise BadFile(
                f"pixel data holds {have} bytes but Rows {rows} x Columns {cols} x {frames} "
                f"frame(s) of {bits}-bit samples need {needed}: the file is cut short or its "
                f"header is wrong; {RECOPY}"
            )
    return rows * cols * frames


def decode_reason(ds: Dataset, exc: Exception) -> str:
    """Why ``ds``'s pixel data could not be decoded, and what to do about it."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    name = getattr(syntax, "name", str(syntax))
    if isinstance(exc, NotImplementedError) or "is not supported" in str(exc):
        return (
            f"transfer syntax {syntax} ({name}) cannot be decoded here: {_UNCOMPRESSED}, or "
            "install a pydicom decoder for it"
        )
    if syntax is not None and syntax.is_compressed:
        return f"{name} pixel data cannot be decoded ({describe(exc)}): damaged; {RECOPY}"
    return f"pixel data cannot be decoded ({describe(exc)}); {REEXPORT}"


def decode(ds: Dataset) -> np.ndarray:
    """``ds.pixel_array`` as (frames, rows, columns), without copies pydicom need not make.

    ``view_only`` returns a view on the file's bytes instead of a copy; pydicom's always-on
    masking of unused high bits is replaced by :func:`fix_unused_bits`, which only touches the
    data when those bits are actually set (rare in MR).
    """
    ds.pixel_array_options(view_only=True, correct_unused_bits=False)
    if ds.file_meta.get("TransferSyntaxUID") == RLELossless:
        with _RUST_LOCK, _native_stderr_kept():
            arr = _pixel_array(ds)
    else:
        arr = _pixel_array(ds)
    arr = fix_unused_bits(
        arr,
        bits_stored=int(ds.get("BitsStored") or 0),
        bits_allocated=int(ds.get("BitsAllocated") or 0),
        signed=int(ds.get("PixelRepresentation") or 0) == 1,
    )
    return arr[np.newaxis] if arr.ndim == 2 else arr


def _pixel_array(ds: Dataset) -> np.ndarray:
    try:
        return ds.pixel_array
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except Exception:
        raise
    except BaseException as exc:
        # The RLE decoder (pylibjpeg-rle) is written in Rust and panics on some damaged
        # streams; pyo3 raises the panic as PanicException, a BaseException that no
        # `except Exception` would see.
        raise RuntimeError(f"the decoder failed: {str(exc).strip()[:160]}") from exc


_RUST_LOCK = threading.Lock()  # file descriptor 2 is the process's: one capture at a time
_PANIC = b"\nthread '"  # how a Rust panic message starts


@contextlib.contextmanager
def _native_stderr_kept() -> Iterator[None]:
    """Hold back what native code writes to file descriptor 2 while the block runs.

    A Rust panic prints its message, and with RUST_BACKTRACE set a whole backtrace, straight to
    the process's stderr, past Python: the file's skip reason says it in one line instead.
    Anything else written meanwhile is written out afterwards, unchanged.
    """
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = b"\n" + held.read()
            keep = text[: text.find(_PANIC)] if _PANIC in text else text
            if keep.strip():
                os.write(2, keep[1:])


def fix_unused_bits(
    arr: np.ndarray, bits_stored: int, bits_allocated: int, signed: bool
) -> np.ndarray:
    """Values of a ``bits_stored``-bit sample held in ``bits_allocated`` bits, like pydicom does.

    The bits above BitsStored may hold anything (PS3.5 8.1.1); shifting left then right clears
    them (unsigned) or sign-extends from the top stored bit (signed). When every value already
    lies in the stored range the shift is the identity, so it is skipped.
    """
    shift = bits_allocated - bits_stored
    if shift <= 0 or bits_stored <= 0 or arr.dtype.kind not in "iu":
        return arr
    if arr.dtype.itemsize * 8 != bits_allocated:
        return arr
    if signed:
        lo, hi = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
        if arr.size == 0 or (arr.min() >= lo and arr.max() <= hi):
            return arr
    elif arr.size == 0 or arr.max() <= (1 << bits_stored) - 1:
        return arr
    out = arr.copy()
    np.left_shift(out, shift, out=out)
    np.right_shift(out, shift, out=out)
    return out


def assemble(
    frames: Sequence[np.ndarray],
    slopes: Sequence[float],
    intercepts: Sequence[float],
    invert_sums: Sequence[float | None],
) -> np.ndarray:
    """float32 (D, H, W) from stored-value frames in final order, modality LUT applied.

    MONOCHROME1 slices are flipped on their stored range first, so that a bright pixel is a high
    value in every series; then ``slope * v + intercept`` (RescaleSlope/Intercept) puts slices a
    scanner scaled differently on one scale.
    """
    h, w = frames[0].shape
    out = np.empty((len(frames), h, w), dtype=np.float32)
    for i, frame in enumerate(frames):
        out[i] = frame  # the one integer -> float32 cast
        if invert_sums[i] is not None:
            np.subtract(np.float32(invert_sums[i]), out[i], out=out[i])
    pairs = set(zip(slopes, intercepts, strict=True))
    if len(pairs) == 1:
        _rescale(out, *pairs.pop())
    else:
        for i, (slope, intercept) in enumerate(zip(slopes, intercepts, strict=True)):
            _rescale(out[i], slope, intercept)
    return out


def _rescale(a: np.ndarray, slope: float, intercept: float) -> None:
    if slope != 1.0:
        a *= np.float32(slope)
    if intercept != 0.0:
        a += np.float32(intercept)
