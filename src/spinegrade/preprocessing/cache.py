"""The preprocessing cache: cached stacks with their patient-space geometry, the index, projections.

A cached stack is the pixels of one DICOM stack after intensity rescaling (uint8) and in-plane
resampling (native spacing, capped: see :class:`spinegrade.preprocessing.series.CacheParams`), plus
everything needed to go from a cached voxel to patient coordinates (DICOM LPS, mm) and back. On disk
a stack is two files: ``NAME.npz`` (geometry, small) and ``NAME.npy`` (the raw uint8 volume). The
volume is memory-mapped when read, so the pixels of every study live in the OS page cache, shared by
fold processes, DataLoader workers and DDP ranks, and a process's private memory does not grow with
the number of studies. ``manifest.json`` records the settings the cache was made with. Conventions:

* voxel ``(z, y, x)``: slice ``z`` (geometric order, increasing along ``normal``), row ``y``,
  column ``x``; integer values are pixel *centres*.
* ``positions[z]`` is the LPS position of the centre of cached voxel ``(z, 0, 0)``; ``row_dir`` is
  the direction of increasing ``x`` and ``col_dir`` of increasing ``y`` (DICOM
  ImageOrientationPatient order), so ``p = positions[z] + x*dx*row_dir + y*dy*col_dir``.
* RSNA label points ``(x, y)`` are pixel coordinates in the *original* slice; the resize maps the
  pixel grid edge to edge, so ``x' = (x + 0.5) * W / W0 - 0.5``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.io.slice_geometry import SliceGeometry
from spinegrade.util.atomic import atomic_path

FORMAT_VERSION = 2  # 2: volume in a raw .npy beside the geometry .npz (memory-mappable)
INDEX_NAME = "index.csv"
MANIFEST_NAME = "manifest.json"
# Memory maps kept open at once (each holds a file descriptor): enough for the stacks a batch
# touches, far below the usual 1024-descriptor limit even with ~10 stacks a study.
_OPEN_VOLUMES = 128
INDEX_COLUMNS: tuple[str, ...] = (
    "split", "study_id", "series_id", "stack", "description", "plane", "direction",
    "n_slices", "height", "width", "orig_rows", "orig_cols", "has_geometry",
    "spacing_row", "spacing_col", "slice_spacing", "status", "reason", "path",
)  # fmt: skip
_INT_COLUMNS = ("study_id", "series_id", "stack", "n_slices", "height", "width")
_INT_COLUMNS += ("orig_rows", "orig_cols")


@dataclass
class CachedStack(SliceGeometry):
    """One cached stack: uint8 volume ``(D, H, W)`` plus per-slice geometry (see module doc)."""

    volume: np.ndarray  # uint8 (D, H, W); None with volume_path: memory-mapped on use
    positions: np.ndarray  # float64 (D, 3): LPS centre of cached voxel (z, 0, 0)
    row_dir: np.ndarray  # (3,) direction of increasing x
    col_dir: np.ndarray  # (3,) direction of increasing y
    spacing: tuple[float, float]  # cached (dy, dx) in mm
    orig_shape: tuple[int, int]  # original (rows, cols)
    instance_numbers: np.ndarray  # int64 (D,)
    study_id: int = 0
    series_id: int = 0
    stack: int = 0
    description: str = ""
    plane: str = ""
    direction: str = ""
    # False when the DICOM files had no patient geometry: slices are then on a nominal grid and
    # points must not be mapped to other series.
    has_geometry: bool = True
    # The .npy the volume is read from on demand (memory-mapped) when ``volume`` is None.
    volume_path: str = ""
    _by_instance: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.shape)  # type: ignore[return-value]

    def slice_index(self, instance_number: int) -> int:
        """Cached slice index of a DICOM InstanceNumber."""
        if not self._by_instance:
            for i, n in enumerate(self.instance_numbers.tolist()):
                self._by_instance.setdefault(int(n), i)
        try:
            return self._by_instance[int(instance_number)]
        except KeyError:
            raise KeyError(
                f"instance_number {instance_number} is not in study {self.study_id} series "
                f"{self.series_id} stack {self.stack} (instances "
                f"{self.instance_numbers.min()}..{self.instance_numbers.max()}); check the label "
                "row's series_id, or look in the series' other stacks"
            ) from None

    def has_instance(self, instance_number: int) -> bool:
        return bool(np.any(self.instance_numbers == int(instance_number)))

    def orig_to_cached_xy(self, x: float | np.ndarray, y: float | np.ndarray):
        """Original pixel coordinates -> cached pixel coordinates (pixel-centre convention)."""
        h, w = self.volume.shape[1:]
        h0, w0 = self.orig_shape
        return (np.asarray(x) + 0.5) * w / w0 - 0.5, (np.asarray(y) + 0.5) * h / h0 - 0.5

    def cached_to_orig_xy(self, x: float | np.ndarray, y: float | np.ndarray):
        """Cached pixel coordinates -> original pixel coordinates."""
        h, w = self.volume.shape[1:]
        h0, w0 = self.orig_shape
        return (np.asarray(x) + 0.5) * w0 / w - 0.5, (np.asarray(y) + 0.5) * h0 / h - 0.5

    def _origin_at(self, z: np.ndarray) -> np.ndarray:
        """Position of voxel (z, 0, 0) for fractional z: linear between slices, extrapolated out."""
        d = len(self.positions)
        if d == 1:  # no slice spacing known: move along the normal at 1 mm per unit of z
            return self.positions[0] + z[..., None] * self.normal
        i0 = np.clip(np.floor(z), 0, d - 2).astype(np.int64)
        t = (z - i0)[..., None]
        return self.positions[i0] * (1.0 - t) + self.positions[i0 + 1] * t

    def voxel_to_patient(self, z, y, x) -> np.ndarray:
        """Cached voxel ``(z, y, x)`` (floats, broadcastable) -> LPS mm, shape ``(..., 3)``."""
        z, y, x = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (z, y, x)))
        dy, dx = self.spacing
        origin = self._origin_at(z)
        return origin + (x * dx)[..., None] * self.row_dir + (y * dy)[..., None] * self.col_dir

    def patient_to_voxel(self, p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """LPS point(s) ``(..., 3)`` -> fractional voxel ``(z, y, x)`` (may lie outside)."""
        p = np.asarray(p, dtype=np.float64)
        s = p @ self.normal
        sp = self.slice_positions
        if len(sp) == 1:
            z = s - sp[0]
        else:  # invert the piecewise-linear slice positions (extrapolating past the ends)
            i0 = np.clip(np.searchsorted(sp, s) - 1, 0, len(sp) - 2)
            gap = np.maximum(sp[i0 + 1] - sp[i0], 1e-9)
            z = i0 + (s - sp[i0]) / gap
        d = p - self._origin_at(np.asarray(z, dtype=np.float64))
        # Solve d = a*row_dir + b*col_dir exactly (IOP vectors are only nearly orthogonal).
        r, c = self.row_dir, self.col_dir
        gram = np.array([[r @ r, r @ c], [r @ c, c @ c]])
        ab = np.linalg.solve(gram, np.stack([d @ r, d @ c], axis=-1)[..., None])[..., 0]
        dy, dx = self.spacing
        return np.asarray(z), ab[..., 1] / dy, ab[..., 0] / dx

    def label_to_voxel(
        self, instance_number: int, x: float, y: float
    ) -> tuple[float, float, float]:
        """RSNA label point (InstanceNumber, original x, y) -> cached voxel ``(z, y', x')``."""
        z = self.slice_index(instance_number)
        xc, yc = self.orig_to_cached_xy(x, y)
        return float(z), float(yc), float(xc)

    def label_to_patient(self, instance_number: int, x: float, y: float) -> np.ndarray:
        """RSNA label point -> LPS mm ``(3,)``."""
        return self.voxel_to_patient(*self.label_to_voxel(instance_number, x, y))


@functools.lru_cache(maxsize=_OPEN_VOLUMES)
def _mapped_volume(path: str) -> np.ndarray:
    """A read-only memory map of a cached volume (a few at a time: see ``_OPEN_VOLUMES``)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _get_volume(self: CachedStack) -> np.ndarray:
    v = self.__dict__.get("_volume")
    if v is None:
        if not self.volume_path:
            raise ValueError(f"cached stack {self.series_id}_{self.stack} has no volume")
        v = _mapped_volume(self.volume_path)
    return v


def _set_volume(self: CachedStack, value: np.ndarray | None) -> None:
    self.__dict__["_volume"] = value


# ``volume`` is a dataclass field (so ``CachedStack(volume=...)`` works) backed by a property: a
# stack read from the cache holds only its file name, pickles as such (a spawned DataLoader worker
# or rank maps the same file instead of receiving a copy) and maps the pixels when used.
CachedStack.volume = property(_get_volume, _set_volume)  # type: ignore[assignment]


def volume_file(path: str | Path) -> Path:
    """The raw volume file of the cached stack whose geometry is at ``path`` (``.npz``)."""
    return Path(path).with_suffix(".npy")


def stack_bytes(path: str | Path) -> int:
    """Bytes of a cached stack on disk (geometry + volume), -1 when either file is missing."""
    try:
        return Path(path).stat().st_size + volume_file(path).stat().st_size
    except OSError:
        return -1


def stack_to_npz_payload(stack: CachedStack) -> dict[str, np.ndarray]:
    """Geometry arrays stored for a cached stack (no pickled objects: strings are unicode)."""
    meta = {
        "format": FORMAT_VERSION,
        "study_id": int(stack.study_id),
        "series_id": int(stack.series_id),
        "stack": int(stack.stack),
        "description": stack.description,
        "plane": stack.plane,
        "direction": stack.direction,
        "has_geometry": bool(stack.has_geometry),
        "spacing": [float(v) for v in stack.spacing],
        "orig_shape": [int(v) for v in stack.orig_shape],
        "shape": [int(v) for v in stack.volume.shape],
    }
    return {
        "positions": np.asarray(stack.positions, dtype=np.float64),
        "row_dir": np.asarray(stack.row_dir, dtype=np.float64),
        "col_dir": np.asarray(stack.col_dir, dtype=np.float64),
        "instance_numbers": np.asarray(stack.instance_numbers, dtype=np.int64),
        "meta": np.array(json.dumps(meta)),
    }


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[io.BufferedWriter]:
    """Open ``path`` for binary writing through :func:`spinegrade.util.atomic.atomic_path`.

    A reader never sees a half-written file under the final name: a killed writer leaves only a
    ``.NAME.tmp-<pid>`` file, which no later stage globs for and the next run removes.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def save_stack(stack: CachedStack, path: Path) -> int:
    """Write a cached stack atomically (volume .npy first, then the geometry .npz at ``path``;
    uncompressed: memory-mappable and fastest to load); returns its bytes on disk."""
    with atomic_open(volume_file(path)) as f:
        np.save(f, np.ascontiguousarray(stack.volume, dtype=np.uint8), allow_pickle=False)
    with atomic_open(path) as f:
        np.savez(f, **stack_to_npz_payload(stack))
    return stack_bytes(path)


def load_stack(path: str | Path, mmap: bool = True) -> CachedStack:
    """Read a cached stack written by :func:`save_stack`.

    ``mmap=True`` (default) keeps only the geometry in memory; the volume is memory-mapped from
    its ``.npy`` when used. ``mmap=False`` reads the volume into private memory.
    """
    path = Path(path)
    vol_path = volume_file(path)
    if not vol_path.is_file():
        raise FileNotFoundError(
            f"{vol_path} not found (the volume of cached stack {path}): rerun `spinegrade "
            "preprocess` to rebuild the cache"
        )
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: cache format {meta.get('format')} but this spinegrade reads "
                f"{FORMAT_VERSION}; rerun `spinegrade preprocess` to rebuild the cache"
            )
        return CachedStack(
            volume=None if mmap else np.load(vol_path, allow_pickle=False),
            positions=z["positions"],
            row_dir=z["row_dir"],
            col_dir=z["col_dir"],
            spacing=(float(meta["spacing"][0]), float(meta["spacing"][1])),
            orig_shape=(int(meta["orig_shape"][0]), int(meta["orig_shape"][1])),
            instance_numbers=z["instance_numbers"],
            study_id=int(meta["study_id"]),
            series_id=int(meta["series_id"]),
            stack=int(meta["stack"]),
            description=meta["description"],
            plane=meta["plane"],
            direction=meta.get("direction", ""),
            has_geometry=bool(meta.get("has_geometry", True)),
            volume_path=str(vol_path),
        )


# ----------------------------------------------------------------------------- manifest


def write_manifest(cache_dir: Path, settings: dict, version: str) -> Path:
    """Record how the cache was made (settings, format, spinegrade version), atomically."""
    path = Path(cache_dir) / MANIFEST_NAME
    record = {"format": FORMAT_VERSION, "spinegrade": version, "settings": settings}
    with atomic_open(path) as f:
        f.write(json.dumps(record, indent=1, sort_keys=True).encode())
    return path


def read_manifest(cache_dir: str | Path) -> dict | None:
    """The cache's manifest, or None when it has none (made by an older spinegrade)."""
    try:
        return json.loads((Path(cache_dir) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def check_cache_settings(cache_dir: str | Path, wanted: dict, fix: str) -> None:
    """Raise ValueError unless the cache was made with ``wanted`` settings (and this format).

    ``fix`` says what to do (e.g. the command that rebuilds the cache as the run needs it); the
    message names every setting that differs, so a model is never trained or applied on pixels
    of another grid.
    """
    manifest = read_manifest(cache_dir)
    path = Path(cache_dir) / MANIFEST_NAME
    if manifest is None:
        raise ValueError(
            f"{path} not found: the cache {cache_dir} was made by an older spinegrade or not "
            f"finished; {fix}"
        )
    have = manifest.get("settings", {})
    diff = [f"{k}: cache {have.get(k)!r}, run {v!r}" for k, v in wanted.items() if have.get(k) != v]
    if manifest.get("format") != FORMAT_VERSION:
        fmt = manifest.get("format")
        diff.insert(0, f"format: cache {fmt!r}, this spinegrade {FORMAT_VERSION}")
    if diff:
        raise ValueError(
            f"the cache {cache_dir} was made with other settings than this run's config "
            f"({'; '.join(diff)}; see {path}): {fix}"
        )


def index_frame(rows: Sequence[dict] | pd.DataFrame) -> pd.DataFrame:
    """Rows (dicts or a frame) -> the index table with fixed columns, order and dtypes."""
    data = rows if isinstance(rows, pd.DataFrame) else list(rows)
    df = pd.DataFrame(data, columns=list(INDEX_COLUMNS))
    for col in _INT_COLUMNS:
        df[col] = pd.to_numeric(df[col]).fillna(0 if col != "stack" else -1).astype(np.int64)
    for col in ("spacing_row", "spacing_col", "slice_spacing"):
        df[col] = pd.to_numeric(df[col]).astype(np.float64)
    # Booleans arrive as bools, or as "True"/"False" text from the CSV; failed rows have none.
    df["has_geometry"] = df["has_geometry"].astype(str).str.lower().isin(("true", "1"))
    for col in ("split", "description", "plane", "direction", "status", "reason", "path"):
        df[col] = df[col].astype(object).fillna("").astype(str)
    return df.sort_values(["split", "study_id", "series_id", "stack"], kind="stable").reset_index(
        drop=True
    )


def write_index(cache_dir: Path, rows: Sequence[dict]) -> Path:
    """Write ``CACHE_DIR/index.csv`` atomically."""
    path = Path(cache_dir) / INDEX_NAME
    with atomic_open(path) as f:
        index_frame(rows).to_csv(f, index=False)
    return path


def read_index(cache_dir: str | Path) -> pd.DataFrame:
    """The cache's index table (one row per stack and per failed series), typed."""
    path = Path(cache_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run `spinegrade preprocess DATA_DIR --cache {cache_dir}` first"
        )
    # Only empty cells are missing: a description or reason must never turn into NaN.
    return index_frame(pd.read_csv(path, keep_default_na=False, na_values=[""]))


def load_study_stacks(
    cache_dir: str | Path, study_id: int, split: str = "train", index: pd.DataFrame | None = None
) -> list[CachedStack]:
    """All cached stacks of one study (status ok), in index order."""
    index = read_index(cache_dir) if index is None else index
    sel = index[
        (index["split"] == split) & (index["study_id"] == int(study_id)) & (index["status"] == "ok")
    ]
    return [load_stack(Path(cache_dir) / p) for p in sel["path"]]


def find_stack(stacks: Sequence[CachedStack], series_id: int, instance_number: int) -> CachedStack:
    """The stack of ``series_id`` holding ``instance_number`` (a series may have several stacks)."""
    for s in stacks:
        if s.series_id == int(series_id) and s.has_instance(instance_number):
            return s
    raise KeyError(
        f"no cached stack of series {series_id} holds instance_number {instance_number}; "
        "check the label row against the index (status/reason columns)"
    )


def _footprint_distance(stack: CachedStack, p: np.ndarray) -> tuple[int, float, float, float, bool]:
    """Nearest slice of ``stack`` to ``p``: (z, y, x, distance to its rectangle, inside)."""
    zf, y, x = stack.patient_to_voxel(p)
    d, h, w = stack.volume.shape
    z = int(np.clip(np.rint(zf), 0, d - 1))
    y, x = float(y), float(x)
    inside = -0.5 <= y <= h - 0.5 and -0.5 <= x <= w - 0.5
    # Closest point of the slice rectangle (pixel edges at -0.5 and size - 0.5).
    yc, xc = float(np.clip(y, -0.5, h - 0.5)), float(np.clip(x, -0.5, w - 0.5))
    dist = float(np.linalg.norm(p - stack.voxel_to_patient(z, yc, xc)))
    return z, y, x, dist, inside


def project_point(point_lps, stacks: Sequence[CachedStack]) -> tuple[int, int, float, float, float]:
    """Nearest stack and slice for a patient point, e.g. a sagittal level point onto axial stacks.

    Returns ``(stack_idx, z, y, x, distance_mm)``: ``z`` the nearest slice index, ``(y, x)`` the
    point's in-plane position on it (cached pixels) and ``distance_mm`` its distance to that
    slice. Among stacks whose in-plane footprint contains the point, the smallest distance to the
    slice plane wins (axial stacks are angled per disc, so "nearest plane" picks the disc's own
    stack); when none contains it, the stack whose nearest slice rectangle is closest wins and
    the distance includes the in-plane miss, so callers can reject it with a threshold.
    Stacks without patient geometry are never chosen.
    """
    if not any(s.has_geometry for s in stacks):
        raise ValueError(
            "project_point needs at least one cached stack with patient geometry "
            f"(got {len(stacks)}; stacks read from files without geometry cannot be mapped)"
        )
    p = np.asarray(point_lps, dtype=np.float64).reshape(3)
    cands = [(_footprint_distance(s, p), i) for i, s in enumerate(stacks) if s.has_geometry]
    inside = [c for c in cands if c[0][4]]
    (z, y, x, dist, _), i = min(inside or cands, key=lambda c: c[0][3])
    return i, z, y, x, dist


def map_label_point(
    source: CachedStack, instance_number: int, x: float, y: float, targets: Sequence[CachedStack]
) -> tuple[int, int, float, float, float]:
    """Map an RSNA label point of ``source`` into the grid of other stacks (see project_point)."""
    return project_point(source.label_to_patient(instance_number, x, y), targets)
