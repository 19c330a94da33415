"""The stage-1 training dataset: whole and zoomed looks at sagittal stacks, augmented."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from spinegrade.config import LocalizerAugmentConfig
from spinegrade.data.epoch import EpochDataset
from spinegrade.data.label_maps import UNKNOWN
from spinegrade.localization.frames import SagittalFrame
from spinegrade.localization.samples import LocalizerSample

# ------------------------------------------------------------------------ stage-1 training data


NO_LOCALIZER_AUGMENT = LocalizerAugmentConfig(
    **{f.name: 0.0 for f in dataclasses.fields(LocalizerAugmentConfig)}
)


class LocalizerDataset(EpochDataset):
    """Sagittal stacks seen whole or zoomed (as the two looks of prediction), augmented.

    A zoomed view is centred near the middle of the targets with a random offset of up to
    ``shift_frac`` of the window and a +-15 % scale change, so the second look of prediction,
    centred on the first look's estimate, sees what training showed it. With ``aug`` (see
    :class:`~spinegrade.config.LocalizerAugmentConfig`) a whole look is also rescaled, stretched,
    shifted and rotated, and every look gets scanner-like intensity changes: real series differ
    from the phantom's in field of view, spine position, contrast, noise and shading, and the
    network must find discs by what they look like, not where they sit in the image.
    """

    def __init__(
        self,
        samples: Sequence[LocalizerSample],
        augment: bool,
        zoom: float = 0.0,
        zoom_prob: float = 0.5,
        shift_frac: float = 0.1,
        seed: int = 0,
        aug: LocalizerAugmentConfig | None = None,
        fine: float = 0.0,
    ) -> None:
        self.samples, self.augment, self.seed = list(samples), augment, seed
        self.zoom, self.zoom_prob, self.shift_frac = zoom, zoom_prob, shift_frac
        self.aug = aug if aug is not None else NO_LOCALIZER_AUGMENT
        self.fine = fine

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s = self.samples[i]
        if not self.augment:
            return s.view(s.frame)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        frame = s.frame
        if 0 < self.fine < 1 and s.valid.any() and rng.random() < 1 / 3:
            # The close look of prediction: centred on one level, off by up to the zoomed
            # look's typical error (a third of the window's half).
            j = int(rng.choice(np.flatnonzero(s.valid)))
            frac = self.fine * rng.uniform(0.85, 1.15)
            side = frame.field()[2]
            cy, cx = s.zyx[j, 1:] + rng.uniform(-1, 1, 2) * frac * side / 6
            frame = frame.zoomed(float(cy), float(cx), frac)
        elif 0 < self.zoom < 1 and rng.random() < self.zoom_prob:
            frac = self.zoom * rng.uniform(0.85, 1.15)
            side = frame.field()[2]
            ys, xs = s.zyx[s.valid, 1], s.zyx[s.valid, 2]
            cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
            cy += rng.uniform(-1, 1) * self.shift_frac * frac * side
            cx += rng.uniform(-1, 1) * self.shift_frac * frac * side
            frame = _stretched(frame.zoomed(cy, cx, frac), rng, self.aug.aspect)
        else:
            frame = _whole_look(s, rng, self.aug)
        item = s.view(frame)
        a = self.aug
        if a.rotate_deg > 0:
            _rotate(item, rng.uniform(-a.rotate_deg, a.rotate_deg))
        item["volume"] = _intensity(item["volume"], rng, a)
        return item


def _stretched(frame: SagittalFrame, rng: np.random.Generator, aspect: float) -> SagittalFrame:
    """The same window with its height/width ratio changed by up to ``aspect`` (same centre)."""
    if aspect <= 0 or frame.window is None:
        return frame
    y0, x0, lh, lw = frame.window
    r = float(np.exp(rng.uniform(-1, 1) * np.log1p(aspect)))
    nh, nw = max(8, round(lh * np.sqrt(r))), max(8, round(lw / np.sqrt(r)))
    return dataclasses.replace(
        frame, window=(round(y0 + (lh - nh) / 2), round(x0 + (lw - nw) / 2), nh, nw)
    )


def _whole_look(
    s: LocalizerSample, rng: np.random.Generator, a: LocalizerAugmentConfig
) -> SagittalFrame:
    """A rescaled, stretched, shifted window of the whole field that keeps every target in view.

    Up to 8 draws; if none keeps the labelled levels inside (with a 4% margin), the plain frame.
    """
    frame = s.frame
    if a.scale <= 0 and a.aspect <= 0 and a.shift <= 0:
        return frame
    fy, fx, side, _ = frame.field()  # the square field: proportions kept
    ys, xs = s.zyx[s.valid, 1], s.zyx[s.valid, 2]
    for _ in range(8):
        k = float(np.exp(rng.uniform(-1, 1) * np.log1p(a.scale)))
        r = float(np.exp(rng.uniform(-1, 1) * np.log1p(a.aspect)))
        lh, lw = max(8, round(side * k * np.sqrt(r))), max(8, round(side * k / np.sqrt(r)))
        cy = fy + side / 2 + rng.uniform(-1, 1) * a.shift * side
        cx = fx + side / 2 + rng.uniform(-1, 1) * a.shift * side
        y0, x0 = round(cy - lh / 2), round(cx - lw / 2)
        my, mx = 0.04 * lh, 0.04 * lw
        if (
            (ys >= y0 + my).all() and (ys <= y0 + lh - my).all()
            and (xs >= x0 + mx).all() and (xs <= x0 + lw - mx).all()
        ):  # fmt: skip
            return dataclasses.replace(frame, window=(y0, x0, lh, lw))
    return frame


def _rotate(item: dict[str, np.ndarray], degrees: float) -> None:
    """Rotate the volume and its target points in-plane about the image centre (in place)."""
    vol = torch.from_numpy(item["volume"])[None]  # (1, S, H, W): slices as channels
    size = vol.shape[-1]
    t = np.deg2rad(degrees)
    c, sn = float(np.cos(t)), float(np.sin(t))
    theta = torch.tensor([[[c, -sn, 0.0], [sn, c, 0.0]]], dtype=vol.dtype)
    grid = F.affine_grid(theta, list(vol.shape), align_corners=False)
    item["volume"] = F.grid_sample(vol, grid, align_corners=False)[0].numpy()
    if "seg" in item:  # classes turn with the image; what comes in from outside is background
        seg = torch.from_numpy(item["seg"].astype(np.float32))[None]
        turned = F.grid_sample(seg, grid, mode="nearest", align_corners=False)[0]
        item["seg"] = turned.numpy().astype(np.uint8)
    # affine_grid maps output -> input: p_in = R p_out, so targets move by R^T (normalised coords).
    half = size / 2
    u, v = (item["xy"][:, 0] + 0.5) / half - 1, (item["xy"][:, 1] + 0.5) / half - 1
    uo, vo = c * u + sn * v, -sn * u + c * v
    xy = np.stack([(uo + 1) * half - 0.5, (vo + 1) * half - 0.5], axis=-1).astype(np.float32)
    inside = (xy >= 0).all(-1) & (xy < size).all(-1)
    item["xy"], item["valid"] = xy, item["valid"] & inside


def _intensity(vol: np.ndarray, rng: np.random.Generator, a: LocalizerAugmentConfig) -> np.ndarray:
    """Scanner-like intensity changes of a (S, H, W) look in [0, 1]."""
    from scipy.ndimage import gaussian_filter

    if a.blur > 0:  # thicker slices, smoother reconstructions
        sigma = rng.uniform(0, a.blur)
        if sigma > 0.3:
            vol = gaussian_filter(vol, (0, sigma, sigma), mode="nearest")
    if a.bias > 0:  # receive-coil shading: a smooth field from a 3 x 3 grid of log gains
        coarse = torch.from_numpy(rng.normal(0, a.bias, (1, 1, 3, 3)).astype(np.float32))
        field = F.interpolate(coarse, size=vol.shape[-2:], mode="bicubic", align_corners=True)
        vol = vol * np.exp(field[0, 0].numpy())
    if a.contrast > 0:  # about mid-grey, so the background stays dark
        vol = (vol - 0.5) * np.exp(rng.uniform(-1, 1) * np.log1p(a.contrast)) + 0.5
    else:  # the mild jitter every look gets (with everything off: the draws of before #12)
        vol = vol * rng.uniform(0.8, 1.2)
    vol = vol + rng.uniform(-0.1, 0.1)
    if a.noise > 0:
        vol = vol + rng.normal(0, rng.uniform(0, a.noise), vol.shape)
    vol = np.clip(vol, 0, 1)
    g = np.exp(rng.uniform(-1, 1) * a.gamma) if a.gamma > 0 else rng.uniform(0.8, 1.25)
    return (vol**g).astype(np.float32)


def collate_stacks(batch: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Pad stacks at the end of the slice axis; ``mask`` marks real slices. Where any stack has
    label maps, ``seg`` (B, S, H, W) uint8 holds them, :data:`UNKNOWN` elsewhere (padding and
    stacks without maps), which the loss ignores."""
    depth = max(b["volume"].shape[0] for b in batch)
    size = batch[0]["volume"].shape[-1]
    vol = torch.zeros(len(batch), depth, size, size)
    mask = torch.zeros(len(batch), depth, dtype=torch.bool)
    seg = None
    if any("seg" in b for b in batch):
        seg = torch.full((len(batch), depth, size, size), UNKNOWN, dtype=torch.uint8)
    for i, b in enumerate(batch):
        d = b["volume"].shape[0]
        vol[i, :d] = torch.from_numpy(b["volume"])
        mask[i, :d] = True
        if seg is not None and "seg" in b:
            seg[i, :d] = torch.from_numpy(b["seg"])
    out = {"volume": vol, "mask": mask}
    if seg is not None:
        out["seg"] = seg
    for key in ("xy", "z", "valid"):
        out[key] = torch.from_numpy(np.stack([b[key] for b in batch]))
    return out
