"""Models: the EfficientNet + ViT grader, the stage-1 level localiser, and their registry."""

from spinegrade.models.grader import SpineGrader
from spinegrade.models.localizer_net import LevelLocalizer, LocalizerOutput
from spinegrade.models.registry import (
    build_from_spec,
    build_grader,
    build_localizer,
    load_model,
)

__all__ = [
    "LevelLocalizer",
    "LocalizerOutput",
    "SpineGrader",
    "build_from_spec",
    "build_grader",
    "build_localizer",
    "load_model",
]
