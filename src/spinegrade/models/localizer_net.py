"""Stage-1 network: where each disc level lies in a sagittal stack (slice and in-plane point).

Design (chosen for robustness and CPU speed):

* **2.5D slice encoder.** Every sagittal slice is encoded by a small EfficientNet together with its
  ``context`` neighbours as extra input channels: a disc is a 3D structure, and the neighbours show
  whether a slice cuts through the canal's middle or the edge of a foramen.
* **Per-slice heatmaps.** A light FPN decoder fuses the stride 4..32 features back to stride 4 and
  predicts one heatmap per target (e.g. 5 spinal levels on sagittal T2, or 10 foramina, left and
  right L1/L2..L5/S1, on sagittal T1).
* **Slice context.** Which slice holds the mid-sagittal canal or a foramen is a property of the
  whole stack, not one slice (the foramina lie symmetrically lateral to the midline). A small
  transformer over per-slice summaries (plus the slice's relative position in the stack) adds a
  per-slice, per-target bias.
* **Joint soft-argmax.** ``heatmap + slice bias`` are logits of one distribution over
  (slice, y, x) per target. Its marginal over slices gives ``slice_logits`` (which slice), and its
  expectation gives sub-pixel ``xy`` and a fractional slice ``z``: differentiable and free of
  argmax quantisation. :func:`spinegrade.training.losses.localizer_loss` trains it.

Stacks of different depth are batched by padding at the END of the slice axis and passing
``slice_mask`` (True = real slice); padded slices get zero probability.
"""

from __future__ import annotations

import math
from typing import Any, NotRequired, TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from spinegrade.models.weights import create_backbone

MASKED_LOGIT = -1.0e4  # logit for padded slices: exp() underflows to 0, still finite in fp16/bf16


class LocalizerOutput(TypedDict):
    """What :class:`LevelLocalizer` returns (T targets, S slices, heatmap h x w at ``stride``)."""

    heatmaps: torch.Tensor  # (B, T, S, h, w) joint logits over (slice, y, x)
    slice_logits: torch.Tensor  # (B, T, S) log-marginal over slices
    xy: torch.Tensor  # (B, T, 2) expected (x, y) in input pixel coordinates
    z: torch.Tensor  # (B, T) expected slice index (fractional)
    image_hw: tuple[int, int]  # (H, W) of the input, to map pixels <-> heatmap cells
    # (B, S, C, h, w) class logits per slice (``seg_classes`` > 0 only; training's label maps)
    seg_logits: NotRequired[torch.Tensor]


class LevelLocalizer(nn.Module):
    """Sagittal stack (B, S, H, W) -> per-target slice and point (see module docstring).

    Args:
        backbone: timm EfficientNet name; features at strides 4, 8, 16, 32 are used.
        n_targets: heatmaps to predict (5 levels, or 10 = left + right foramina).
        context: neighbours on each side given as extra channels (input channels = 2*context+1).
        decoder_channels: width of the FPN decoder and of the slice transformer.
        slice_layers, slice_heads: the transformer over slices (0 layers = no slice context).
        dropout, drop_path: regularisation.
        seg_classes: with > 0, a head that draws the label maps' classes (disc, vertebra, canal)
            from the heatmaps' own features: an auxiliary target in training
            (``localizer.seg_weight``), unused in prediction.
        pretrained, pretrained_path, backbone_kwargs:
            :func:`spinegrade.models.weights.create_backbone`.

    H and W should be multiples of 32. Input values: floats, e.g. cached uint8 / 255.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_b0",
        *,
        n_targets: int = 5,
        context: int = 1,
        decoder_channels: int = 64,
        slice_layers: int = 2,
        slice_heads: int = 4,
        dropout: float = 0.1,
        drop_path: float = 0.1,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        seg_classes: int = 0,
    ) -> None:
        super().__init__()
        self.spec: dict[str, Any] = {
            "kind": "localizer",
            "kwargs": dict(
                backbone=backbone, n_targets=n_targets, context=context,
                decoder_channels=decoder_channels, slice_layers=slice_layers,
                slice_heads=slice_heads, dropout=dropout, drop_path=drop_path,
                pretrained=pretrained, pretrained_path=pretrained_path,
                backbone_kwargs=dict(backbone_kwargs or {}),
            ),
        }  # fmt: skip
        if seg_classes:  # older specs lack the key: their nets have no head
            self.spec["kwargs"]["seg_classes"] = seg_classes
        self.n_targets, self.context = n_targets, context
        # The pretrained part: optim.backbone_lr_scale scales the lr of ``encoder.*``.
        self.encoder = create_backbone(
            backbone,
            in_chans=2 * context + 1,
            out_indices=(1, 2, 3, 4),
            pretrained=pretrained,
            pretrained_path=pretrained_path,
            drop_path=drop_path,
            config_key="localizer",
            **(backbone_kwargs or {}),
        )
        channels = self.encoder.feature_info.channels()
        self.stride = self.encoder.feature_info.reduction()[0]
        d = decoder_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, d, 1) for c in channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(d, d, 3, padding=1, bias=False), nn.BatchNorm2d(d), nn.SiLU(inplace=True)
        )
        self.heat = nn.Conv2d(d, n_targets, 1)
        self.seg = nn.Conv2d(d, seg_classes, 1) if seg_classes else None
        self.slice_proj = nn.Linear(channels[-1], d)
        self.slice_pos = nn.Linear(16, d)  # Fourier features of the relative slice position
        self.slice_mixer = (
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(
                    d, slice_heads, 2 * d, dropout, batch_first=True, norm_first=True
                ),
                slice_layers,
                enable_nested_tensor=False,
            )
            if slice_layers > 0
            else None
        )
        self.slice_bias = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, n_targets))

    def forward(self, x: torch.Tensor, slice_mask: torch.Tensor | None = None) -> LocalizerOutput:
        """Locate the targets in stacks ``x`` (B, S, H, W); ``slice_mask`` (B, S): real slices."""
        logits, decoded = self._maps(x, slice_mask)
        out = self._read_out(logits, (x.shape[-2], x.shape[-1]))
        if self.seg is not None:
            seg = self.seg(decoded)  # (B*S, C, h, w)
            out["seg_logits"] = seg.reshape(*x.shape[:2], *seg.shape[1:])
        return out

    def heatmaps(self, x: torch.Tensor, slice_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The joint logits (B, T, S, h, w) alone: all that prediction decodes (the looks), and
        what an ONNX export of the localiser computes; the read-out's soft-argmax is for training.
        """
        return self._maps(x, slice_mask)[0]

    def _maps(
        self, x: torch.Tensor, slice_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The joint logits (B, T, S, h, w) and the decoder's features (B*S, d, h, w)."""
        b, s = x.shape[:2]
        mask = (
            torch.ones(b, s, dtype=torch.bool, device=x.device)
            if slice_mask is None
            else slice_mask
        )
        feats = self.encoder(self._neighbour_channels(x))
        decoded = self._decode(feats)
        heat = self.heat(decoded)  # (B*S, T, h', w')
        hh, ww = heat.shape[-2:]
        heat = heat.reshape(b, s, self.n_targets, hh, ww).transpose(1, 2)  # (B, T, S, h', w')
        bias = self._slice_context(feats[-1], mask, b, s)  # (B, T, S)
        logits = heat + bias[..., None, None]
        return logits.masked_fill(~mask[:, None, :, None, None], MASKED_LOGIT), decoded

    def _neighbour_channels(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, H, W) -> (B*S, 2c+1, H, W): each slice with its neighbours (edges repeated)."""
        b, s, h, w = x.shape
        c = self.context
        idx = torch.arange(s, device=x.device)[:, None] + torch.arange(-c, c + 1, device=x.device)
        idx = idx.clamp(0, s - 1)  # (S, 2c+1)
        return x[:, idx].reshape(b * s, 2 * c + 1, h, w)

    def _decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """FPN-lite: sum of upsampled lateral projections at the finest (stride 4) resolution."""
        size = feats[0].shape[-2:]
        out = self.lateral[0](feats[0])
        for lat, f in zip(self.lateral[1:], feats[1:], strict=True):
            out = out + F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False)
        return self.fuse(out)

    def _slice_context(
        self, deep: torch.Tensor, mask: torch.Tensor, b: int, s: int
    ) -> torch.Tensor:
        """Per-slice, per-target logit bias from the whole stack: (B, T, S)."""
        tokens = self.slice_proj(deep.mean((2, 3))).reshape(b, s, -1)
        tokens = tokens + self.slice_pos(_relative_position_features(mask))
        if self.slice_mixer is not None:
            tokens = self.slice_mixer(tokens, src_key_padding_mask=~mask)
        return self.slice_bias(tokens).transpose(1, 2)

    def _read_out(self, logits: torch.Tensor, image_hw: tuple[int, int]) -> LocalizerOutput:
        """Joint soft-argmax: expected slice and (x, y) in input pixels."""
        b, t, s, hh, ww = logits.shape
        prob = logits.float().flatten(2).softmax(-1).reshape(b, t, s, hh, ww)
        # Centre of heatmap cell j in input pixels (pixel-centre convention).
        xs = (torch.arange(ww, device=logits.device) + 0.5) * (image_hw[1] / ww) - 0.5
        ys = (torch.arange(hh, device=logits.device) + 0.5) * (image_hw[0] / hh) - 0.5
        zs = torch.arange(s, device=logits.device, dtype=prob.dtype)
        x = (prob.sum((2, 3)) * xs).sum(-1)
        y = (prob.sum((2, 4)) * ys).sum(-1)
        z = (prob.sum((3, 4)) * zs).sum(-1)
        return LocalizerOutput(
            heatmaps=logits,
            slice_logits=torch.logsumexp(logits.float().flatten(3), dim=-1),
            xy=torch.stack([x, y], dim=-1),
            z=z,
            image_hw=image_hw,
        )


def _relative_position_features(mask: torch.Tensor) -> torch.Tensor:
    """Fourier features (B, S, 16) of each slice's place in its stack, -1 (first) .. 1 (last).

    Relative, not absolute, because stacks differ in slice count while the midline stays central.
    """
    n_real = mask.sum(1, keepdim=True).clamp(min=2).float()
    u = 2 * torch.arange(mask.shape[1], device=mask.device).float()[None] / (n_real - 1) - 1
    freqs = torch.arange(1, 9, device=mask.device).float() * math.pi / 2
    angles = u[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)
