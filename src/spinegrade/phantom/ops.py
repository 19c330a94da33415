"""The paint operations of one phantom spine: bones, discs, neural elements and soft tissue.

Each builder turns part of an :class:`~.anatomy.Anatomy` into :class:`~.scene.Op`
closures. Priorities encode what hides what: the trunk (fat) first, then viscera and muscle,
the canal contents, ligaments, discs and, last, bone, so that a bulging disc, a thickened
ligamentum flavum or an overgrown facet carves into the sac, the recess and the foramen fat.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from spinegrade.phantom.anatomy import (
    FIRST_LABEL_DISC,
    S1_INDEX,
    Anatomy,
    Disc,
    Vertebra,
    canal_centre_local,
    endplate,
    foramen_local,
    neighbours,
    recess_local,
    side_sign,
)
from spinegrade.phantom.scene import (
    Op,
    SliceContext,
    boxy_radius,
    ellipse2,
    ellipsoid,
    ramp,
    segment2,
    segment3,
)
from spinegrade.phantom.soft import centre_s, soft_tissue_ops

P_EPIDURAL = 50
P_FORAMEN_FIBROUS, P_FORAMEN_FAT, P_CSF, P_CAUDA, P_CORD, P_ROOT = 54, 55, 60, 61, 62, 64
P_FLAVUM, P_ANNULUS, P_NUCLEUS, P_CORTEX, P_MARROW = 70, 80, 81, 90, 91
CORTEX_MM = 0.8
ENDPLATE_CUP = 1.5  # mm the endplate centre is recessed into the vertebral body
Box = tuple[slice, slice]


def build_ops(anat: Anatomy) -> list[Op]:
    """All paint operations of a spine, sorted by priority (stable within a priority)."""
    ops: list[Op] = []
    for v in anat.vertebrae:
        ops += _vertebra_ops(anat, v)
    for d in anat.discs[:S1_INDEX]:
        ops += _disc_ops(anat, d)
    for d in anat.discs[S1_INDEX:]:
        ops += _sacral_remnant_ops(d)
    for d in anat.discs[:S1_INDEX]:
        ops += _foramen_ops(anat, d) + _recess_ops(anat, d) + _flavum_ops(anat, d)
    ops += soft_tissue_ops(anat) + _canal_ops(anat)
    ops = [replace(op, gain=anat.marrow_gain) if op.tissue == "marrow" else op for op in ops]
    return sorted(ops, key=lambda op: op.priority)


# ------------------------------------------------------------------------------- helpers


def _local(ctx: SliceContext, frame, bb: Box) -> tuple[np.ndarray, ...]:
    return ctx.grid.local(frame.origin, frame.axes, bb)


def _bone(key: str, sphere: tuple[np.ndarray, float], sdf_fn) -> list[Op]:
    """Cortex (dark rim) and marrow ops sharing one distance map per slice."""

    def sdf(ctx: SliceContext, bb: Box) -> np.ndarray:
        return ctx.cached(key, lambda: sdf_fn(ctx, bb))

    return [
        Op(P_CORTEX, "cortex", lambda ctx, bb: ramp(sdf(ctx, bb)), sphere),
        Op(P_MARROW, "marrow", lambda ctx, bb: ramp(sdf(ctx, bb) + CORTEX_MM), sphere),
    ]


def _sphere(frame, centre_local, radius: float) -> tuple[np.ndarray, float]:
    return frame.to_body(centre_local), float(radius)


def _plane_local(frame, plane: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A body-space plane (point, normal) expressed in a frame."""
    ax = frame.axes
    return ax @ (plane[0] - frame.origin), ax @ plane[1]


def _smooth_max(a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    """max(a, b) with the corner rounded over ``radius`` mm (rounded vertebral corners)."""
    return 0.5 * (a + b + np.sqrt((a - b) ** 2 + radius * radius)) - 0.5 * radius


def _plane_sdf(x, y, z, plane_local, below: bool) -> np.ndarray:
    """Signed distance to the half-space below (or above) a plane, positive outside."""
    (px, py, pz), (nx, ny, nz) = plane_local
    d = (x - px) * nx + (y - py) * ny + (z - pz) * nz
    return -d if below else d


# ------------------------------------------------------------------------------- vertebrae


def _vertebra_ops(anat: Anatomy, v: Vertebra) -> list[Op]:
    """Body, pedicles, laminae, spinous and transverse processes, articular processes."""
    f, h, dd, ww = v.frame, v.height, v.depth, v.width
    key = v.name
    lower = _plane_local(f, endplate(v, lower=True))
    upper = _plane_local(f, endplate(v, lower=False))

    # Fused sacral segments overlap their neighbours, so the sacrum is one bone.
    fuse = 2.5 if v.name.startswith("S") else 0.0
    lower = (lower[0] - fuse * lower[1], lower[1])
    upper = (upper[0] + fuse * upper[1], upper[1])

    def body(ctx, bb):
        x, p, n = _local(ctx, f, bb)
        rho, k = boxy_radius(x, p, ww / 2, dd / 2)
        # The posterior wall is slightly concave at the midline (basivertebral notch).
        notch = 1.5 * np.exp(-((x / (0.3 * ww)) ** 2)) * (p > 0)
        xs = rho * (1 - 1 / np.maximum(k, 1e-3)) + notch
        # Endplates are concave (the disc domes into the body) unless fused (sacrum).
        cup = 0.0 if fuse else ENDPLATE_CUP * np.clip(1 - k * k, 0, 1)
        ends = np.maximum(_plane_sdf(x, p, n, lower, True), _plane_sdf(x, p, n, upper, False))
        return _smooth_max(xs, ends + cup, 2.0)

    r_body = float(np.sqrt((ww / 2) ** 2 + (dd / 2) ** 2 + (h / 2 + 3) ** 2))
    ops = _bone(key + "body", _sphere(f, [0, 0, 0], r_body), body)
    sacral = v.name.startswith("S")
    lam_back = dd / 2 + anat.epidural_gap + 2 * anat.sac_hd + 9.0  # lamina midline junction
    for side in (0, 1):
        sg = side_sign(side)
        ops += _posterior_pair(anat, v, side, sg, lam_back, sacral)
    # Spinous process: a rectangular plate in the midline running back and slightly down.
    sp_len = 6.0 if sacral else (26.0 if v.name.startswith("T") else 30.0)
    a = np.array([lam_back - 2.0, -0.1 * h])
    b = np.array([lam_back + sp_len, -0.25 * h - (6 if v.name[0] == "T" else 0)])
    axis = (b - a) / np.linalg.norm(b - a)
    half_len, half_h = float(np.linalg.norm(b - a)) / 2, (0.34 if not sacral else 0.25) * h
    mid2 = (a + b) / 2

    def spinous(ctx, bb):
        x, p, n = _local(ctx, f, bb)
        u = (p - mid2[0]) * axis[0] + (n - mid2[1]) * axis[1]
        w = (n - mid2[1]) * axis[0] - (p - mid2[0]) * axis[1]
        rho, k = boxy_radius(u, w, half_len, half_h)
        return np.maximum(rho * (1 - 1 / np.maximum(k, 1e-3)), np.abs(x) - 3.5)

    mid = [0.0, mid2[0], mid2[1]]
    ops += _bone(key + "sp", _sphere(f, mid, half_len + half_h + 3), spinous)
    return ops


def _posterior_pair(
    anat: Anatomy, v: Vertebra, side: int, sg: float, lam_back: float, sacral: bool
) -> list[Op]:
    """One side's pedicle, lamina, transverse process and articular processes (or sacral ala)."""
    f, h, dd, cw, pw = v.frame, v.height, v.depth, v.canal_hw, v.pedicle_w
    key = f"{v.name}{side}"
    ops: list[Op] = []
    # Lamina: a plate from the pedicle-facet junction to the midline, taller below.
    l0, l1 = (sg * (cw + 1.5), dd / 2 + 11.0), (sg * 2.0, lam_back)
    n_lo, n_hi = -0.5 * h - (1.0 if sacral else 6.0), (0.5 * h if sacral else 0.3 * h)

    def lamina(ctx, bb):
        x, p, n = _local(ctx, f, bb)
        dist, _ = segment2(x, p, l0, l1)
        return np.maximum(dist - 3.2, np.abs(n - (n_lo + n_hi) / 2) - (n_hi - n_lo) / 2)

    c = [(l0[0] + l1[0]) / 2, (l0[1] + l1[1]) / 2, (n_lo + n_hi) / 2]
    r = np.hypot(np.hypot(l1[0] - l0[0], l1[1] - l0[1]) / 2 + 3.2, (n_hi - n_lo) / 2) + 2
    ops += _bone(key + "lam", _sphere(f, c, r), lamina)
    if sacral:
        scale = {"S1": 1.0, "S2": 0.75, "S3": 0.5}[v.name]
        ala = ([sg * (cw + 16 * scale), dd / 2 - 8.0, -2.0], (20 * scale, 14.0, h / 2 + 3))
        ops += _ellipsoid_bone(f, key + "ala", *ala)
    else:
        ped = ([sg * (cw + pw / 2), dd / 2 + 4.0, 0.1 * h], (pw / 2, 8.0, 0.28 * h))
        ops += _ellipsoid_bone(f, key + "ped", *ped)
        t0 = np.array([sg * (cw + 0.8 * pw), dd / 2 + 5.0, 0.0])
        t1 = np.array([sg * (cw + pw + v.transverse), dd / 2 + 8.0, -2.0])
        t_r = 5.5 if v.name == "L5" else 4.0

        def transverse(ctx, bb):
            return segment3(_local(ctx, f, bb), t0, t1) - t_r

        ops += _bone(
            key + "tp", _sphere(f, (t0 + t1) / 2, v.transverse / 2 + pw + t_r + 2), transverse
        )
        iap = ([sg * (cw + 2.0), dd / 2 + 19.5, -h / 2 - 5.0], (5.0, 5.5, 9.0))
        ops += _ellipsoid_bone(f, key + "iap", *iap)
        # Pars interarticularis: the strut from the pedicle down to the inferior facet, the back
        # wall of the upper foramen; with the facets it makes the articular pillar.
        p0 = np.array([sg * (cw + 3.5), dd / 2 + 12.0, 0.1 * h])
        p1 = np.array([sg * (cw + 2.5), dd / 2 + 18.0, -h / 2 - 2.0])

        def pars(ctx, bb, p0=p0, p1=p1):
            return segment3(_local(ctx, f, bb), p0, p1) - 4.0

        ops += _bone(key + "pars", _sphere(f, (p0 + p1) / 2, np.linalg.norm(p1 - p0) / 2 + 6), pars)
    if v.name not in ("S2", "S3"):
        # Superior articular process: overgrows medially (recess) and forwards (foramen).
        med, ant = v.sap_medial[side], v.sap_anterior[side]
        centre = [sg * (cw + 5.5 - med), dd / 2 + 12.0 - ant, h / 2 + 4.0 + 0.5 * ant]
        ops += _ellipsoid_bone(f, key + "sap", centre, (5.0 + 0.4 * med, 6.0 + 0.3 * ant, 9.0))
    return ops


def _ellipsoid_bone(frame, key: str, centre, half) -> list[Op]:
    cx, cy, cz = centre
    a, b, c = half

    def sdf(ctx, bb):
        x, p, n = _local(ctx, frame, bb)
        return ellipsoid(x - cx, p - cy, n - cz, a, b, c)

    return _bone(key, _sphere(frame, centre, max(half) + 2.0), sdf)


# ------------------------------------------------------------------------------- discs


def _disc_ops(anat: Anatomy, d: Disc) -> list[Op]:
    """Annulus with its bulges (central, posterolateral, lateral) and the nucleus."""
    f, hh, dd, ww = d.frame, d.height, d.depth, d.width
    up = _plane_local(f, d.upper_plane)
    lo = _plane_local(f, d.lower_plane)
    bc, (brl, brr), (bfl, bfr) = d.bulge_central, d.bulge_recess, d.bulge_foramen

    def annulus(ctx, bb):
        x, p, n = _local(ctx, f, bb)
        rho, k = boxy_radius(x, p, ww / 2, dd / 2)
        phi = np.arctan2(x, p)  # 0 = straight back, + = towards the patient's left
        bulge = bc * np.exp(-((phi / 0.45) ** 2))
        bulge += brl * np.exp(-(((phi - 0.75) / 0.3) ** 2)) + brr * np.exp(
            -(((phi + 0.75) / 0.3) ** 2)
        )
        bulge += bfl * np.exp(-(((phi - 1.2) / 0.3) ** 2)) + bfr * np.exp(
            -(((phi + 1.2) / 0.3) ** 2)
        )
        # A bulge is widest at mid-height and fades towards the endplates.
        bulge *= np.clip(1 - (n / (hh / 2 + 1.5)) ** 2, 0.15, 1.0)
        xs = rho * (1 - 1 / np.maximum(k, 1e-3)) - bulge - 0.5
        cup = ENDPLATE_CUP * np.clip(1 - k * k, 0, 1)  # fills the concave endplates
        vert = np.maximum(_plane_sdf(x, p, n, up, False), _plane_sdf(x, p, n, lo, True)) - cup
        return ramp(_smooth_max(xs, vert, 1.0))

    radius = float(np.hypot(ww / 2 + 6, hh / 2 + 3))
    ops = [Op(P_ANNULUS, "annulus", annulus, (f.origin, radius))]
    na, nb, nc = 0.36 * ww, 0.3 * dd, max(0.32 * hh, 0.6)
    cleft = d.nucleus_t2 < 0.9  # an older disc shows a dark intranuclear cleft on T2

    def nucleus(ctx, bb):
        x, p, n = _local(ctx, f, bb)
        # soft edges: the nucleus fades into the inner annulus over a few millimetres
        cover = ramp(ellipsoid(x, p - 0.05 * dd, n, na, nb, nc), 2.5)
        if cleft:
            cover = cover * (1 - 0.6 * ramp(np.abs(n) - 0.5, 1.0))
        return cover

    gain = (0.9 + 0.1 * d.nucleus_t2, d.nucleus_t2, d.nucleus_t2)
    ops.append(Op(P_NUCLEUS, "nucleus", nucleus, (f.origin, na + 3), gain=gain))
    return ops


def _sacral_remnant_ops(d: Disc) -> list[Op]:
    """The rudimentary discs of the fused sacrum: thin dark lines across the bone."""
    f, dd, ww = d.frame, d.depth, d.width

    def line(ctx, bb):
        x, p, n = _local(ctx, f, bb)
        rho, k = boxy_radius(x, p, 0.4 * ww, 0.42 * dd)
        return ramp(np.maximum(rho * (1 - 1 / np.maximum(k, 1e-3)), np.abs(n) - d.remnant), 1.0)

    return [Op(P_MARROW + 1, "annulus", line, (f.origin, ww / 2 + 2))]


# ------------------------------------------------------------------------------- neural


def _foramen_ops(anat: Anatomy, d: Disc) -> list[Op]:
    """Per side: the foramen (fibrous bed and the fat that narrowing loses) and the exiting root."""
    f = d.frame
    up, _ = neighbours(anat, d)
    ops: list[Op] = []
    for side in (0, 1):
        a = d.foramen_narrowing[side]
        cx, cy, cz = foramen_local(anat, d, side)
        half = (up.pedicle_w / 2 + 3.0, 5.5, 11.0)
        fat = (
            (cx, cy, cz + 2.0 * a),
            (half[0], half[1] * (1 - 0.55 * a), half[2] * (1 - 0.35 * a)),
        )
        root = ((cx, cy - 0.5, cz + 4.0 + a), (up.pedicle_w / 2 + 2.0, 2.8 * (1 - 0.35 * a), 3.3))
        for prio, tissue, (c, hx) in (
            (P_FORAMEN_FIBROUS, "fibrous", ((cx, cy, cz), half)),
            (P_FORAMEN_FAT, "fat", fat),
            (P_ROOT, "nerve", root),
        ):
            ops.append(_ellipsoid_op(f, prio, tissue, c, hx))
    return ops


def _ellipsoid_op(frame, prio: int, tissue: str, centre, half) -> Op:
    cx, cy, cz = centre
    a, b, c = half

    def cover(ctx, bb):
        x, p, n = _local(ctx, frame, bb)
        return ramp(ellipsoid(x - cx, p - cy, n - cz, a, b, c))

    return Op(prio, tissue, cover, _sphere(frame, centre, max(half) + 2.0))


def _recess_ops(anat: Anatomy, d: Disc) -> list[Op]:
    """The traversing root in each lateral recess, flattened as the recess narrows."""
    f = d.frame
    ops: list[Op] = []
    for side in (0, 1):
        a = d.recess_narrowing[side]
        centre = recess_local(anat, d, side)
        p0 = centre + np.array([0.0, 0.3, 12.0])
        p1 = centre + np.array([side_sign(side) * 2.5, 0.0, -14.0])
        rad = 2.1 * (1 - 0.3 * a)

        def cover(ctx, bb, p0=p0, p1=p1, rad=rad):
            return ramp(segment3(_local(ctx, f, bb), p0, p1) - rad)

        ops.append(Op(P_ROOT, "nerve", cover, _sphere(f, (p0 + p1) / 2, 16.0)))
    return ops


def _flavum_ops(anat: Anatomy, d: Disc) -> list[Op]:
    """Ligamentum flavum: a V-shaped band lining the back of the canal between the laminae.

    Its outer face rests on the laminae; thickening (spinal stenosis centrally, subarticular
    stenosis laterally) moves the inner face into the canal.
    """
    f = d.frame
    cq = canal_centre_local(anat, d)[1]
    mid = (0.0, cq + anat.sac_hd + 4.5)
    ops: list[Op] = []
    for side in (0, 1):
        sg = side_sign(side)
        lat = (sg * (anat.sac_hw + 4.0), cq + 1.0)
        t_mid, t_lat = d.flavum, d.flavum + d.flavum_lateral[side]
        dx, dy = lat[0] - mid[0], lat[1] - mid[1]
        length = float(np.hypot(dx, dy))
        # inward normal: towards the canal centre (anterior and medial)
        nx, ny = -dy / length, dx / length
        if nx * (0 - mid[0]) + ny * (cq - mid[1]) < 0:
            nx, ny = -nx, -ny

        def cover(
            ctx, bb, mid=mid, dx=dx, dy=dy, nx=nx, ny=ny, t_mid=t_mid, t_lat=t_lat, length=length
        ):
            x, p, n = _local(ctx, f, bb)
            u = np.clip(((x - mid[0]) * dx + (p - mid[1]) * dy) / (dx * dx + dy * dy), 0, 1)
            depth = (x - mid[0]) * nx + (p - mid[1]) * ny  # inward distance from the outer face
            along = ((x - mid[0]) * dx + (p - mid[1]) * dy) / length
            thick = t_mid + (t_lat - t_mid) * u
            band = np.maximum(np.maximum(-depth - 2.0, depth - thick), np.abs(n - 1.5) - 9.5)
            return ramp(np.maximum(band, np.maximum(-along - 1.0, along - length - 1.0)))

        centre = [(mid[0] + lat[0]) / 2, (mid[1] + lat[1]) / 2, 1.5]
        ops.append(Op(P_FLAVUM, "ligament", cover, _sphere(f, centre, length / 2 + 13.0)))
    return ops


# ---------------------------------------------------------------------- canal and soft tissue


def _canal_ops(anat: Anatomy) -> list[Op]:
    """Epidural fat, the thecal sac (narrowed at stenotic discs), cauda equina and conus."""
    hw0, hd0 = anat.sac_hw, anat.sac_hd
    s_c = centre_s(anat)
    s_taper = (s_c[S1_INDEX], s_c[S1_INDEX] + 28.0)  # the dural sac ends at S2
    lumbar = [d for d in anat.discs[:S1_INDEX]]
    rng = np.random.default_rng(anat.texture_seed)
    roots = np.stack([rng.uniform(-0.6, 0.6, 14), rng.uniform(-0.1, 0.65, 14)], axis=1)
    s_tip = float(rng.uniform(s_c[FIRST_LABEL_DISC] - 8, s_c[FIRST_LABEL_DISC] + 12))
    gap = anat.epidural_gap

    # Where the disc (front) and the ligamentum flavum (back) stand at each disc, relative to the
    # canal axis: the sac fills the space between them, so stenosis obliterates the CSF there.
    fronts = [0.5 + d.bulge_central - gap - hd0 + 0.3 for d in lumbar]
    backs = [hd0 + 4.5 - d.flavum - 0.3 for d in lumbar]

    def sac_axes(ctx: SliceContext, bb: Box) -> np.ndarray:
        def compute():
            s, r, dist = ctx.get("s")[bb], ctx.get("r")[bb], ctx.get("plane_d")[:, bb[0], bb[1]]
            front = np.full(s.shape, -hd0, dtype=np.float32)
            back = np.full(s.shape, hd0, dtype=np.float32)
            side = np.zeros_like(s)
            left = r > 0
            for d, f_q, b_q in zip(lumbar, fronts, backs, strict=True):
                g = np.exp(-0.5 * (dist[d.index + 1] / 5.5) ** 2)
                front += g * max(0.0, f_q + hd0)
                back -= g * max(0.0, hd0 - b_q)
                side += np.where(left, d.recess_narrowing[0], d.recess_narrowing[1]) * g
            taper = np.sqrt(np.clip(1 - (s - s_taper[0]) / (s_taper[1] - s_taper[0]), 0.05, 1))
            narrow = np.clip((back - front) / (2 * hd0), 0.05, 1.0)
            hw = hw0 * (1 - 0.3 * (1 - narrow)) * (1 - 0.3 * side) * taper
            hd = np.maximum((back - front) / 2, 0.2) * taper
            return np.stack([hw, hd, (back + front) / 2])

        return ctx.cached(f"sac{bb}", compute)

    def region(ctx):
        return ctx.canal_box(hw0 + 3.0, -hd0 - 3.0, hd0 + 3.0)

    def sac_sdf(ctx, bb):
        hw, hd, qc = sac_axes(ctx, bb)
        return ellipse2(ctx.get("r")[bb], ctx.get("q")[bb] - qc, hw, hd)

    def csf(ctx, bb):
        return ramp(sac_sdf(ctx, bb))

    def cauda(ctx, bb):
        hw, hd, qc = sac_axes(ctx, bb)
        r, q = ctx.get("r")[bb], ctx.get("q")[bb] - qc
        near = np.full(r.shape, 99.0, dtype=np.float32)
        for u, v in roots:
            near = np.minimum(near, np.hypot(r - u * hw, q - v * hd))
        below = np.clip((ctx.get("s")[bb] - s_tip + 10.0) / 10.0, 0, 1)
        return ramp(near - 0.9, 0.9) * ramp(sac_sdf(ctx, bb)) * below

    def cord(ctx, bb):
        s = ctx.get("s")[bb]
        scale = np.sqrt(np.clip((s_tip - s) / 18.0, 0, 1))
        a, b = np.maximum(0.45 * hw0 * scale, 1e-3), np.maximum(0.5 * hd0 * scale, 1e-3)
        return ramp(ellipse2(ctx.get("r")[bb], ctx.get("q")[bb] - 0.1 * hd0, a, b)) * (scale > 0)

    def epidural(ctx, bb):
        r, q, s = ctx.get("r")[bb], ctx.get("q")[bb], ctx.get("s")[bb]
        q_lo, q_hi = -hd0 - gap - 1.0, hd0 + 7.0
        box = np.maximum(np.abs(r) - (hw0 + 4.5), np.abs(q - (q_lo + q_hi) / 2) - (q_hi - q_lo) / 2)
        return ramp(np.maximum(box, s - s_taper[1] - 25.0))

    return [
        Op(
            P_EPIDURAL,
            "fat",
            epidural,
            region=lambda ctx: ctx.canal_box(hw0 + 6, -hd0 - gap - 3, hd0 + 9),
        ),
        Op(P_CSF, "csf", csf, region=region),
        Op(P_CAUDA, "nerve", cauda, region=region),
        Op(P_CORD, "cord", cord, region=region),
    ]
