"""Typed experiment configuration: nested dataclasses, loaded from YAML, saved in each run folder.

A config is resolved in three steps, each overriding the one before:

1. the dataclass defaults below (which equal ``configs/default.yaml``),
2. a YAML file: a packaged name (``quick`` for CPU, ``default`` for GPU) or a path; a file may name
   a ``base:`` (a packaged name or another file, relative to itself) and then lists only changes,
3. dotted ``key=value`` overrides from the command line, e.g. ``train.epochs=3 model.depth=1``.

Unknown keys are errors that name the file and suggest the closest key, so a typo never silently
trains the wrong model. Keys that were removed (:data:`REMOVED_KEYS`) are dropped with a warning
when a file still holds them, so old run folders keep loading. The resolved config is written to
the run folder with :func:`save_config` and read back with :func:`load_config` (prediction never
imports a config module by name).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PACKAGED_CONFIGS: tuple[str, ...] = ("quick", "default")

# Keys older versions wrote into run folders, with why they went. A file (an old run folder's
# config.yaml, a weights sidecar) that holds one still loads; setting one by override is an error.
REMOVED_KEYS: dict[str, str] = {
    "train.devices": (
        "the number of processes comes from torchrun (WORLD_SIZE); for several GPUs launch "
        "`torchrun --nproc_per_node N -m spinegrade.cli train ...`"
    ),
}

log = logging.getLogger(__name__)
_warned: set[str] = set()


class ConfigError(ValueError):
    """A config file or override that cannot be applied (unknown key, wrong type, missing file)."""


@dataclass
class DataConfig:
    """Where the data and the cache live, and how studies are split."""

    data_dir: str = "data"  # RSNA layout root (train.csv, train_images/, ...)
    cache_dir: str = "cache"  # preprocess output (index.csv, manifest.json, stacks)
    # Cached in-plane grid: native spacing, coarsened to at least cache_mm (mm a pixel, 0 = native)
    # and until the longer side fits cache_size pixels. `spinegrade preprocess` takes both from
    # the config; train and predict refuse a cache made with other values (its manifest.json).
    cache_size: int = 512
    cache_mm: float = 0.7
    n_folds: int = 5
    # Further training data trained on together with data_dir (phantom + real, RSNA + a
    # hospital's own studies): each {data_dir: ..., cache_dir: ...}. Studies keep their source
    # (folds.csv, metrics.json, cv.json) and folds are stratified by it.
    sources: list[dict[str, str]] = field(default_factory=list)


@dataclass
class CropConfig:
    """The per-level (and per-side) stacks of slices the grader sees.

    The field of view is physical (mm), so crops mean the same anatomy whatever the pixel spacing;
    it is then resampled to ``size`` x ``size`` pixels.
    """

    size: int = 128  # crop H = W in pixels
    slices: int = 5  # slices per crop, centred on the level's slice (odd)
    slice_step: int = 1  # take every n-th slice around the centre
    spinal_mm: float = 40.0  # sagittal T2 field around the canal point
    # Sagittal field around the disc centre (a task's disc crops); None = spinal_mm, as runs
    # before this setting cut them.
    disc_mm: float | None = None
    foraminal_mm: float = 40.0  # sagittal T1 field around the foramen
    subarticular_mm: float = 48.0  # axial T2 field around the canal (both recesses visible)
    slice_jitter: int = 2  # training: shift the centre slice by up to +-N (stage-1 slice errors)
    shift_frac: float = 0.1  # training: shift the centre by up to this fraction of the field
    scale_jitter: float = 0.1  # training: relative zoom range
    rotate_deg: float = 10.0  # training: in-plane rotation range
    # Training, spinal (sagittal T2) crops only: reverse the slice order half the time, a
    # left/right mirror of the canal (stenosis has no side). Foraminal and subarticular crops are
    # never flipped: their labels are per side.
    flip_lr: bool = True
    max_project_mm: float = 10.0  # a level farther than this from every axial slice is not cut
    tta: int = 4  # prediction: also grade this many jittered crops and average (0 = centred only)


@dataclass
class ModelConfig:
    """The EfficientNet + ViT grader (see :class:`spinegrade.models.grader.SpineGrader`)."""

    backbone: str = "tf_efficientnetv2_s"  # any timm EfficientNet name
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {channel_multiplier: 0.5}
    pretrained: bool = True  # ImageNet weights (pretrained_path or timm's hub), else an error
    pretrained_path: str | None = None  # local weights file (safetensors or torch) for the backbone
    feature_index: int = -1  # which backbone stage gives the tokens (-1 = last, stride 32)
    token_grid: int = 4  # tokens per slice = token_grid**2 (adaptive pooling of the feature map)
    dim: int = 256  # transformer width
    depth: int = 2  # transformer blocks
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1  # token and head dropout
    attn_dropout: float = 0.0
    drop_path: float = 0.1  # stochastic depth, backbone and transformer
    level_embedding: bool = True  # condition the CLS token on the disc level (priors vary by level)
    # A run folder (RUN_DIR of `spinegrade train`): every fold's graders start from its weights
    # (fold_K/grader_<group>.safetensors, whole network, strict) instead of the backbone init
    # above; see spinegrade.training.init_from. None: the backbone init.
    init_from: str | None = None


@dataclass
class OptimConfig:
    """Optimiser and schedule (the learning rate itself is ``train.lr``)."""

    name: str = "adamw"  # adamw | sgd
    weight_decay: float = 0.05
    scheduler: str = "cosine"  # cosine | constant
    warmup_frac: float = 0.05  # fraction of all steps with linear warm-up
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    backbone_lr_scale: float = 1.0  # lr multiplier for the backbones (grader and localiser)


@dataclass
class LossConfig:
    """The loss, shaped like the competition metric."""

    class_weights: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    any_severe_weight: float = 1.0  # coefficient of the any-severe-spinal term (spinal only)
    label_smoothing: float = 0.0
    # Tasks other than RSNA 2024: an ordinal grade's target spreads to its neighbours as a
    # Gaussian of this SD in grades (0: one-hot; see training.losses.ordinal_targets).
    ordinal_sigma: float = 0.0


@dataclass
class TrainConfig:
    """The training loop and the hardware it runs on."""

    epochs: int = 15
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 3e-4
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    channels_last: bool = True
    num_workers: int = 4
    accelerator: str = "auto"  # auto | cpu | cuda
    strategy: str = "auto"  # auto | ddp
    groups: list[str] = field(default_factory=lambda: ["spinal", "foraminal", "subarticular"])
    folds: list[int] | None = None  # None = all folds
    log_every: int = 50  # optimiser steps between step lines in a fold's log.jsonl (0: off)
    eval_every: int = 1  # validate every n-th epoch (and always the last): logging only
    weight_average: float = 0.1  # keep an EMA of the weights over ~this fraction of steps (0: off)
    prior_mix: float = 0.2  # prediction: mix this much of the training prior into graded cells
    # Graders a group trains per fold, each from its own seed; prediction averages their logits.
    # A few dozen real spines teach a random-init grader differently with every seed (SPIDER's
    # Pfirrmann kappa 0.42-0.58 over seeds); the mean of several is steadier than any one.
    members: int = 1
    fold_workers: int = 0  # CPU: folds trained side by side in processes (0 = one per core)
    ddp_timeout_s: float = 600.0  # DDP: a collective waiting longer than this fails the run


@dataclass
class LocalizerAugmentConfig:
    """Stage-1 training augmentation: what differs between sites and scanners, not anatomy.

    Geometry: the whole look is cut from a window of the field of view that is rescaled
    (``scale``: relative range), stretched (``aspect``), moved (``shift``: fraction of the field,
    so a look may lose the sacrum or gain thoracic levels; the labelled levels stay in view) and
    rotated in-plane (``rotate_deg``). Intensity: gamma (``gamma``: log range), contrast,
    Gaussian noise (``noise``: largest SD, image range 0-1), in-plane blur (``blur``: largest
    sigma in pixels) and a smooth multiplicative bias field (``bias``: log amplitude). 0 = off.
    Off by default: at the strengths tried (scale 0.25, aspect 0.2, shift 0.15, rotate_deg 12,
    gamma 0.4, contrast 0.3, noise 0.05, blur 1.2, bias 0.35) the quick recipe's localiser got
    worse on the phantom and on real spines (BENCHMARKS.md, "Real anatomy"); the intensity part
    alone, with the close look, was neutral over three seeds (same section, "Third round").
    """

    scale: float = 0.0
    aspect: float = 0.0
    shift: float = 0.0
    rotate_deg: float = 0.0
    gamma: float = 0.0
    contrast: float = 0.0
    noise: float = 0.0
    blur: float = 0.0
    bias: float = 0.0


@dataclass
class LocalizerConfig:
    """Stage 1 (see :class:`spinegrade.models.localizer_net.LevelLocalizer`)."""

    backbone: str = "efficientnet_b0"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = True
    pretrained_path: str | None = None
    image_size: int = 256  # sagittal slices are resized to image_size x image_size
    max_slices: int = 32  # stacks are padded (with a mask) or centre-cut to this many slices
    context: int = 1  # 2.5D: each slice sees +-context neighbours as extra input channels
    decoder_channels: int = 64
    slice_layers: int = 2  # transformer layers linking slices (which slice holds the level)
    slice_heads: int = 4
    dropout: float = 0.1
    drop_path: float = 0.1
    sigma: float = 1.5  # target heatmap std in heatmap cells (stride 4)
    zoom: float = 0.65  # second, zoomed look at this fraction of the field of view (0 = off)
    # Training's zoomed looks are centred on the targets' middle, moved by up to this fraction of
    # the window: prediction centres them on the whole look's estimate, which may be a disc off.
    zoom_shift: float = 0.1
    # Third, close look per level at this fraction of the field of view (0 = off): it sharpens
    # where on its disc a level lies; the zoomed look has already named the discs.
    fine: float = 0.3
    # A canal or foramen point farther than this from the level's three-point consensus is moved
    # onto it (localize.fuse_level_points); 0 = off. Where the canal's net learned from real
    # spines and the foramina's did not, the canal is the consensus (derived.fusion_lead).
    fuse_mm: float = 10.0
    # Level naming (localize.DECODERS): "ordered" = each level's best peak, head to feet;
    # "chain" = the five levels on consecutive discs (a run of the discs seen, moved as one).
    decoder: str = "chain"
    # With the chain decoder: the whole look's levels vote on which run of discs the zoomed look
    # names, a Gaussian of this SD in mm about the whole look's rows (0 = off; looks.py).
    vote_mm: float = 0.0
    # Which stage-1 nets to train (localize.LOCALIZER_TASKS): "spinal" reads sagittal T2 for the
    # canal (and, by offsets, the recesses), "foraminal" sagittal T1 for both foramina. A run
    # without one grades those targets at derived points or the prior; experiments on the canal
    # alone (bench/bench_real_anatomy_seeds.py) train only "spinal", in half the time.
    tasks: list[str] = field(default_factory=lambda: ["spinal", "foraminal"])
    # Real studies (a source that is not a phantom) are shown this many times an epoch: a few
    # dozen real spines beside a hundred phantoms are what teaches real anatomy.
    real_repeat: int = 1
    # Weight of the label maps' loss (data.label_maps: disc, vertebra, canal drawn on every slice
    # of the real sets that have them) beside the points' loss; 0 = no segmentation head.
    seg_weight: float = 0.0
    epochs: int = 20
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.01
    # A run folder: every fold's stage-1 nets start from its fold_K/localizer_<task>.safetensors
    # (as model.init_from for the graders). None: the backbone init.
    init_from: str | None = None
    augment: LocalizerAugmentConfig = field(default_factory=LocalizerAugmentConfig)


@dataclass
class Config:
    """One experiment: everything needed to rebuild a run from its folder."""

    name: str = "default"
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    localizer: LocalizerConfig = field(default_factory=LocalizerConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready)."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def load_config(name_or_path: str | Path = "quick", overrides: list[str] | None = None) -> Config:
    """Resolve a config: defaults <- packaged name or YAML file (with ``base:``) <- overrides.

    ``name_or_path`` is ``quick``, ``default`` or a path to a YAML file (e.g. a run folder's
    ``config.yaml``). ``overrides`` are dotted ``key=value`` strings; values are parsed as YAML
    and coerced to the field's type (``train.folds=[0,1]``, ``model.pretrained_path=null``).
    """
    cfg = Config()
    for source, mapping in _resolve_chain(name_or_path, seen=()):
        _apply_mapping(cfg, mapping, source)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=3)")
        set_value(cfg, key.strip(), yaml.safe_load(raw) if raw.strip() else "", source="override")
    return cfg


def config_from_dict(mapping: dict[str, Any], source: str = "dict") -> Config:
    """Build a Config from a nested dict (e.g. the ``config`` of a weights sidecar)."""
    cfg = Config()
    _apply_mapping(cfg, {k: v for k, v in mapping.items() if k != "base"}, source)
    return cfg


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (no ``base:``), so it reloads alone."""
    from spinegrade.util.atomic import write_text

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
    return write_text(path, f"# resolved spinegrade config\n{text}")


def _packaged_text(name: str) -> str:
    return resources.files("spinegrade").joinpath("configs", f"{name}.yaml").read_text()


def _read_yaml(name_or_path: str | Path, relative_to: Path | None) -> tuple[str, dict, Path | None]:
    """Return (source label, mapping, folder for relative bases)."""
    if isinstance(name_or_path, str) and name_or_path in PACKAGED_CONFIGS:
        text, source, folder = _packaged_text(name_or_path), f"<packaged {name_or_path}>", None
    else:
        path = Path(name_or_path)
        if not path.is_absolute() and relative_to is not None:
            path = relative_to / path
        if not path.is_file():
            raise ConfigError(
                f"config {str(name_or_path)!r} is neither a packaged config "
                f"({', '.join(PACKAGED_CONFIGS)}) nor an existing YAML file (looked at {path})"
            )
        text, source, folder = path.read_text(), str(path), path.parent
    try:
        mapping = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {mapping!r}")
    return source, mapping, folder


def _resolve_chain(
    name_or_path: str | Path, seen: tuple[str, ...], relative_to: Path | None = None
) -> list[tuple[str, dict]]:
    """The base chain of a config file, outermost base first."""
    source, mapping, folder = _read_yaml(name_or_path, relative_to)
    if source in seen:
        raise ConfigError(f"config base cycle: {' -> '.join((*seen, source))}")
    base = mapping.pop("base", None)
    chain = _resolve_chain(str(base), (*seen, source), folder) if base else []
    return [*chain, (source, mapping)]


# ----------------------------------------------------------------------------- setting values


def _apply_mapping(obj: Any, mapping: dict[str, Any], source: str, prefix: str = "") -> None:
    """Recursively set the fields of a dataclass tree from a nested mapping."""
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if dotted in REMOVED_KEYS:
            _note_removed(dotted, source)
            continue
        current = getattr(obj, key, None) if _has_field(obj, key) else None
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _apply_mapping(current, value, source, prefix=f"{dotted}.")
        else:
            set_value(obj, key, value, source=source, full_key=dotted)


def _note_removed(dotted: str, source: str) -> None:
    """Warn (once per process: a run folder is read once per fold) that a removed key is ignored."""
    if dotted not in _warned:
        _warned.add(dotted)
        log.warning("%s: ignoring removed config key %r: %s", source, dotted, REMOVED_KEYS[dotted])


def _has_field(obj: Any, key: str) -> bool:
    return any(f.name == key for f in dataclasses.fields(obj))


def set_value(
    obj: Any, key: str, value: Any, source: str = "override", full_key: str | None = None
) -> None:
    """Set a dotted ``key`` below dataclass ``obj`` to ``value`` coerced to the field's type."""
    full_key = full_key or key
    *parents, leaf = key.split(".")
    target = obj
    for i, part in enumerate(parents):
        _check_key(target, part, source, ".".join(parents[: i + 1]))
        target = getattr(target, part)
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"{source}: {full_key!r}: {part!r} is a value, not a section")
    _check_key(target, leaf, source, full_key)
    if dataclasses.is_dataclass(getattr(target, leaf)):
        names = ", ".join(f.name for f in dataclasses.fields(getattr(target, leaf)))
        raise ConfigError(f"{source}: {full_key!r} is a section; set one of its keys: {names}")
    hint = typing.get_type_hints(type(target))[leaf]
    try:
        setattr(target, leaf, _coerce(value, hint))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {full_key}={value!r}: {err}") from None


def _check_key(obj: Any, key: str, source: str, dotted: str) -> None:
    names = [f.name for f in dataclasses.fields(obj)]
    if dotted in REMOVED_KEYS:
        raise ConfigError(f"{source}: config key {dotted!r} was removed: {REMOVED_KEYS[dotted]}")
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
        raise ConfigError(f"{source}: unknown config key {dotted!r}{hint}")


def _coerce(value: Any, hint: Any) -> Any:
    """Coerce a YAML-parsed value to a type hint (bool, int, float, str, list, dict, Optional)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list such as [1, 2], got {value!r}")
        return [_coerce(v, args[0]) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping such as {{a: 1}}, got {value!r}")
        return dict(value)
    return _coerce_scalar(value, hint)


def _coerce_scalar(value: Any, hint: Any) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "yes",
            "on",
            "1",
            "false",
            "no",
            "off",
            "0",
        ):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise TypeError(f"expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(f"expected an integer, got {value!r}")
        as_float = _to_float(value, "an integer")
        if not as_float.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(as_float)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(f"expected a number, got {value!r}")
        return _to_float(value, "a number")
    if hint is str:
        if isinstance(value, (dict, list)):
            raise TypeError(f"expected a string, got {value!r}")
        return str(value)
    return value


def _to_float(value: Any, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"expected {what}, got {value!r}") from None
