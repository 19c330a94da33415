"""MR acquisition of a phantom spine: series planning, image formation and label projection.

Planning follows what a radiographer does: sagittal stacks aligned with the patient's midline
(15-17 slices covering both foramina), axial stacks angled along each disc. Image formation
follows the scanner: the tissue signal is sampled at acquisition resolution (~1 mm) and multiplied
by the receive-coil sensitivity (the spine coil lies under the patient's back, so signal falls
off anteriorly); complex Gaussian noise is added; the image is zero-filled in k-space to the
display matrix (which gives MR-like interpolation, correlated noise and a little Gibbs ringing);
the magnitude is Rician. Geometry is DICOM LPS throughout: ``row_dir`` is the direction of
increasing column index, ``col_dir`` of increasing row index, pixel (0, 0) sits at ``position``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.fft as sfft

from spinegrade.phantom.anatomy import N_LEVELS, Anatomy, canal_centre_local
from spinegrade.phantom.scene import (
    TISSUES,
    Op,
    SliceContext,
    SliceGrid,
    Texture,
    render_signal,
)

ACQ_SPACING_MM = 1.05  # in-plane resolution the tissue model is sampled at


@dataclass
class SlicePlan:
    """Geometry of one image (patient LPS, mm)."""

    position: np.ndarray  # ImagePositionPatient: centre of pixel (0, 0)
    row_dir: np.ndarray  # first ImageOrientationPatient triplet (increasing column)
    col_dir: np.ndarray  # second triplet (increasing row)
    spacing: tuple[float, float]  # PixelSpacing (row spacing dy, column spacing dx)
    shape: tuple[int, int]  # (Rows, Columns)
    thickness: float
    level: int | None = None  # label level of an axial stack, None for sagittal

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    def to_pixel(self, point: np.ndarray) -> tuple[float, float, float]:
        """(x = column, y = row, distance from the plane) of a patient point."""
        rel = np.asarray(point, dtype=float) - self.position
        return (
            float(rel @ self.row_dir / self.spacing[1]),
            float(rel @ self.col_dir / self.spacing[0]),
            float(rel @ self.normal),
        )

    def to_patient(self, x: float, y: float) -> np.ndarray:
        """Patient point of pixel coordinates (x = column, y = row)."""
        return (
            self.position + x * self.spacing[1] * self.row_dir + y * self.spacing[0] * self.col_dir
        )


@dataclass
class SeriesPlan:
    """One series: its description, contrast and slices in geometric order (along the normal)."""

    description: str
    contrast: str  # "T1", "T2" or "STIR"
    slices: list[SlicePlan]
    instance_numbers: list[int] = field(default_factory=list)

    def nearest_slice(self, point: np.ndarray) -> tuple[int, float, float, float]:
        """(slice index, x, y, |distance|) of the slice whose plane is closest to ``point``."""
        best = None
        for k, sl in enumerate(self.slices):
            x, y, dist = sl.to_pixel(point)
            if best is None or abs(dist) < best[3]:
                best = (k, x, y, abs(dist))
        assert best is not None
        return best


def _orthonormal(normal: np.ndarray, row_hint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """row_dir close to ``row_hint`` and col_dir with row x col = normal."""
    n = normal / np.linalg.norm(normal)
    row = row_hint - (row_hint @ n) * n
    row /= np.linalg.norm(row)
    return row, np.cross(n, row)


def _tilt(rng: np.random.Generator, v: np.ndarray, sd_deg: float) -> np.ndarray:
    """``v`` turned by a small random angle (planning error)."""
    w = v + np.tan(np.deg2rad(sd_deg)) * rng.normal(size=3)
    return w / np.linalg.norm(w)


def _stack(
    centre: np.ndarray,
    normal: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    offsets: np.ndarray,
    matrix: int,
    fov: float,
    thickness: float,
    level: int | None = None,
) -> list[SlicePlan]:
    """Slices centred on ``centre`` + offset * normal, square matrix over a square FOV."""
    sp = fov / matrix
    half = (matrix - 1) / 2 * sp
    corner = centre - half * row - half * col
    n = normal / np.linalg.norm(normal)
    return [
        SlicePlan(corner + o * n, row, col, (sp, sp), (matrix, matrix), thickness, level)
        for o in offsets
    ]


@dataclass
class SagittalGeometry:
    """Where a sagittal stack was planned: centre, axes, slice offsets, field of view."""

    centre: np.ndarray
    normal: np.ndarray
    row: np.ndarray
    col: np.ndarray
    offsets: np.ndarray
    fov: float
    thickness: float

    @classmethod
    def plan(cls, rng: np.random.Generator, anat: Anatomy, n_slices: int) -> SagittalGeometry:
        """Aligned with the patient's midline (+-1.5 deg), centred near the canal at L3/L4."""
        rot = anat.rotation
        normal = _tilt(rng, -rot[:, 0], 1.5)  # DICOM sagittal normal points to the patient's right
        row, col = _orthonormal(normal, rot[:, 1])  # columns run posterior, rows inferior
        disc = anat.label_disc(2)
        centre = anat.to_patient(disc.frame.to_body(canal_centre_local(anat, disc)))
        centre = centre + row * rng.normal(-15, 8) + col * rng.normal(0, 12)
        centre = centre + normal * rng.normal(0, 1.5)
        spacing = rng.uniform(3.3, 4.0)
        offsets = (np.arange(n_slices) - (n_slices - 1) / 2) * spacing
        thickness = spacing * rng.uniform(0.85, 1.0)
        return cls(centre, normal, row, col, offsets, rng.uniform(280.0, 320.0), thickness)

    def slices(self, matrix: int) -> list[SlicePlan]:
        """The stack on a ``matrix`` x ``matrix`` grid, ordered along the normal (left to right)."""
        return _stack(
            self.centre,
            self.normal,
            self.row,
            self.col,
            self.offsets,
            matrix,
            self.fov,
            self.thickness,
        )


def plan_axial(
    rng: np.random.Generator, anat: Anatomy, levels: list[int], per_level: int
) -> list[SlicePlan]:
    """One stack per level, angled along the disc, centred on the canal (slices ordered S->I)."""
    rot = anat.rotation
    matrix = int(rng.choice([320, 384]))
    fov = rng.uniform(190.0, 235.0)
    spacing = rng.uniform(3.5, 4.5)
    thickness = spacing * rng.uniform(0.8, 1.0)
    shift = rng.normal(0, 6, 2)
    slices: list[SlicePlan] = []
    for li in levels:
        disc = anat.label_disc(li)
        normal = _tilt(rng, rot @ disc.frame.axes[2], 2.0)  # superior, along the disc normal
        row, col = _orthonormal(normal, rot[:, 0])  # columns to the patient's left, rows posterior
        centre = anat.to_patient(disc.frame.to_body(canal_centre_local(anat, disc)))
        centre = centre + row * shift[0] + col * (shift[1] - 15.0)
        offsets = (np.arange(per_level) - (per_level - 1) / 2) * spacing + rng.normal(0, 0.6)
        # geometric order along the normal is inferior -> superior
        slices += _stack(centre, normal, row, col, offsets, matrix, fov, thickness, level=li)
    return slices


@dataclass
class Scanner:
    """Per-study acquisition settings: coil sensitivity, noise, intensity scale, textures, and
    the tissue contrast, which varies between scanners and protocols (+-8% per tissue)."""

    coil_decay: float  # mm, how fast the posterior coil's sensitivity falls off anteriorly
    noise: float  # complex noise SD relative to a unit tissue signal
    scale: float  # stored value of a unit signal at full coil sensitivity
    textures: dict[str, Texture]
    tissue_gain: dict[str, float] = field(default_factory=dict)

    @classmethod
    def random(cls, rng: np.random.Generator) -> Scanner:
        tex = {
            "fine": Texture.random(rng, 40, (1.5, 10.0)),
            "coarse": Texture.random(rng, 48, (6.0, 60.0)),
        }
        gains = {t: float(np.clip(rng.normal(1.0, 0.08), 0.8, 1.2)) for t in TISSUES}
        return cls(
            coil_decay=float(rng.uniform(80.0, 160.0)),
            noise=float(rng.uniform(0.025, 0.05)),
            scale=float(rng.uniform(500.0, 2500.0)),
            textures=tex,
            tissue_gain=gains,
        )


def render_slice(
    rng: np.random.Generator,
    anat: Anatomy,
    ops: list[Op],
    scanner: Scanner,
    plan: SlicePlan,
    contrasts: tuple[str, ...],
) -> list[np.ndarray]:
    """uint16 pixels (Rows x Columns) of one slice position, one image per contrast."""
    rows, cols = plan.shape
    hi = max(round(rows * plan.spacing[0] / ACQ_SPACING_MM), 16)
    wi = max(round(cols * plan.spacing[1] / ACQ_SPACING_MM), 16)
    # Acquisition samples sit on display pixels 0, F, 2F, ... (what k-space zero-filling assumes).
    fy, fx = rows / hi, cols / wi
    rot_t = anat.rotation.T
    grid = SliceGrid(
        origin=anat.to_body(plan.position),
        du=rot_t @ plan.row_dir * plan.spacing[1] * fx,
        dv=rot_t @ plan.col_dir * plan.spacing[0] * fy,
        shape=(hi, wi),
    )
    ctx = SliceContext(grid, anat.planes, anat.canal_points, scanner.textures, scanner.tissue_gain)
    signal = render_signal(ops, grid, contrasts, ctx) * _coil(ctx, anat, scanner)
    out = []
    for sig in signal:
        noisy = sig + scanner.noise * (
            rng.standard_normal(sig.shape, dtype=np.float32)
            + 1j * rng.standard_normal(sig.shape, dtype=np.float32)
        )
        image = np.abs(_zero_fill(noisy, (rows, cols)))
        out.append(np.clip(np.rint(image * scanner.scale), 0, 65535).astype(np.uint16))
    return out


def _coil(ctx: SliceContext, anat: Anatomy, scanner: Scanner) -> np.ndarray:
    """Receive sensitivity: exponential fall-off from the back, weaker at the coil's ends."""
    depth = np.maximum(anat.back_q - ctx.get("q"), 0.0)
    s = ctx.get("s")
    s_mid = 0.5 * (s.min() + s.max()) if s.size else 0.0
    along = 1.0 - 0.25 * np.clip(((s - s_mid) / 200.0) ** 2, 0, 1)
    return (0.3 + 0.7 * np.exp(-depth / scanner.coil_decay)) * along


def _zero_fill(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Interpolate a complex image to ``shape`` by zero-padding its centred k-space."""
    h, w = img.shape
    k = sfft.fftshift(sfft.fft2(img.astype(np.complex64)))
    out = np.zeros(shape, dtype=np.complex64)
    oy, ox = (shape[0] - h) // 2, (shape[1] - w) // 2
    out[oy : oy + h, ox : ox + w] = k
    return sfft.ifft2(sfft.ifftshift(out)) * np.float32(shape[0] * shape[1] / (h * w))


def series_levels(n_levels: int = N_LEVELS) -> list[int]:
    """All label levels, L1/L2 first."""
    return list(range(n_levels))
