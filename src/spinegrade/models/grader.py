"""The EfficientNet + ViT severity grader, the model spinegrade is named for.

A crop is a short stack of MRI slices around one disc level (and side). Radiologists grade
stenosis by scrolling through neighbouring slices, because a narrowed canal or foramen is a 3D
shape: one slice can miss it. The grader mirrors that:

1. an EfficientNet encodes every slice on its own (slices folded into the batch, 1 channel);
2. its last feature map is pooled to a ``token_grid`` x ``token_grid`` grid and each cell becomes a
   token (a linear projection to ``dim``) plus a learned 2D position embedding and a learned slice
   embedding, so the transformer knows where and on which slice each piece of evidence lies;
3. ViT blocks attend over the tokens of all slices together, linking evidence across slices;
4. a CLS token (plus an optional disc-level embedding, because severity priors differ strongly by
   level: L4/L5 is diseased far more often than L1/L2) feeds a head of 3 logits per target.

Crops from several views (e.g. sagittal T2 + axial T2 of the same level) fit without code changes:
concatenate them along the slice axis; each slice position has its own learned embedding, so the
transformer tells the views apart as long as the layout is fixed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from spinegrade.models.weights import create_backbone, init_source
from spinegrade.task import LEVELS, SEVERITIES


class SpineGrader(nn.Module):
    """Crop (B, S, H, W) [+ level (B,)] -> grade logits (B, n_targets, n_classes).

    Args:
        backbone: timm EfficientNet name (``timm.list_models('*efficientnet*')``).
        in_slices: S, the number of slices per crop (fixed: one learned embedding per slice).
        token_grid: the feature map is pooled to ``token_grid`` x ``token_grid`` tokens per slice.
        dim, depth, heads, mlp_ratio: the transformer.
        dropout: on tokens and before the head; ``attn_dropout`` inside attention.
        drop_path: stochastic depth for backbone and transformer blocks.
        n_targets: logit sets per crop (1 for one condition at one level and side, one per
            condition where a group grades several findings on one crop, e.g. the disc's).
        n_classes: logits per target (3 RSNA severities; the most grades of the group's
            conditions, fewer-grade conditions masked by the loss and at prediction).
        n_levels: size of the level embedding added to the CLS token; 0 disables it.
        feature_index: backbone stage giving the tokens (-1 = last; -2 = one stage earlier, finer).
        pretrained, pretrained_path: ImageNet weights
            (:func:`spinegrade.models.weights.create_backbone`).
        backbone_kwargs: extra timm kwargs (e.g. ``channel_multiplier`` where the model accepts it).

    The build arguments are kept in ``self.spec`` so a saved model rebuilds from its sidecar.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_b0",
        *,
        in_slices: int = 5,
        token_grid: int = 4,
        dim: int = 256,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        drop_path: float = 0.1,
        n_targets: int = 1,
        n_classes: int = len(SEVERITIES),
        n_levels: int = len(LEVELS),
        feature_index: int = -1,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.dim={dim} must be divisible by model.heads={heads}")
        self.spec: dict[str, Any] = {
            "kind": "grader",
            "kwargs": dict(
                backbone=backbone, in_slices=in_slices, token_grid=token_grid, dim=dim,
                depth=depth, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout,
                attn_dropout=attn_dropout, drop_path=drop_path, n_targets=n_targets,
                n_levels=n_levels, feature_index=feature_index, pretrained=pretrained,
                pretrained_path=pretrained_path, backbone_kwargs=dict(backbone_kwargs or {}),
            ),
        }  # fmt: skip
        if n_classes != len(SEVERITIES):  # RSNA graders' sidecars stay as they were
            self.spec["kwargs"]["n_classes"] = n_classes
        self.in_slices, self.token_grid = in_slices, token_grid
        self.n_targets, self.n_classes, self.n_levels = n_targets, n_classes, n_levels
        # The pretrained part: optim.backbone_lr_scale scales the lr of ``encoder.*``.
        self.encoder = create_backbone(
            backbone,
            in_chans=1,
            out_indices=(feature_index,),
            pretrained=pretrained,
            pretrained_path=pretrained_path,
            drop_path=drop_path,
            **(backbone_kwargs or {}),
        )
        enc_channels = self.encoder.feature_info.channels()[-1]
        self.proj = nn.Sequential(nn.Linear(enc_channels, dim), nn.LayerNorm(dim))
        n_tok = token_grid * token_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, n_tok, dim))
        self.slice_embed = nn.Parameter(torch.zeros(1, in_slices, 1, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.level_embed = nn.Embedding(n_levels, dim) if n_levels > 0 else None
        self.token_drop = nn.Dropout(dropout)
        rates = torch.linspace(0, drop_path, depth).tolist() if depth else []
        self.blocks = nn.Sequential(
            *(
                Block(dim, heads, mlp_ratio, qkv_bias=True, proj_drop=dropout,
                      attn_drop=attn_dropout, drop_path=rate)
                for rate in rates
            )
        )  # fmt: skip
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_targets * self.n_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.pos_embed, self.slice_embed, self.cls_token):
            trunc_normal_(p, std=0.02)
        if self.level_embed is not None:
            trunc_normal_(self.level_embed.weight, std=0.02)
        # Start from near-uniform logits: the first steps then learn class priors, not noise.
        nn.init.zeros_(self.head[-1].bias)
        trunc_normal_(self.head[-1].weight, std=0.02)

    def encode_slices(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, H, W) -> tokens (B, S * token_grid**2, dim) with slice and position embeddings."""
        b, s, h, w = x.shape
        feats = self.encoder(x.reshape(b * s, 1, h, w))[-1]  # (B*S, C, h', w')
        feats = F.adaptive_avg_pool2d(feats, self.token_grid)  # (B*S, C, g, g)
        tokens = self.proj(feats.flatten(2).transpose(1, 2))  # (B*S, g*g, dim)
        tokens = tokens.reshape(b, s, -1, tokens.shape[-1]) + self.pos_embed + self.slice_embed
        return tokens.flatten(1, 2)

    def forward(self, x: torch.Tensor, level: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, n_targets, n_classes) for crops ``x`` (B, S, H, W) at ``level`` (B,) in 0..4.

        Pass ``level`` whenever the model has a level embedding: without it the embedding is
        unused (and DDP would need ``find_unused_parameters``).
        """
        self._check_input(x, level)
        tokens = self.encode_slices(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if self.level_embed is not None and level is not None:
            cls = cls + self.level_embed(level.long()).unsqueeze(1)
        tokens = self.token_drop(torch.cat([cls, tokens], dim=1))
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens[:, 0]).reshape(-1, self.n_targets, self.n_classes)

    def _check_input(self, x: torch.Tensor, level: torch.Tensor | None) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_slices:
            raise ValueError(
                f"grader expects crops (B, {self.in_slices}, H, W), got {tuple(x.shape)}; "
                "crops.slices must match the model's in_slices"
            )
        if level is not None and level.shape != (x.shape[0],):
            raise ValueError(f"level must have shape ({x.shape[0]},), got {tuple(level.shape)}")


class GraderMembers(nn.Module):
    """Graders of one group trained from different seeds (``train.members``), as one grader.

    Its logits are the members' mean: each condition's softmax over its own grades is then the
    normalised geometric mean of the members' probabilities, whatever padding a condition with
    fewer grades than the head has. The members may be torch graders or their ONNX Runtime twins
    (not modules; kept in a plain list then). ``init_source`` is the first member's: every member
    starts from the same backbone init.
    """

    def __init__(self, members: list[Any]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"GraderMembers needs two or more graders, got {len(members)}")
        if all(isinstance(m, nn.Module) for m in members):
            self.members: Any = nn.ModuleList(members)
        else:
            self.members = list(members)
        self.init_source = init_source(members[0])

    @property
    def device(self) -> torch.device:
        """Where the members run: the first one's device."""
        from spinegrade.models.registry import device_of  # registry builds graders: import here

        return device_of(self.members[0])

    def forward(self, x: torch.Tensor, level: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack([m(x, level) for m in self.members]).mean(0)
