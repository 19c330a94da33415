"""A fold's stage-1 nets with the frame settings they were trained with: saved and loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from spinegrade.localization.derived import FUSE_LEADS
from spinegrade.localization.tasks import LOCALIZER_TASKS

# ----------------------------------------------------------------------------- the localiser

# How the five level maps become five named points (see decode_levels): "ordered" gives each level
# its best peak, head to feet and apart; "chain" names consecutive discs as a run.
DECODERS: tuple[str, ...] = ("ordered", "chain")


@dataclass
class Localizer:
    """The stage-1 models of one fold plus the learned patient-space offsets."""

    nets: dict[str, nn.Module]  # task name -> LevelLocalizer
    offsets: dict[str, np.ndarray]  # see fit_offsets
    image_size: int
    max_slices: int
    zoom: float = 0.0  # second, zoomed look (fraction of the field of view); 0 = one look
    fuse_mm: float = 0.0  # canal/foramina consensus tolerance (see fuse_level_points); 0 = off
    decoder: str = "ordered"  # level naming, see DECODERS
    fine: float = 0.0  # third, close look per level (fraction of the field of view); 0 = off
    # SD (mm) of the whole look's vote on the zoomed look's run of discs (chain decoder); 0 = off
    vote_mm: float = 0.0
    # Which point leads the canal/foramina consensus (derived.FUSE_LEADS, derived.fusion_lead);
    # None: not recorded (localisers saved before it), see fold_models.load_fold_models.
    fuse_lead: str | None = ""

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"localizer decoder {self.decoder!r}: use one of {list(DECODERS)}")
        if self.fuse_lead not in (*FUSE_LEADS, None):
            raise ValueError(f"fusion lead {self.fuse_lead!r}: use one of {list(FUSE_LEADS)}")

    def save(self, folder: Path, meta: dict | None = None) -> None:
        """``localizer_{task}.safetensors`` (+ sidecar), then ``localizer_geometry.json``.

        The geometry file, written last and atomically, commits the localiser; it lists the tasks
        whose nets were saved so that :meth:`load` can refuse a fold with one missing.
        """
        from spinegrade.models.weights import save_weights
        from spinegrade.util.atomic import write_json

        folder.mkdir(parents=True, exist_ok=True)
        for name, net in self.nets.items():
            path = folder / f"localizer_{name}.safetensors"
            save_weights(net, path, meta={**(meta or {}), "task": name})
        geometry = {
            "image_size": self.image_size,
            "max_slices": self.max_slices,
            "zoom": self.zoom,
            "fuse_mm": self.fuse_mm,
            "decoder": self.decoder,
            "fine": self.fine,
            "vote_mm": self.vote_mm,
            "fuse_lead": self.fuse_lead,
            "offsets": {k: v.tolist() for k, v in self.offsets.items()},
            "tasks": sorted(self.nets),
        }
        write_json(folder / "localizer_geometry.json", geometry)

    @classmethod
    def load(cls, folder: Path, device: str = "cpu", engine: str = "torch") -> Localizer:
        """Rebuild from :meth:`save`'s files (safetensors + JSON only); with ``engine`` "onnx",
        the nets are their checked ONNX exports in ONNX Runtime (:mod:`spinegrade.models.onnx`).
        """
        from spinegrade.models.registry import load_model

        def load(path: Path):
            if engine == "onnx":
                from spinegrade.models.onnx import load_onnx

                return load_onnx(path)
            return load_model(path, device=device)[0]

        geometry_path = Path(folder) / "localizer_geometry.json"
        if not geometry_path.is_file():
            raise FileNotFoundError(
                f"{geometry_path} is missing: the fold's localiser was not trained"
            )
        geometry = json.loads(geometry_path.read_text())
        nets = {}
        # Runs older than the "tasks" entry: the nets present are the nets trained.
        tasks = geometry.get("tasks")
        for name in LOCALIZER_TASKS if tasks is None else tasks:
            path = Path(folder) / f"localizer_{name}.safetensors"
            if tasks is not None or path.is_file():
                nets[name] = load(path)  # missing: an error naming it
        offsets = {k: np.asarray(v, dtype=np.float64) for k, v in geometry["offsets"].items()}
        return cls(
            nets, offsets, int(geometry["image_size"]), int(geometry["max_slices"]),
            float(geometry.get("zoom", 0.0)), float(geometry.get("fuse_mm", 0.0)),
            str(geometry.get("decoder", "ordered")), float(geometry.get("fine", 0.0)),
            float(geometry.get("vote_mm", 0.0)), geometry.get("fuse_lead"),
        )  # fmt: skip
