"""Build the vendored SPIDER T2-SPACE tarball, ``vendor/spider-t2space/spider-t2space.tar.xz``.

    python scripts/vendor_spider.py SRC [--out FILE]

SRC is the SPIDER T2-SPACE folder (``series/``, ``masks/``, the CSVs). The tarball holds, at its
root, the series with their pixel values rounded to multiples of 8 (the 8-bit steps of SPIDER's
source PNGs: the set stores 8 x a mean of 8-bit values, whose fractional part is noise that xz
cannot compress; headers untouched, still uint16), the CSVs, ``masks/`` and an
``ATTRIBUTION.md``. The tar is deterministic (sorted names, mtime 0, owner 0, no user names,
ustar), so the same SRC gives the same bytes with the same xz library. Prints size and sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import sys
import tarfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from spinegrade.rsna.spider import CITATION, DOI_DATA, LICENCE_URL
from spinegrade.util.atomic import atomic_path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "vendor" / "spider-t2space" / "spider-t2space.tar.xz"
CSVS = ("truth.csv", "canal.csv", "cases.csv", "gradings.csv", "excluded.csv")
FOLDERS = ("series", "masks")
STEP = 8  # SPIDER's PNGs are 8-bit; the set scaled them by 8
XZ_PRESET = 9 | lzma.PRESET_EXTREME  # the tarball lives in git: every MB counts, once

ATTRIBUTION = f"""# SPIDER T2-SPACE, as vendored by spinegrade

Derived from the SPIDER lumbar spine MRI data set:

> {CITATION}
>
> Data: Zenodo, {DOI_DATA}

Licence: Creative Commons Attribution 4.0 International (CC BY 4.0, {LICENCE_URL}). Anyone who
uses or passes on these files must credit SPIDER as above, link the licence and say what was
changed. The SPIDER authors have not reviewed or endorsed this copy or spinegrade.

What differs from SPIDER: 38 of its 41 sagittal T2 SPACE series, read from third-party 8-bit
PNG exports (each slice min-max scaled there), only the central 13-30 mm; groups of four source
slices averaged into 4 mm slices, each image halved in both directions by 2 x 2 averaging,
values scaled by 8 and then rounded to multiples of 8; new DICOM headers and UIDs with an
arbitrary origin (left/right not guaranteed); disc centres, canal points and 4-class label maps
computed from SPIDER's masks and named by level; SPIDER's disc gradings re-keyed by level.
"""


def quantise(data: bytes, name: str) -> bytes:
    """The DICOM file ``data`` with pixel values rounded to multiples of STEP, headers as they are.

    Only the trailing Pixel Data value is rewritten, so every header byte (UIDs, window, the
    description of the derivation) stays identical.
    """
    ds = pydicom.dcmread(io.BytesIO(data))
    simple = (
        ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        and ds.BitsAllocated == 16
        and ds.PixelRepresentation == 0
        and ds.SamplesPerPixel == 1
        and "NumberOfFrames" not in ds
    )
    raw = ds.PixelData
    if not simple or not data.endswith(raw):
        raise ValueError(
            f"{name}: expected uncompressed unsigned 16-bit pixels at the end of the file (as the "
            "SPIDER T2-SPACE set writes them); is SRC that set?"
        )
    pixels = np.frombuffer(raw, dtype="<u2").astype(np.int64)
    top = (2**ds.BitsStored - 1) // STEP * STEP  # a rounded value must still fit BitsStored
    rounded = np.minimum(np.rint(pixels / STEP).astype(np.int64) * STEP, top)
    return data[: len(data) - len(raw)] + rounded.astype("<u2").tobytes()


def _members(src: Path) -> list[tuple[str, bytes]]:
    """(name in the tarball, bytes) of everything vendored, sorted by name."""
    missing = [n for n in (*CSVS, *FOLDERS) if not (src / n).exists()]
    if missing:
        raise SystemExit(f"{src}: {', '.join(missing)} not found; SRC must be the SPIDER set")
    items = [(name, (src / name).read_bytes()) for name in CSVS]
    items.append(("ATTRIBUTION.md", ATTRIBUTION.encode()))
    for folder in FOLDERS:
        for path in sorted(p for p in (src / folder).rglob("*") if p.is_file()):
            name = path.relative_to(src).as_posix()
            data = path.read_bytes()
            items.append((name, quantise(data, name) if path.suffix == ".dcm" else data))
    return sorted(items)


def build(src: str | Path, out: str | Path = DEFAULT_OUT) -> Path:
    """Write the deterministic tarball of ``src`` to ``out`` (atomically); returns ``out``."""
    out = Path(out)
    with (
        atomic_path(out) as tmp,
        tarfile.open(tmp, "w:xz", preset=XZ_PRESET, format=tarfile.USTAR_FORMAT) as tar,
    ):
        for name, data in _members(Path(src)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="the SPIDER T2-SPACE folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="tarball to write")
    args = parser.parse_args(argv)
    out = build(args.src, args.out)
    data = out.read_bytes()
    print(f"{out}: {len(data)} bytes ({len(data) / 1e6:.2f} MB)")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    sys.exit(main())
