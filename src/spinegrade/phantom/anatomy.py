"""The 3D anatomy of one phantom study: a lordotic chain of rigid vertebrae with discs between them.

Coordinates are "body" millimetres, aligned with DICOM LPS for an unrotated patient: x to the
patient's left, y posterior, z superior. The patient's pose in the scanner is a separate rigid
transform (:class:`Anatomy.to_patient`).

Each vertebra is a rigid body with its own frame: the lateral axis x, a posterior axis ``p`` and a
superior axis ``n``, both in the sagittal plane, tilted by an angle ``theta`` (positive when the
superior end leans anteriorly, like the sacrum). The chain is built from the sacrum upwards: each
disc is a wedge (taller anteriorly), so the lumbar lordosis is the sum of the disc and body wedges
on top of the sacral slope, as in a real spine. The mid-plane of every disc bisects the endplates
around it; these planes split space into one zone per vertebra, which gives a continuous "canal
coordinate" system (arc length along the canal, posterior and lateral offsets) used for the soft
tissue that follows the whole spine (thecal sac, epidural fat, muscles, skin).

Degeneration enters as anatomical severities ``a`` in [0, 1] per (condition, level) (see
:func:`spinegrade.phantom.labels.anatomical_severity`): disc bulges (posterior for the central
canal, posterolateral for the recesses, lateral for the foramina), ligamentum flavum thickening,
facet (superior articular process) hypertrophy, loss of disc height and of disc water.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

VERTEBRAE: tuple[str, ...] = ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1", "S2", "S3")
FIRST_LABEL_DISC = 2  # disc index of L1/L2 (disc i lies between VERTEBRAE[i] and VERTEBRAE[i+1])
N_LEVELS = 5
# Rows of the severity matrix (the order of constants.CONDITIONS).
SPINAL, LEFT_FORAMEN, RIGHT_FORAMEN, LEFT_RECESS, RIGHT_RECESS = range(5)

# Mean body sizes (mm) T11..S3: height, AP depth, width; disc heights T11/T12..S2/S3.
_HEIGHT = (23.0, 24.0, 25.5, 26.5, 27.0, 27.0, 26.0, 24.0, 19.0, 15.0)
_DEPTH = (29.0, 30.0, 31.0, 32.5, 33.5, 34.0, 34.0, 32.0, 26.0, 20.0)
_WIDTH = (38.0, 40.0, 42.0, 45.0, 47.0, 49.0, 50.0, 46.0, 38.0, 30.0)
_DISC = (6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 10.5, 2.0, 1.5)
# Disc wedge T11/T12..L5/S1 and body wedge T11..L5 (deg, anterior taller; negative = kyphotic).
_DISC_WEDGE = (-2.0, 0.0, 3.0, 5.0, 7.5, 10.0, 13.0)
_BODY_WEDGE = (-4.0, -3.5, -3.0, -1.0, 0.0, 1.0, 4.0)
_SACRAL_CURVE = 11.0  # deg per sacral segment: the sacrum curves anteriorly going down
# Half interpedicular distance (canal half width at the pedicles), pedicle width, transverse
# process length, mm; sacral values describe the narrow sacral canal.
_CANAL_HW = (9.5, 10.0, 10.5, 11.0, 11.5, 12.0, 13.0, 12.0, 9.0, 7.0)
_PEDICLE_W = (7.0, 7.5, 8.0, 8.5, 9.5, 11.0, 13.0, 0.0, 0.0, 0.0)
_TRANSVERSE = (12.0, 14.0, 18.0, 24.0, 28.0, 24.0, 20.0, 0.0, 0.0, 0.0)
S1_INDEX = FIRST_LABEL_DISC + N_LEVELS  # vertebra index of S1


def axes(theta: float) -> np.ndarray:
    """(3, 3) rows: lateral x, posterior p, superior n unit vectors of a frame tilted by theta."""
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])


@dataclass
class Frame:
    """A rigid frame: origin and the rows of :func:`axes` (local = axes @ (X - origin))."""

    origin: np.ndarray
    theta: float

    @property
    def axes(self) -> np.ndarray:
        return axes(self.theta)

    def to_body(self, local: np.ndarray) -> np.ndarray:
        """Body coordinates of a local point (lx, lp, ln)."""
        return self.origin + np.asarray(local, dtype=float) @ self.axes


@dataclass
class Vertebra:
    """A vertebral body and its posterior elements, in its own frame."""

    name: str
    frame: Frame
    height: float
    depth: float
    width: float
    wedge: float  # radians, body wedge (anterior taller)
    canal_hw: float  # half interpedicular distance
    pedicle_w: float
    transverse: float  # transverse process length
    # hypertrophy of this vertebra's superior articular processes (left, right): medial and
    # anterior shift (mm), from the recess and foramen severities of the disc above it
    sap_medial: tuple[float, float] = (0.0, 0.0)
    sap_anterior: tuple[float, float] = (0.0, 0.0)


@dataclass
class Disc:
    """An intervertebral disc between ``VERTEBRAE[index]`` (above) and ``VERTEBRAE[index + 1]``."""

    index: int
    frame: Frame  # mid-plane frame: origin at the disc centre, n normal to the mid-plane
    height: float  # at the centre
    depth: float
    width: float
    upper_plane: tuple[np.ndarray, np.ndarray]  # lower endplate of the vertebra above (pt, normal)
    lower_plane: tuple[np.ndarray, np.ndarray]  # upper endplate of the vertebra below
    bulge_central: float = 0.8  # posterior bulge beyond the body margin, mm
    remnant: float = 0.6  # fused sacral discs only: half thickness of the visible remnant, mm
    bulge_recess: tuple[float, float] = (0.5, 0.5)  # posterolateral (left, right)
    bulge_foramen: tuple[float, float] = (0.5, 0.5)  # lateral, into the foramina
    nucleus_t2: float = 1.0  # relative T2 brightness of the nucleus (1 healthy, ~0.2 desiccated)
    flavum: float = 2.5  # ligamentum flavum thickness at the midline, mm
    flavum_lateral: tuple[float, float] = (0.0, 0.0)  # extra lateral thickness (left, right)
    recess_narrowing: tuple[float, float] = (0.0, 0.0)
    foramen_narrowing: tuple[float, float] = (0.0, 0.0)

    @property
    def level(self) -> int | None:
        """Label level index 0..4 (L1/L2..L5/S1), or None for discs outside the labels."""
        li = self.index - FIRST_LABEL_DISC
        return li if 0 <= li < N_LEVELS else None


@dataclass
class Anatomy:
    """Everything the renderer and the label writer need to know about one phantom spine."""

    vertebrae: list[Vertebra]
    discs: list[Disc]
    planes: list[tuple[np.ndarray, np.ndarray]]  # zone boundaries (point, unit normal), top->bottom
    canal_points: np.ndarray  # (len(planes), 3) canal axis point on each plane
    sac_hw: float  # thecal sac half width (lateral), mm
    sac_hd: float  # thecal sac half depth (AP), mm
    epidural_gap: float  # anterior epidural space, mm
    back_q: float  # posterior skin, as canal offset q (mm behind the canal axis)
    trunk_hw: float  # trunk half width
    trunk_hd: float  # trunk half depth
    muscle_scale: float
    severity: np.ndarray  # (5 conditions, 5 levels) anatomical severity in [0, 1]
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))  # body -> patient
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))
    texture_seed: int = 0
    # Fatty conversion of the marrow with age: its signal relative to the reference table, per
    # contrast (T1, T2, STIR); see :func:`_age_contrast`.
    marrow_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def to_patient(self, body_pts: np.ndarray) -> np.ndarray:
        """Patient (LPS, scanner) coordinates of body points (..., 3)."""
        return np.asarray(body_pts) @ self.rotation.T + self.translation

    def to_body(self, patient_pts: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_patient`."""
        return (np.asarray(patient_pts) - self.translation) @ self.rotation

    def label_disc(self, level: int) -> Disc:
        """The disc of label level 0..4 (L1/L2..L5/S1)."""
        return self.discs[FIRST_LABEL_DISC + level]


def _plane(point: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(point, dtype=float), axes(theta)[2].copy()


def sample_anatomy(rng: np.random.Generator, severity: np.ndarray) -> Anatomy:
    """Draw one spine whose degeneration follows ``severity`` (5 conditions x 5 levels, in [0, 1]).

    Everything random about the anatomy (sizes, curvature, canal width, fat, pose) comes from
    ``rng``; everything about degeneration comes from ``severity``.
    """
    severity = np.asarray(severity, dtype=float)
    if severity.shape != (5, N_LEVELS):
        raise ValueError(f"severity must have shape (5, {N_LEVELS}), got {severity.shape}")
    sac_hw = float(np.clip(rng.normal(10.0, 1.1), 7.5, 13.0))
    sac_hd = float(np.clip(rng.normal(7.0, 0.8), 5.0, 9.0))
    disc_h = _disc_heights(rng, severity)
    verts = _build_vertebrae(rng, disc_h, canal_scale=sac_hw / 10.0)
    discs = [_disc_between(i, verts[i], verts[i + 1]) for i in range(len(verts) - 1)]
    _degenerate(rng, severity, verts, discs)
    gap = float(rng.uniform(1.0, 2.2))
    planes, canal = _zones(verts, discs, gap + sac_hd)
    anat = Anatomy(
        vertebrae=verts,
        discs=discs,
        planes=planes,
        canal_points=canal,
        sac_hw=sac_hw,
        sac_hd=sac_hd,
        epidural_gap=gap,
        back_q=float(rng.uniform(58.0, 85.0)),
        trunk_hw=float(rng.uniform(135.0, 175.0)),
        trunk_hd=float(rng.uniform(110.0, 160.0)),
        muscle_scale=float(rng.uniform(0.85, 1.15)),
        severity=severity,
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )
    _place_patient(rng, anat)
    _age_contrast(anat)
    return anat


# Disc signal loss by disc (T11/T12 .. L5/S1): the lower lumbar discs lose water first and most.
_DESICCATION_BY_DISC = (0.45, 0.55, 0.65, 0.75, 0.85, 1.0, 1.0)


def _age_contrast(anat: Anatomy) -> None:
    """What age does to T2 contrast, beyond the graded findings: desiccated discs, fatty marrow;
    and how much of the fused sacral discs shows.

    Disc signal loss on T2 is common well before any stenosis (in asymptomatic adults ~17% of
    discs at 20 years rising to ~86% at 60, Brinjikji et al., AJNR 2015), and vertebral marrow turns
    fatty with age, so on T1 and T2 FSE older bodies are brighter and a dark disc sits between
    bright bodies; on STIR (fat suppressed) the marrow darkens instead. A network that finds
    discs as bright bands between dark bodies fails on such spines; one that must also find dark
    discs learns their shape. Image only: the labels and their probabilities do not depend on it.
    Its own random stream (from the texture seed) keeps every other draw of the study unchanged.
    """
    aux = np.random.default_rng([anat.texture_seed, 0xA6E])
    age = float(aux.beta(2.2, 1.6))  # 0 = young adult .. 1 = elderly; lumbar MR skews older
    for i, d in enumerate(anat.discs[:S1_INDEX]):
        loss = np.clip(age * _DESICCATION_BY_DISC[i] * aux.uniform(0.3, 1.4), 0.0, 1.0)
        d.nucleus_t2 = float(max(0.12, d.nucleus_t2 * (1.0 - 0.8 * loss)))
    fat = age * aux.uniform(0.6, 1.2)
    anat.marrow_gain = (0.85 + 0.35 * fat, 0.8 + 0.8 * fat, 1.2 - 0.6 * fat)
    # The fused sacral discs: a residual S1/S2 disc is seen in most adults, from a hairline to a
    # flat disc a few millimetres thick; below L5/S1 it is the one disc-like band a level
    # counter must not take for L5/S1.
    for d, (lo, hi) in zip(anat.discs[S1_INDEX:], ((0.4, 1.8), (0.3, 1.0)), strict=False):
        d.remnant = float(aux.uniform(lo, hi))


def _disc_heights(rng: np.random.Generator, severity: np.ndarray) -> np.ndarray:
    """Disc heights; degenerate discs (mean severity of their level) lose up to ~35% height."""
    h = np.asarray(_DISC) * rng.normal(1.0, 0.08) * rng.normal(1.0, 0.06, len(_DISC))
    degeneration = severity.mean(axis=0)
    for li in range(N_LEVELS):
        h[FIRST_LABEL_DISC + li] *= 1.0 - 0.35 * degeneration[li]
    return np.maximum(h, 1.0)


def _build_vertebrae(
    rng: np.random.Generator, disc_h: np.ndarray, canal_scale: float
) -> list[Vertebra]:
    """Place the vertebrae: the sacrum down from S1's upper endplate, the rest upwards from it."""
    size = float(rng.normal(1.0, 0.05))
    slope_deg = rng.uniform(32.0, 46.0)  # sacral slope: tilt of the S1 endplate
    slope = np.deg2rad(slope_deg)
    # Lumbar lordosis (L1-S1) follows the sacral slope plus 2-18 deg (spino-pelvic balance):
    # scale the lordotic wedges of the lumbar discs and bodies to reach it.
    lumbar = range(FIRST_LABEL_DISC, S1_INDEX)
    pos = sum(max(_DISC_WEDGE[i], 0) + max(_BODY_WEDGE[i], 0) for i in lumbar)
    neg = sum(min(_DISC_WEDGE[i], 0) + min(_BODY_WEDGE[i], 0) for i in lumbar)
    lordosis = (slope_deg + rng.uniform(2.0, 18.0) - neg) / pos
    verts: list[Vertebra | None] = [None] * len(VERTEBRAE)

    def make(i: int, centre: np.ndarray, theta: float, h: float, wedge: float) -> Vertebra:
        j = rng.normal(1.0, 0.04, 4)
        return Vertebra(
            name=VERTEBRAE[i],
            frame=Frame(np.asarray(centre, dtype=float), float(theta)),
            height=float(h),
            depth=_DEPTH[i] * size * j[0],
            width=_WIDTH[i] * size * j[1],
            wedge=float(wedge),
            canal_hw=_CANAL_HW[i] * canal_scale * j[2],
            pedicle_w=_PEDICLE_W[i] * size * j[3],
            transverse=_TRANSVERSE[i] * size,
        )

    top, theta = np.zeros(3), slope
    for i in range(S1_INDEX, len(VERTEBRAE)):
        if i > S1_INDEX:  # fused sacral segments with a vestigial disc
            theta -= np.deg2rad(_SACRAL_CURVE)
            top = top - axes(theta)[2] * disc_h[i - 1]
        h = _HEIGHT[i] * size * rng.normal(1.0, 0.03)
        centre = top - axes(theta)[2] * h / 2
        verts[i] = make(i, centre, theta, h, 0.0)
        top = centre - axes(theta)[2] * h / 2
    e_pt, e_theta = np.zeros(3), slope  # upper endplate of the vertebra below
    for i in range(S1_INDEX - 1, -1, -1):
        beta = np.deg2rad(_DISC_WEDGE[i] * (lordosis if _DISC_WEDGE[i] > 0 else 1.0))
        gamma = np.deg2rad(_BODY_WEDGE[i] * (lordosis if _BODY_WEDGE[i] > 0 else 1.0))
        lower_pt = e_pt + axes(e_theta - beta / 2)[2] * disc_h[i]
        body_theta = e_theta - beta - gamma / 2
        h = _HEIGHT[i] * size * rng.normal(1.0, 0.03)
        centre = lower_pt + axes(body_theta)[2] * h / 2
        verts[i] = make(i, centre, body_theta, h, gamma)
        e_pt, e_theta = lower_pt + axes(body_theta)[2] * h, e_theta - beta - gamma
    return verts  # type: ignore[return-value]


def endplate(v: Vertebra, lower: bool) -> tuple[np.ndarray, np.ndarray]:
    """(centre point, unit normal pointing superior) of a vertebra's lower or upper endplate."""
    sign = -1.0 if lower else 1.0
    point = v.frame.to_body([0.0, 0.0, sign * v.height / 2])
    return _plane(point, v.frame.theta - sign * v.wedge / 2)


def _disc_between(i: int, up: Vertebra, lo: Vertebra) -> Disc:
    up_plane, lo_plane = endplate(up, lower=True), endplate(lo, lower=False)
    theta_up = up.frame.theta + up.wedge / 2
    theta_lo = lo.frame.theta - lo.wedge / 2
    return Disc(
        index=i,
        frame=Frame((up_plane[0] + lo_plane[0]) / 2, (theta_up + theta_lo) / 2),
        height=float(np.linalg.norm(up_plane[0] - lo_plane[0])),
        depth=(up.depth + lo.depth) / 2,
        width=(up.width + lo.width) / 2,
        upper_plane=up_plane,
        lower_plane=lo_plane,
    )


def _degenerate(
    rng: np.random.Generator, sev: np.ndarray, verts: list[Vertebra], discs: list[Disc]
) -> None:
    """Turn the severities into the structural changes a radiologist grades."""
    for d in discs:  # baseline for the unlabelled discs
        d.nucleus_t2 = float(np.clip(rng.normal(0.95, 0.08), 0.5, 1.1))
        d.flavum = float(rng.uniform(1.8, 2.6))
    for li in range(N_LEVELS):
        d, below = discs[FIRST_LABEL_DISC + li], verts[FIRST_LABEL_DISC + li + 1]
        a_s = sev[SPINAL, li]
        a_f = (sev[LEFT_FORAMEN, li], sev[RIGHT_FORAMEN, li])
        a_r = (sev[LEFT_RECESS, li], sev[RIGHT_RECESS, li])
        jit = rng.normal(0.0, 0.25, 5)
        # Central canal: disc bulge from the front, flavum from behind; the sac fills what is left.
        d.bulge_central = float(max(0.3, 0.6 + 6.0 * a_s + jit[0]))
        d.flavum = float(max(1.5, 2.2 + 6.0 * a_s + jit[1]))
        # Lateral recess: posterolateral bulge, lateral flavum, medial facet (SAP) overgrowth.
        d.bulge_recess = (0.4 + 3.0 * a_r[0] + jit[2] / 2, 0.4 + 3.0 * a_r[1] + jit[2] / 2)
        d.flavum_lateral = (2.5 * a_r[0], 2.5 * a_r[1])
        d.recess_narrowing = (float(a_r[0]), float(a_r[1]))
        # Foramen: lateral bulge from the front, the SAP rising forward from behind, fat lost.
        d.bulge_foramen = (0.4 + 3.0 * a_f[0] + jit[3] / 2, 0.4 + 3.0 * a_f[1] + jit[3] / 2)
        d.foramen_narrowing = (float(a_f[0]), float(a_f[1]))
        below.sap_medial = (3.5 * a_r[0], 3.5 * a_r[1])
        below.sap_anterior = (3.0 * a_f[0], 3.0 * a_f[1])
        # Desiccated (dark on T2) nuclei go with degeneration at the level.
        d.nucleus_t2 = float(np.clip(1.0 - 0.85 * sev[:, li].mean() + jit[4] / 2, 0.12, 1.1))


def _zones(
    verts: list[Vertebra], discs: list[Disc], canal_offset: float
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Zone boundary planes (disc mid-planes plus two end caps) and the canal axis on each."""
    planes, canal = [], []

    def add(frame: Frame, depth: float, shift: float) -> None:
        ax = frame.axes
        point = frame.origin + ax[2] * shift
        planes.append((point, ax[2].copy()))
        canal.append(point + ax[1] * (depth / 2 + canal_offset))

    top, bottom = verts[0], verts[-1]
    add(top.frame, top.depth, top.height / 2 + 4.0)
    for d in discs:
        add(d.frame, d.depth, 0.0)
    add(bottom.frame, bottom.depth, -bottom.height / 2 - 4.0)
    return planes, np.asarray(canal)


def _place_patient(rng: np.random.Generator, anat: Anatomy) -> None:
    """Small patient rotations (yaw, pitch, roll) and a shift in the scanner."""
    yaw, roll, pitch = np.deg2rad(rng.normal(0.0, [2.5, 2.0, 3.0]))
    cz, sz = np.cos(yaw), np.sin(yaw)
    cy, sy = np.cos(roll), np.sin(roll)
    cx, sx = np.cos(pitch), np.sin(pitch)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    anat.rotation = rz @ ry @ rx
    l3 = anat.vertebrae[VERTEBRAE.index("L3")].frame.origin
    offset = np.array([rng.normal(0, 8), rng.normal(20, 15), rng.normal(40, 30)])
    anat.translation = offset - anat.rotation @ l3


# ------------------------------------------------------------------ landmarks (local frames)
# The renderer and the label writer share these, so a label point always sits on its structure.


def side_sign(side: int) -> float:
    """+1 for the patient's left (LPS +x), -1 for the right; ``side`` 0 = left, 1 = right."""
    return 1.0 if side == 0 else -1.0


def neighbours(anat: Anatomy, disc: Disc) -> tuple[Vertebra, Vertebra]:
    """The vertebrae above and below a disc."""
    return anat.vertebrae[disc.index], anat.vertebrae[disc.index + 1]


def canal_centre_local(anat: Anatomy, disc: Disc) -> np.ndarray:
    """Centre of the (uncompressed) thecal sac at a disc, in the disc frame."""
    return np.array([0.0, disc.depth / 2 + anat.epidural_gap + anat.sac_hd, 0.0])


def foramen_local(anat: Anatomy, disc: Disc, side: int) -> np.ndarray:
    """Centre of a neural foramen (between the pedicles, above the disc) in the disc frame.

    The exiting root of the vertebra above runs under its pedicle, in the upper foramen.
    """
    up, _ = neighbours(anat, disc)
    return np.array([side_sign(side) * (up.canal_hw + up.pedicle_w / 2), disc.depth / 2 + 4.5, 3.5])


def recess_local(anat: Anatomy, disc: Disc, side: int) -> np.ndarray:
    """The lateral (subarticular) recess at the disc level, where the traversing root lies."""
    return np.array(
        [side_sign(side) * (anat.sac_hw - 1.0), disc.depth / 2 + anat.epidural_gap + 2.5, 0.0]
    )


def label_point(anat: Anatomy, condition: int, level: int) -> np.ndarray:
    """Body coordinates of the point a radiologist clicks for (condition row, level).

    Spinal: the disc's posterior margin, just inside the canal (mid-sagittal). Foraminal: the
    foramen around the exiting root. Subarticular: the lateral recess at the disc level.
    """
    disc = anat.label_disc(level)
    if condition == SPINAL:
        local = np.array([0.0, disc.depth / 2 + 0.5 + disc.bulge_central + 1.0, 0.0])
    elif condition in (LEFT_FORAMEN, RIGHT_FORAMEN):
        local = foramen_local(anat, disc, condition - LEFT_FORAMEN)
        local[2] += 1.5
    else:
        local = recess_local(anat, disc, condition - LEFT_RECESS)
    return disc.frame.to_body(local)
