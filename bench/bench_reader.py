"""Per-slice cost of ``read_series`` against a bare ``pydicom.dcmread(f).pixel_array`` loop.

Writes a synthetic MR series (default 20 slices of 512x512 uint16, like an RSNA axial or sagittal
series) twice, uncompressed and RLE-compressed, into a temporary folder, then times three loops
over the same files, alternately so that load from other processes hits them alike:

- bare:     ``pydicom.dcmread(f).pixel_array`` for every file, nothing kept;
- +float32: the same, each array cast into a preallocated float32 (D, H, W) stack: the least
            any reader that returns float32 volumes must do;
- read_series: everything (geometry, ordering, stack splitting, rescale, skipped-file checks).

One untimed pass of each warms the OS file cache first.

    .venv/bin/python bench/bench_reader.py [--slices 20] [--size 512] [--repeats 7] [--clock cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dicom_factory import AXIAL, write_stack
from spinegrade.io import read_series


def bare_loop(folder: Path) -> int:
    """Parse and decode every file, nothing else (no ordering, no float conversion)."""
    n = 0
    for path in sorted(folder.iterdir()):
        pydicom.dcmread(path).pixel_array  # noqa: B018 (decoding is the point)
        n += 1
    return n


def float32_loop(folder: Path) -> int:
    """Decode every file and cast it into a float32 stack, in file order."""
    paths = sorted(folder.iterdir())
    out: np.ndarray | None = None
    for i, path in enumerate(paths):
        arr = pydicom.dcmread(path).pixel_array
        if out is None:
            out = np.empty((len(paths), *arr.shape), dtype=np.float32)
        out[i] = arr
    return len(paths)


def reader(folder: Path) -> int:
    return sum(st.shape[0] for st in read_series(folder).stacks)


LOOPS: dict[str, Callable[[Path], int]] = {
    "bare": bare_loop,
    "+float32": float32_loop,
    "read_series": reader,
}


def time_loops(folder: Path, repeats: int, clock: str) -> dict[str, list[float]]:
    """Milliseconds per slice of every loop, ``repeats`` times each, interleaved."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    for fn in LOOPS.values():
        fn(folder)
    times: dict[str, list[float]] = {name: [] for name in LOOPS}
    for _ in range(repeats):
        for name, fn in LOOPS.items():
            t0 = now()
            n = fn(folder)
            times[name].append((now() - t0) * 1000 / n)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time, steadier than wall time on a machine others are loading",
    )
    args = ap.parse_args()
    print(f"pydicom {pydicom.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}")
    print(
        f"{args.slices} slices of {args.size}x{args.size} uint16, {args.repeats} timed repeats, "
        f"{args.clock} clock; ms per slice as best / median; ratio = median of paired ratios"
    )
    print(f"{'series':<14}" + "".join(f"{name:>17}" for name in LOOPS) + f"{'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, syntax in (("uncompressed", ExplicitVRLittleEndian), ("RLE", RLELossless)):
            folder = Path(tmp) / label
            write_stack(
                folder,
                args.slices,
                axes=AXIAL,
                shape=(args.size, args.size),
                instances=range(args.slices, 0, -1),  # reversed, as in many real series
                transfer_syntax=syntax,
                rng=np.random.default_rng(0),
            )
            times = time_loops(folder, args.repeats, args.clock)
            cells = "".join(f"{min(t):>9.3f} /{statistics.median(t):>6.3f}" for t in times.values())
            pairs = zip(times["read_series"], times["bare"], strict=True)
            ratio = statistics.median(o / b for o, b in pairs)
            print(f"{label:<14}{cells}{ratio:>8.2f}")


if __name__ == "__main__":
    main()
