"""Weights on disk and pretrained backbones.

* :func:`save_weights` / :func:`load_weights`: ``model.safetensors`` plus a ``model.json`` sidecar
  (format tag, the model's build spec, and caller metadata such as the resolved config and fold).
  Safetensors holds only tensors, so loading a file a user handed us never runs pickled code.
* :func:`create_backbone`: a timm EfficientNet feature extractor for 1-channel MRI slices. With
  ``pretrained`` it starts from ImageNet weights (a local file, or timm's usual Hugging Face hub
  download and cache) or raises :class:`PretrainedUnavailable`: never a silent random start.
  Where the weights came from is kept on the backbone (:func:`init_source`) and recorded in every
  run. The 3-channel RGB stem is adapted to ``in_chans`` as timm does (the stem filters summed
  over colour channels), which suits grey MRI.
* :func:`load_backbone_file`: a local weights file must fill every backbone tensor by timm's key
  names (only the dropped classifier head may be left over), else :class:`PretrainedUnavailable`
  says how many matched; timm alone loads ``features_only`` models non-strictly and would leave
  a file with other key names unused, silently.
* :func:`require_pretrained`: the check that training runs before it loads any data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from spinegrade.util.atomic import atomic_path, crash_point, write_json

log = logging.getLogger(__name__)

WEIGHTS_FORMAT = "spinegrade-weights/1"
HUB_CHECK_TIMEOUT_S = 3.0  # one TCP connect; an unreachable hub is not retried for a minute
RANDOM_INIT = {"source": "random"}


class WeightsError(ValueError):
    """A weights file or sidecar that is missing, malformed or does not fit the model."""


class PretrainedUnavailable(ValueError):
    """Pretrained weights were asked for and cannot be had (a ValueError: one CLI error line)."""


# ----------------------------------------------------------------------------- backbones


def create_backbone(
    name: str,
    *,
    in_chans: int = 1,
    out_indices: tuple[int, ...] = (-1,),
    pretrained: bool = False,
    pretrained_path: str | Path | None = None,
    drop_path: float = 0.0,
    config_key: str = "model",
    **kwargs: Any,
) -> nn.Module:
    """A timm ``features_only`` backbone returning the feature maps of ``out_indices``.

    With ``pretrained`` the ImageNet weights come from ``pretrained_path`` (a ``.safetensors`` or
    torch state-dict file, loaded with ``weights_only``) or from timm's hub download/cache; when
    neither works, :class:`PretrainedUnavailable` names the backbone, what was tried and the ways
    out (``config_key`` is the config section to name: ``model`` or ``localizer``). The result
    carries ``init_source`` (see :func:`init_source`).
    """
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise ValueError(
            f"unknown timm backbone {name!r}; pick an EfficientNet from "
            "timm.list_models('*efficientnet*'), e.g. 'efficientnet_b0' or 'tf_efficientnetv2_s'"
        )
    build = dict(
        in_chans=in_chans,
        features_only=True,
        out_indices=tuple(out_indices),
        drop_path_rate=drop_path,
        **kwargs,
    )
    if not pretrained:
        model = _random_backbone(name, build, config_key)
        model.init_source = dict(RANDOM_INIT)
        return model
    if pretrained_path:
        path = Path(pretrained_path)
        if not path.is_file():
            raise PretrainedUnavailable(
                f"{config_key}.pretrained_path {str(path)!r} does not exist (backbone {name!r}); "
                f"download the backbone's ImageNet weights (safetensors) there, or set "
                f"{config_key}.pretrained=false to train from random initialisation"
            )
        # Loaded here, not by timm: timm loads a features_only model non-strictly and only logs
        # what it skipped, so a file with other key names would leave the backbone random.
        model = _random_backbone(name, build, config_key)
        load_backbone_file(model, path, name=name, build=build, config_key=config_key)
        model.init_source = {"source": "file", "path": str(path.resolve()), "sha256": sha256(path)}
        return model
    return _from_hub(name, build, config_key)


def _random_backbone(name: str, build: dict[str, Any], config_key: str) -> nn.Module:
    """timm's backbone, random; backbone_kwargs it does not take give one error line."""
    try:
        return timm.create_model(name, pretrained=False, **build)
    except TypeError as err:  # e.g. channel_multiplier for a model that fixes it (the Lite ones)
        own = ("in_chans", "features_only", "out_indices", "drop_path_rate")
        extra = {k: v for k, v in build.items() if k not in own}
        raise ValueError(
            f"{config_key}.backbone {name!r} does not take {config_key}.backbone_kwargs {extra} "
            f"({err}); set {config_key}.backbone_kwargs={{}} or arguments this model accepts"
        ) from err


def load_backbone_file(
    model: nn.Module, path: Path, *, name: str, build: dict[str, Any], config_key: str = "model"
) -> None:
    """Fill every tensor of backbone ``model`` (built from ``name`` and ``build``) from ``path``.

    The file (safetensors or a torch state dict, read without unpickling code) must hold timm's
    key names for exactly this architecture. Only what legitimately differs is let through: the
    classifier head a ``features_only`` model drops (file keys absent from the model), an RGB stem
    adapted to ``in_chans`` as timm does (summed over colour for 1 channel) and BatchNorm's
    ``num_batches_tracked`` counters. Anything else raises :class:`PretrainedUnavailable` with the
    match count and some unmatched names: never a silently random backbone.
    """
    where = f"{config_key}.pretrained_path {str(path)!r}"
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as err:  # a torn, foreign or pickled-code file: say which, in one line
        raise PretrainedUnavailable(
            f"{where} is not a readable safetensors or torch state-dict file "
            f"({err.__class__.__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); "
            f"point it at ImageNet weights of backbone {name!r} or set "
            f"{config_key}.pretrained=false"
        ) from err
    _check_file_architecture(path, name, where)
    target = model.state_dict()
    state = _adapt_stem(model, dict(state), int(build.get("in_chans", 3)))
    counted = [k for k in target if not k.endswith("num_batches_tracked")]
    filled = [k for k in counted if k in state and state[k].shape == target[k].shape]
    unfilled = [k for k in counted if k not in filled]
    extra = [k for k in state if k not in target]
    head = _head_keys(name, build, target) if extra else set()
    foreign = [k for k in extra if k not in head and not k.endswith("num_batches_tracked")]
    if unfilled or foreign:
        shapes = [
            f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
            for k in unfilled
            if k in state
        ]
        raise PretrainedUnavailable(
            f"{where} does not fit backbone {name!r} (with {config_key}.backbone_kwargs): "
            f"{len(filled)} of {len(counted)} backbone tensors matched by name and shape; "
            f"not filled: {_some(unfilled)}"
            + (f"; wrong shape: {_some(shapes)}" if shapes else "")
            + (f"; in the file only: {_some(foreign)}" if foreign else "")
            + ". The file must hold timm's key names for exactly this architecture: convert "
            "other checkpoints first (EfficientNet-Lite0 in efficientnet_pytorch's names: "
            "`spinegrade weights convert-lite0 OUT.safetensors`, with "
            f"{config_key}.backbone=tf_efficientnet_lite0), or set {config_key}.pretrained=false "
            "to train from random initialisation"
        )
    result = model.load_state_dict({k: state[k] for k in target if k in state}, strict=False)
    # Only the counters may be left: a tensor left unfilled here would be a bug in the check above.
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys), result


def _some(names: list[str], n: int = 4) -> str:
    """The first ``n`` names and how many more: error lines stay one readable line."""
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _check_file_architecture(path: Path, name: str, where: str) -> None:
    """A file that names the timm architecture it was made for (our converters do) must match.

    ``tf_efficientnet_lite0`` and ``efficientnet_lite0`` share every key name and shape but not
    the arithmetic (TF "same" padding, BatchNorm eps 1e-3): names alone would not catch a mix-up.
    """
    if path.suffix != ".safetensors":
        return
    try:
        with safe_open(str(path), framework="pt") as f:
            made_for = (f.metadata() or {}).get("timm_architecture")
    except Exception:  # unreadable metadata: the tensors were read above, the name check is moot
        return
    arch = name.split(".")[0]
    if made_for and made_for != arch:
        raise PretrainedUnavailable(
            f"{where} holds weights converted for {made_for!r}, not backbone {arch!r}: same key "
            f"names, different padding and BatchNorm conventions; set the backbone to "
            f"{made_for!r} or use weights made for {arch!r}"
        )


def _adapt_stem(model: nn.Module, state: dict[str, Any], in_chans: int) -> dict[str, Any]:
    """An RGB stem in ``state`` adapted to ``in_chans`` the way timm's own pretrained loading does.

    timm's :func:`adapt_input_conv`: summed over colour for 1 channel, else repeated and rescaled.
    """
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    convs = (first,) if isinstance(first, str) else tuple(first or ())
    own = model.state_dict()
    for conv in convs:
        key = f"{conv}.weight"
        if key not in state or key not in own or state[key].shape == own[key].shape:
            continue
        weight = state[key]
        if weight.ndim == 4 and weight.shape[1] == 3 and in_chans != 3:
            state[key] = timm.models.adapt_input_conv(in_chans, weight)
    return state


def _head_keys(name: str, build: dict[str, Any], own: Mapping[str, Any]) -> set[str]:
    """Keys of the full classifier that its ``features_only`` backbone drops (head, pooling).

    Built on the meta device: the key names cost no memory and no initialisation.
    """
    full_build = {k: v for k, v in build.items() if k not in ("features_only", "out_indices")}
    with torch.device("meta"):
        full = timm.create_model(name, pretrained=False, **full_build)
    return set(full.state_dict()) - set(own)


def _from_hub(name: str, build: dict[str, Any], config_key: str) -> nn.Module:
    """timm's own pretrained download (or its cache); offline, the cache only, without retries."""
    from huggingface_hub import constants

    hub_id = _hub_id(name)
    was_offline = constants.HF_HUB_OFFLINE
    reachable = was_offline is False and hub_reachable()
    constants.HF_HUB_OFFLINE = was_offline or not reachable  # offline: the local cache only
    try:
        model = timm.create_model(name, pretrained=True, **build)
    except (OSError, RuntimeError, ValueError) as err:
        if was_offline:
            tried = f"the local hub cache only (HF_HUB_OFFLINE is set): {err.__class__.__name__}"
        elif not reachable:
            host = urlparse(constants.ENDPOINT).hostname
            tried = f"the local hub cache; {host} is not reachable from this machine"
        else:
            tried = f"the hub download ({err.__class__.__name__}: {str(err)[:160]})"
        raise PretrainedUnavailable(
            f"{config_key}.backbone {name!r}: ImageNet weights were requested "
            f"({config_key}.pretrained=true) but could not be loaded. Tried {hub_id or name!r} "
            f"from {tried} (cache: {constants.HF_HUB_CACHE}). Ways out: (1) run once with internet "
            f"access (unset HF_HUB_OFFLINE) so timm downloads and caches them; (2) download the "
            f"weights file and set {config_key}.pretrained_path=FILE; (3) set "
            f"{config_key}.pretrained=false to train from random initialisation (far less "
            "accurate on real data)."
        ) from err
    finally:
        constants.HF_HUB_OFFLINE = was_offline
    model.init_source = {"source": "hub", "id": hub_id or name}
    return model


def _hub_id(name: str) -> str | None:
    """The hub repo (``timm/NAME.TAG``) timm downloads ``name``'s pretrained weights from."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # an unknown tag: timm's own create_model will say so
        return None
    if cfg is None or not cfg.hf_hub_id:
        return None
    hub = cfg.hf_hub_id
    return hub if "." in hub.split("/")[-1] or not cfg.tag else f"{hub}.{cfg.tag}"


def hub_reachable(timeout: float = HUB_CHECK_TIMEOUT_S) -> bool:
    """One TCP connection to the hub's host (``HF_ENDPOINT``), bounded by ``timeout`` seconds.

    huggingface_hub retries an unreachable host for about a minute (BENCHMARKS.md); this check
    lets an offline machine go straight to the local cache (and a clear error).
    """
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    t0 = time.perf_counter()
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        log.info(
            "%s unreachable (%.1f s): using the local hub cache",
            url.hostname,
            time.perf_counter() - t0,
        )
        return False


def init_source(model: nn.Module) -> dict[str, Any]:
    """Where a model's backbone (``model.encoder``, or ``model`` itself) started from.

    ``{"source": "hub", "id"}``, ``{"source": "file", "path", "sha256"}``, ``{"source": "run",
    "path", "fold", "file", "sha256"}`` (the whole net started from another run's fold weights,
    ``*.init_from``) or ``{"source": "random"}``.
    """
    encoder = getattr(model, "encoder", model)
    return dict(getattr(encoder, "init_source", RANDOM_INIT))


def describe_source(src: dict[str, Any] | None) -> str:
    """One line for reports: ``hub timm/...``, ``file PATH (sha256 abc123...)``, ``run RUN_DIR
    fold K (FILE, sha256 abc123...)`` or ``random``."""
    if not src:
        return "unknown"
    if src.get("source") == "run":
        fold = f" fold {src['fold']}" if src.get("fold") is not None else ""
        file = f" ({src['file']}, sha256 {str(src.get('sha256'))[:12]})" if src.get("file") else ""
        return f"run {src.get('path')}{fold}{file}"
    if src.get("source") == "hub":
        return f"ImageNet, hub {src.get('id')}"
    if src.get("source") == "file":
        return f"ImageNet, file {src.get('path')} (sha256 {str(src.get('sha256'))[:12]})"
    return "random initialisation"


def summarize_init(per_fold: Iterable[Mapping[str, dict] | None]) -> dict[str, list[dict]]:
    """The distinct starts of each backbone (``model``: the graders', ``localizer``) over folds.

    Each item maps network names (``grader_spinal``, ``localizer_spinal``...) to their
    :func:`init_source`; a fold recorded before this existed (None) counts as ``unknown``.
    """
    out: dict[str, list[dict]] = {"model": [], "localizer": []}
    for nets in per_fold:
        for net, src in (nets or {"grader": {"source": "unknown"}}).items():
            seen = out["localizer" if net.startswith("localizer") else "model"]
            if src not in seen:
                seen.append(src)
    return out


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require_pretrained(cfg: Any) -> dict[str, dict[str, Any]]:
    """Load every pretrained backbone ``cfg`` asks for once, before any data is read.

    Returns ``{"model": source, "localizer": source}``; raises :class:`PretrainedUnavailable`
    (with the ways out) when one cannot be had. Online this also fills timm's cache, so the
    folds' models then load from it. A run that trains no grader (``train.groups: []``, e.g.
    a localiser experiment) needs no grader weights, so ``model`` is then left out. A section
    with ``init_from`` (another run folder) needs none either: that run's weights replace the
    whole net, backbone included, and ``spinegrade.training.init_from.check_init_from`` checks
    them; its source is ``{"source": "run", "path"}``.
    """
    out = {}
    for key in ("model", "localizer"):
        section = getattr(cfg, key)
        if key == "model" and not cfg.train.groups:
            continue
        if getattr(section, "init_from", None):
            out[key] = {"source": "run", "path": str(Path(section.init_from).resolve())}
            continue
        if not section.pretrained:
            if section.pretrained_path:  # a file named and then ignored: random weights, silently
                raise PretrainedUnavailable(
                    f"{key}.pretrained_path={section.pretrained_path} is set but "
                    f"{key}.pretrained is false, so the file would be ignored and the backbone "
                    f"trained from random weights; set {key}.pretrained=true to load it, or "
                    f"{key}.pretrained_path=null to train from random weights"
                )
            out[key] = dict(RANDOM_INIT)
            continue
        net = create_backbone(
            section.backbone, pretrained=section.pretrained, config_key=key,
            pretrained_path=section.pretrained_path, **dict(section.backbone_kwargs),
        )  # fmt: skip
        out[key] = init_source(net)
    return out


# ----------------------------------------------------------------------------- save / load


def weights_paths(path: str | Path) -> tuple[Path, Path]:
    """(``.safetensors`` file, ``.json`` sidecar) for a file path or a folder (``model.*``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "model.safetensors"
    return path, path.with_suffix(".json")


def save_weights(model: nn.Module, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict as safetensors plus a JSON sidecar; return the tensor file.

    The sidecar holds the format tag, the model's build spec (``model.spec`` when it has one, so
    :func:`spinegrade.models.registry.load_model` can rebuild it), where its backbone started
    (``init``, see :func:`init_source`) and ``meta`` (JSON-serialisable: resolved config, fold,
    group, metrics...). The sidecar is the commit point: it is removed before the tensor file is
    replaced and written (atomically) after it, so a pair with a sidecar is always whole
    (:func:`weights_complete`).
    """
    tensor_path, sidecar_path = weights_paths(path)
    sidecar_path.unlink(missing_ok=True)
    state = _unique_contiguous(model.state_dict())
    with atomic_path(tensor_path) as tmp:
        save_file(state, str(tmp), metadata={"format": WEIGHTS_FORMAT})
    crash_point(f"weights_write:{tensor_path.stem}")
    sidecar = {
        "format": WEIGHTS_FORMAT,
        "spec": getattr(model, "spec", None),
        "init": init_source(model),
        "meta": meta or {},
    }
    write_json(sidecar_path, sidecar, indent=2, default=_json_default)
    return tensor_path


def weights_complete(path: str | Path) -> bool:
    """Both files of a weights pair exist (the sidecar, written last, commits the pair)."""
    tensor_path, sidecar_path = weights_paths(path)
    return tensor_path.is_file() and sidecar_path.is_file()


def _unique_contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; tensors that share storage (tied weights) are stored once per name."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"meta value of type {type(obj).__name__} is not JSON-serialisable")


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a weights file (``format``, ``spec``, ``meta``)."""
    _, sidecar_path = weights_paths(path)
    if not sidecar_path.is_file():
        raise WeightsError(
            f"{sidecar_path} is missing: it is written next to the weights by training"
        )
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(
            f"{sidecar_path} is not valid JSON ({err}); re-export the weights"
        ) from err
    if sidecar.get("format") != WEIGHTS_FORMAT:
        raise WeightsError(
            f"{sidecar_path}: format {sidecar.get('format')!r}, expected {WEIGHTS_FORMAT!r}"
        )
    return sidecar


def load_weights(
    model: nn.Module, path: str | Path, *, strict: bool = True, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load safetensors weights into ``model`` (no unpickling); return the sidecar's ``meta``."""
    tensor_path, _ = weights_paths(path)
    if not tensor_path.is_file():
        raise WeightsError(
            f"{tensor_path} does not exist; train a run first or check the run folder"
        )
    sidecar = read_sidecar(tensor_path)
    state = load_file(str(tensor_path), device=str(device))
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise WeightsError(
            f"{tensor_path} does not fit this model (was it saved with another config?): {err}"
        ) from err
    if strict is False and (result.missing_keys or result.unexpected_keys):
        log.warning(
            "%s: %d missing and %d unexpected keys while loading",
            tensor_path,
            len(result.missing_keys),
            len(result.unexpected_keys),
        )
    return sidecar.get("meta", {})
