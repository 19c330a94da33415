"""Soft tissue around the spine: skin, fat, abdominal wall and contents, kidneys, muscles, vessels.

These follow the whole spine, so they are drawn in canal coordinates (``s`` along the canal, ``q``
posterior, ``r`` to the patient's left; see :class:`~.scene.SliceContext`). They matter
for realism (what surrounds the spine on every slice, and how the coil shading falls on it) and
for the localiser (landmarks around the levels), not for the grades.
"""

from __future__ import annotations

import numpy as np

from spinegrade.phantom.anatomy import Anatomy
from spinegrade.phantom.scene import Op, SliceContext, ellipse2, ramp

P_TRUNK, P_VISCERA, P_KIDNEY, P_MUSCLE, P_LIGAMENT, P_VESSEL = 10, 20, 25, 30, 31, 40
Box = tuple[slice, slice]
# Psoas size along the spine (T11..S3): absent above T12, largest at L4/L5.
_PSOAS_GROWTH = np.array([0.0, 0.1, 0.35, 0.55, 0.8, 1.0, 1.05, 0.95, 0.8, 0.6])


def plane_s(anat: Anatomy) -> np.ndarray:
    """Canal arc length at each zone plane."""
    seg = np.linalg.norm(np.diff(anat.canal_points, axis=0), axis=1)
    return np.concatenate([[0.0], np.cumsum(seg)])


def centre_s(anat: Anatomy) -> np.ndarray:
    """Canal arc length at the middle of each vertebra's zone."""
    s = plane_s(anat)
    return (s[:-1] + s[1:]) / 2


def _rq(ctx: SliceContext, bb: Box) -> tuple[np.ndarray, np.ndarray]:
    return ctx.get("r")[bb], ctx.get("q")[bb]


def soft_tissue_ops(anat: Anatomy) -> list[Op]:
    """All soft-tissue paint operations of one study."""
    rng = np.random.default_rng(anat.texture_seed + 1)
    geo = {
        "qc": anat.back_q - anat.trunk_hd,  # trunk ellipse centre
        "depth": float(np.mean([v.depth for v in anat.vertebrae[2:7]])),
        "width": float(np.mean([v.width for v in anat.vertebrae[2:7]])),
        "sub_fat": float(rng.uniform(12.0, 30.0)),  # subcutaneous fat, front and sides
        "wall": float(rng.uniform(12.0, 22.0)),  # abdominal wall and flank muscles
        "kidney_dx": float(rng.uniform(-6.0, 6.0)),
    }
    geo["q_front"] = -(anat.sac_hd + anat.epidural_gap + geo["depth"])  # anterior body margin
    geo["q_body"] = geo["q_front"] + geo["depth"] / 2
    return _trunk_ops(anat, geo) + _muscle_ops(anat, geo) + _organ_ops(anat, geo)


def _trunk_ops(anat: Anatomy, geo: dict[str, float]) -> list[Op]:
    """Subcutaneous fat (the body outline), the abdominal wall and the abdominal contents."""
    hw, hd, qc = anat.trunk_hw, anat.trunk_hd, geo["qc"]
    inset = geo["sub_fat"]
    wall_in = inset + geo["wall"]
    q_body = geo["q_body"]

    def trunk(ctx, bb):
        r, q = _rq(ctx, bb)
        return ramp(ellipse2(r, q - qc, hw, hd))

    def wall(ctx, bb):
        # Abdominal wall and flank muscles (obliques, transversus, latissimus): a band under
        # the subcutaneous fat all around the trunk; behind, it meets the back muscles.
        r, q = _rq(ctx, bb)
        outer = ellipse2(r, q - qc, hw - inset, hd - inset)
        inner = ellipse2(r, q - qc, hw - wall_in, hd - wall_in)
        return ramp(np.maximum(outer, -inner))

    def viscera(ctx, bb):
        # Bowel and mesentery: inside the wall, in front of the retroperitoneum, whose front
        # curves backwards away from the midline (the colon lies beside the kidneys).
        r, q = _rq(ctx, bb)
        inner = ellipse2(r, q - qc, hw - wall_in, hd - wall_in)
        reach = (q_body + 30.0) - (geo["q_front"] - 10.0)
        front = q - (geo["q_front"] - 10.0 + reach * (1 - np.exp(-((r / 75.0) ** 2))))
        return ramp(np.maximum(inner, front))

    return [
        Op(P_TRUNK, "fat", trunk),
        Op(P_VISCERA, "viscera", viscera),
        Op(P_MUSCLE, "muscle", wall),
    ]


def _muscle_ops(anat: Anatomy, geo: dict[str, float]) -> list[Op]:
    """Psoas, quadratus lumborum, erector spinae + multifidus, and the interspinous ligaments."""
    s_c = centre_s(anat)
    ms = anat.muscle_scale
    fat_back = float(np.clip(anat.back_q - 62.0, 4.0, 20.0))
    e_front, e_back = 0.3 * anat.sac_hd, anat.back_q - fat_back
    width, q_body = geo["width"], geo["q_body"]

    def psoas(ctx, bb, sg):
        g = np.interp(ctx.get("s")[bb], s_c, _PSOAS_GROWTH).astype(np.float32)
        a, b = (6.0 + 13.0 * g) * ms, (7.0 + 12.0 * g) * ms
        r, q = _rq(ctx, bb)
        return ramp(ellipse2(r - sg * (width / 2 + a - 4.0), q - q_body, a, b)) * (g > 0.05)

    def erector(ctx, bb, sg):
        # One rounded mass per side from the midline (around the spinous processes) to beyond
        # the transverse processes, from the laminae back to the thoracolumbar fascia; its
        # rounded back half merges into the subcutaneous fat.
        a, b = 30.0 * ms, (e_back - e_front) / 2
        r, q = _rq(ctx, bb)
        u, v = np.abs(r - sg * (a - 1.0)) / a, np.abs(q - (e_front + b)) / b
        k = np.cbrt(u * u * u + v * v * v)  # superellipse (m = 3): full, with rounded corners
        return ramp((k - 1.0) * min(a, b))

    def quadratus(ctx, bb, sg):
        s = ctx.get("s")[bb]
        inside = (s > s_c[2]) & (s < s_c[6])
        r, q = _rq(ctx, bb)
        return ramp(ellipse2(r - sg * 64.0 * ms, q - anat.sac_hd, 15.0 * ms, 9.0)) * inside

    def interspinous(ctx, bb):
        # Interspinous and supraspinous ligaments: a thin midline sheet behind the laminae.
        r, q = _rq(ctx, bb)
        lo, hi = anat.sac_hd + 9.0, anat.sac_hd + 46.0
        return ramp(np.maximum(np.abs(r) - 1.5, np.abs(q - (lo + hi) / 2) - (hi - lo) / 2))

    psoas_max = 19.0 * ms * 1.05 + 2.0  # largest half axis, plus the partial-volume edge
    psoas_box = {
        "r_max": width / 2 + 2 * 19.0 * ms * 1.05,
        "q_min": q_body - psoas_max,
        "q_max": q_body + psoas_max,
        "s_range": (float(s_c[1]) - 20.0, float(np.inf)),
    }
    quad_box = {
        "r_max": 64.0 * ms + 17.0 * ms,
        "r_min": 64.0 * ms - 17.0 * ms,
        "q_min": anat.sac_hd - 11.0,
        "q_max": anat.sac_hd + 11.0,
        "s_range": (float(s_c[2]), float(s_c[6])),
    }
    ops = [Op(P_LIGAMENT, "fibrous", interspinous)]
    for sg in (1.0, -1.0):
        ops += [
            Op(
                P_MUSCLE,
                "muscle",
                lambda c, b, sg=sg: psoas(c, b, sg),
                region=lambda c: c.canal_box(**psoas_box),
            ),
            Op(P_MUSCLE, "muscle", lambda c, b, sg=sg: erector(c, b, sg)),
            Op(
                P_MUSCLE,
                "muscle",
                lambda c, b, sg=sg: quadratus(c, b, sg),
                region=lambda c: c.canal_box(**quad_box),
            ),
        ]
    return ops


def _organ_ops(anat: Anatomy, geo: dict[str, float]) -> list[Op]:
    """Kidneys (T12-L3, in perirenal fat) and the great vessels (flow voids)."""
    s_c = centre_s(anat)
    q_front, q_body = geo["q_front"], geo["q_body"]
    ops: list[Op] = []
    for sg, ds in ((1.0, -8.0), (-1.0, 8.0)):  # the left kidney sits a little higher
        s_k = (s_c[2] + s_c[3]) / 2 + ds + geo["kidney_dx"]
        r_k = sg * (geo["width"] / 2 + 42.0)

        def kidney(ctx, bb, s_k=s_k, r_k=r_k):
            r, q = _rq(ctx, bb)
            s = ctx.get("s")[bb]
            k = np.sqrt(
                ((r - r_k) / 24.0) ** 2 + ((q - q_body - 8.0) / 17.0) ** 2 + ((s - s_k) / 52.0) ** 2
            )
            return ramp((k - 1.0) * 17.0)

        box = {
            "r_max": abs(r_k) + 26.0,
            "r_min": abs(r_k) - 26.0,
            "q_min": q_body - 11.0,
            "q_max": q_body + 27.0,
            "s_range": (s_k - 54.0, s_k + 54.0),
        }
        ops.append(Op(P_KIDNEY, "kidney", kidney, region=lambda c, box=box: c.canal_box(**box)))

    def aorta(ctx, bb):
        r, q = _rq(ctx, bb)
        return ramp(
            np.maximum(
                ellipse2(r - 10.0, q - (q_front - 13.0), 10.5, 10.5), ctx.get("s")[bb] - s_c[5]
            )
        )

    def ivc(ctx, bb):
        r, q = _rq(ctx, bb)
        return ramp(
            np.maximum(
                ellipse2(r + 20.0, q - (q_front - 11.0), 12.0, 8.0), ctx.get("s")[bb] - s_c[6]
            )
        )

    return [*ops, Op(P_VESSEL, "vessel", aorta), Op(P_VESSEL, "vessel", ivc)]
