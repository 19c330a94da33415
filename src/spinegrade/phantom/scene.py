"""Tissue maps of the phantom on any 2D slice: analytic shapes, partial volume, priority painting.

A :class:`SliceGrid` is an affine 2D grid of points in body coordinates (one image's pixel
centres). The scene is a list of paint operations (:class:`Op`), sorted by priority: each paints
one tissue with a fractional coverage in [0, 1] (a linear ramp of an approximate signed distance,
which is the partial-volume effect of a ~1 mm voxel) over what was painted before. So a disc
bulge painted after the thecal sac indents it, exactly as the real disc does.

Rigid structures (bones, discs, foramina) are evaluated in their own frames and only inside the
pixel box where their bounding sphere cuts the slice. Tube-like soft tissue (sac, epidural fat,
muscles, skin) uses canal coordinates computed once per slice (see :mod:`.anatomy`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# Relative signal of each tissue on T1-weighted, T2-weighted (FSE) and STIR images, and the
# amplitude of its texture. T1: fat and fatty marrow bright, CSF dark. T2: CSF bright, fat
# fairly bright, hydrated nucleus bright. STIR: fat suppressed, fluid bright.
TISSUES: dict[str, tuple[float, float, float, float]] = {
    "fat": (1.00, 0.64, 0.06, 0.06),
    "muscle": (0.32, 0.20, 0.24, 0.16),
    "viscera": (0.38, 0.32, 0.35, 0.40),
    "vessel": (0.05, 0.04, 0.04, 0.0),
    "kidney": (0.45, 0.55, 0.62, 0.15),
    "marrow": (0.74, 0.52, 0.16, 0.16),
    "cortex": (0.04, 0.03, 0.03, 0.0),
    "annulus": (0.30, 0.14, 0.20, 0.06),
    "nucleus": (0.38, 0.82, 0.80, 0.06),
    "csf": (0.10, 1.00, 1.00, 0.02),
    "nerve": (0.40, 0.26, 0.34, 0.04),
    "cord": (0.46, 0.34, 0.40, 0.03),
    "ligament": (0.07, 0.06, 0.06, 0.0),
    "fibrous": (0.36, 0.30, 0.32, 0.08),
}
CONTRASTS: dict[str, int] = {"T1": 0, "T2": 1, "STIR": 2}
COARSE_TEXTURE = ("viscera",)  # bowel loops: large blobs; everything else: fine grain
EDGE_MM = 1.0  # width of the partial-volume ramp


def ramp(sdf: np.ndarray, width: float = EDGE_MM) -> np.ndarray:
    """Coverage in [0, 1] from a signed distance (negative inside)."""
    return np.clip(0.5 - sdf / width, 0.0, 1.0)


@dataclass
class SliceGrid:
    """Pixel centres ``origin + j * du + i * dv`` (row i, column j) in body coordinates."""

    origin: np.ndarray
    du: np.ndarray
    dv: np.ndarray
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        n = np.cross(self.du, self.dv)
        self.normal = n / np.linalg.norm(n)
        self._su, self._sv = float(np.linalg.norm(self.du)), float(np.linalg.norm(self.dv))

    def bbox(self, centre: np.ndarray, radius: float) -> tuple[slice, slice] | None:
        """Pixel box where a sphere cuts the slice, or None when it misses."""
        rel = centre - self.origin
        dist = float(rel @ self.normal)
        if abs(dist) >= radius:
            return None
        r = np.sqrt(radius**2 - dist**2)
        su, sv = self._su, self._sv
        j, i = float(rel @ self.du) / su**2, float(rel @ self.dv) / sv**2
        h, w = self.shape
        i0, i1 = max(int(i - r / sv), 0), min(int(i + r / sv) + 2, h)
        j0, j1 = max(int(j - r / su), 0), min(int(j + r / su) + 2, w)
        if i0 >= i1 or j0 >= j1:
            return None
        return slice(i0, i1), slice(j0, j1)

    def local(
        self, origin: np.ndarray, axes: np.ndarray, bb: tuple[slice, slice]
    ) -> tuple[np.ndarray, ...]:
        """Coordinates of the pixels of ``bb`` in a frame (rows of ``axes``), one array per axis."""
        rows = np.arange(bb[0].start, bb[0].stop, dtype=np.float32)[:, None]
        cols = np.arange(bb[1].start, bb[1].stop, dtype=np.float32)[None, :]
        c0 = axes @ (self.origin - origin)
        cu, cv = axes @ self.du, axes @ self.dv
        return tuple(
            (np.float32(c0[k]) + np.float32(cu[k]) * cols + np.float32(cv[k]) * rows)
            for k in range(axes.shape[0])
        )


@dataclass
class Op:
    """Paint ``tissue`` with coverage ``fn(ctx, bb)`` over a pixel box ``bb`` of the slice.

    The box is where ``sphere`` (centre, radius) cuts the slice, else ``region(ctx)`` (None: skip),
    else the whole slice. ``gain`` scales the tissue's signal per contrast (T1, T2, STIR), e.g. a
    desiccated nucleus on T2.
    """

    priority: int
    tissue: str
    fn: Callable[[SliceContext, tuple[slice, slice]], np.ndarray | None]
    sphere: tuple[np.ndarray, float] | None = None
    region: Callable[[SliceContext], tuple[slice, slice] | None] | None = None
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass
class Texture:
    """Band-limited 3D texture: a sum of random plane waves (coherent across slices)."""

    waves: np.ndarray  # (K, 3) wave vectors, rad/mm
    phases: np.ndarray  # (K,)

    @classmethod
    def random(cls, rng: np.random.Generator, k: int, wavelength: tuple[float, float]) -> Texture:
        dirs = rng.normal(size=(k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        # log-uniform wavelengths: a broad band, so the sum looks like tissue, not a lattice
        lam = np.exp(rng.uniform(np.log(wavelength[0]), np.log(wavelength[1]), size=(k, 1)))
        return cls(2 * np.pi * dirs / lam, rng.uniform(0, 2 * np.pi, k))

    def sample_grid(self, grid: SliceGrid) -> np.ndarray:
        """Unit-variance texture on a slice grid.

        On an affine grid each wave's phase is a_i + b_j, and cos(a + b) = cos a cos b -
        sin a sin b, so the whole sum is two small matrix products instead of a cosine per pixel.
        """
        h, w = grid.shape
        base = self.waves @ grid.origin + self.phases  # (K,)
        a = np.arange(h)[:, None] * (self.waves @ grid.dv)[None, :] + base  # (h, K)
        b = np.arange(w)[:, None] * (self.waves @ grid.du)[None, :]  # (w, K)
        out = np.cos(a) @ np.cos(b).T - np.sin(a) @ np.sin(b).T
        return (out * np.sqrt(2.0 / len(self.phases))).astype(np.float32)


@dataclass
class SliceContext:
    """Per-slice caches: canal coordinates, plane distances, textures."""

    grid: SliceGrid
    planes: list[tuple[np.ndarray, np.ndarray]]
    canal_points: np.ndarray
    textures: dict[str, Texture]
    tissue_gain: dict[str, float] = field(default_factory=dict)  # per-study contrast variation
    _cache: dict[str, np.ndarray] = field(default_factory=dict)
    _boxes: dict[str, tuple[slice, slice] | None] = field(default_factory=dict)

    def _affine(self, vec: np.ndarray, offset: float) -> np.ndarray:
        """``vec . point - offset`` on the whole grid (an affine function of row and column)."""
        g = self.grid
        h, w = g.shape
        rows = (np.arange(h, dtype=np.float32) * np.float32(vec @ g.dv))[:, None]
        cols = (np.arange(w, dtype=np.float32) * np.float32(vec @ g.du))[None, :]
        return rows + (cols + np.float32(vec @ g.origin - offset))

    def _compute_canal(self) -> None:
        h, w = self.grid.shape
        d = np.empty((len(self.planes), h, w), dtype=np.float32)
        for k, (p, n) in enumerate(self.planes):  # signed distance to every zone plane
            d[k] = self._affine(n, float(p @ n))
        n_zones = len(self.planes) - 1
        zone = np.clip(n_zones - (d > 0).sum(axis=0), 0, n_zones - 1)
        c = self.canal_points
        seg = c[1:] - c[:-1]
        length = np.linalg.norm(seg, axis=1)
        t = seg / length[:, None]
        post = np.stack([np.zeros(len(t)), -t[:, 2], t[:, 1]], axis=1)  # posterior, _|_ canal
        s0 = np.concatenate([[0.0], np.cumsum(length)[:-1]])
        d_top = np.take_along_axis(d, zone[None], 0)[0]
        d_bot = np.take_along_axis(d, zone[None] + 1, 0)[0]
        frac = -d_top / np.maximum(d_bot - d_top, 1e-3)
        ey, ez = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])
        # q = (p - c_zone) . post_zone with post = (0, py, pz): per-zone affine maps, gathered
        qy = self._affine(ey, 0.0)
        qz = self._affine(ez, 0.0)
        cz = c[:-1]
        q_off = (cz[:, 1] * post[:, 1] + cz[:, 2] * post[:, 2]).astype(np.float32)
        self._cache.update(
            plane_d=d,
            s=(s0.astype(np.float32)[zone] + frac * length.astype(np.float32)[zone]),
            q=qy * post[:, 1].astype(np.float32)[zone]
            + qz * post[:, 2].astype(np.float32)[zone]
            - q_off[zone],
            r=self._affine(np.array([1.0, 0.0, 0.0]), 0.0) - cz[:, 0].astype(np.float32)[zone],
        )

    def get(self, name: str) -> np.ndarray:
        """Full-slice array: ``s``, ``q``, ``r`` (canal coordinates) or ``plane_d``."""
        if name not in self._cache:
            self._compute_canal()
        return self._cache[name]

    def canal_box(
        self,
        r_max: float,
        q_min: float,
        q_max: float,
        r_min: float = -np.inf,
        s_range: tuple[float, float] = (-np.inf, np.inf),
    ) -> tuple[slice, slice] | None:
        """Pixel box of the part of the slice with r_min < |r| < r_max, q_min < q < q_max and s
        inside ``s_range`` (None when empty): where a soft-tissue op has to be evaluated."""
        key = f"box{r_max:.2f},{q_min:.2f},{q_max:.2f},{r_min:.2f},{s_range}"
        if key not in self._boxes:
            r, q = np.abs(self.get("r")), self.get("q")
            mask = (r < r_max) & (r > r_min) & (q > q_min) & (q < q_max)
            if np.isfinite(s_range).any():
                s = self.get("s")
                mask &= (s > s_range[0]) & (s < s_range[1])
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            box = None
            if len(rows):
                box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            self._boxes[key] = box
        return self._boxes[key]

    def cached(self, key: str, fn: Callable[[], np.ndarray]) -> np.ndarray:
        """Memoise a per-slice array (e.g. a bone's distance map shared by cortex and marrow)."""
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def texture(self, kind: str) -> np.ndarray:
        key = "tex_" + kind
        if key not in self._cache:
            self._cache[key] = self.textures[kind].sample_grid(self.grid)
        return self._cache[key]


def render_signal(
    ops: list[Op],
    grid: SliceGrid,
    contrasts: tuple[str, ...],
    ctx: SliceContext,
) -> np.ndarray:
    """Noise-free MR signal of one slice for each contrast (C, h, w): paint every op in order."""
    ci = [CONTRASTS[c] for c in contrasts]
    img = np.zeros((len(ci), *grid.shape), dtype=np.float32)
    whole = (slice(0, grid.shape[0]), slice(0, grid.shape[1]))
    for op in ops:
        if op.sphere is not None:
            bb = grid.bbox(*op.sphere)
        else:
            bb = op.region(ctx) if op.region is not None else whole
        if bb is None:
            continue
        cover = op.fn(ctx, bb)
        if cover is None:
            continue
        spec = TISSUES[op.tissue]
        tex = None
        if spec[3] > 0:
            kind = "coarse" if op.tissue in COARSE_TEXTURE else "fine"
            tex = 1 + np.float32(spec[3]) * ctx.texture(kind)[bb]
        for k, c in enumerate(ci):
            value = np.float32(spec[c] * op.gain[c] * ctx.tissue_gain.get(op.tissue, 1.0))
            sub = img[(k, *bb)]
            sub += cover * ((value * tex if tex is not None else value) - sub)
    return img


# ----------------------------------------------------------------------- signed distances
# All approximate (exact on the surface, monotone nearby), which is all partial volume needs.


def ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: float, b: float, c: float):
    """Signed distance to an axis-aligned ellipsoid with half axes a, b, c."""
    k = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    return (k - 1.0) * min(a, b, c)


def ellipse2(x: np.ndarray, y: np.ndarray, a, b):
    """Signed distance to an ellipse (half axes may be arrays), scaled by the smaller axis."""
    k = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    return (k - 1.0) * np.minimum(a, b)


def segment2(x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]):
    """Distance from 2D points to the segment p0-p1, and the position u in [0, 1] along it."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    u = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.sqrt((x - p0[0] - u * dx) ** 2 + (y - p0[1] - u * dy) ** 2), u


def segment3(pts: tuple[np.ndarray, ...], p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance from 3D points (tuple of coordinate arrays) to the segment p0-p1."""
    d = p1 - p0
    u = sum((pts[k] - p0[k]) * d[k] for k in range(3)) / float(d @ d)
    u = np.clip(u, 0.0, 1.0)
    return np.sqrt(sum((pts[k] - p0[k] - u * d[k]) ** 2 for k in range(3)))


def boxy_radius(x: np.ndarray, y: np.ndarray, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """Physical radius and the normalised radius of a rounded rectangle (superellipse, m=4)."""
    xn, yn = (x / a) ** 2, (y / b) ** 2
    k = np.sqrt(np.sqrt(xn * xn + yn * yn))
    rho = np.sqrt(x * x + y * y)
    return rho, k
