"""Models: shape tables, learnability, weights round trip, pretrained loading or a clear error."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from spinegrade.config import load_config
from spinegrade.models import (
    LevelLocalizer,
    SpineGrader,
    build_grader,
    build_localizer,
    load_model,
    weights,
)
from spinegrade.models.weights import (
    PretrainedUnavailable,
    WeightsError,
    create_backbone,
    load_weights,
    read_sidecar,
    save_weights,
)
from spinegrade.training.losses import grading_loss, localizer_loss

TINY = "test_efficientnet"  # a real (tiny) timm EfficientNet: MBConv + SE, five stages


def tiny_grader(**kw: object) -> SpineGrader:
    args = dict(in_slices=3, token_grid=2, dim=32, depth=1, heads=2, dropout=0.0, drop_path=0.0)
    args.update(kw)
    return SpineGrader(TINY, **args)  # type: ignore[arg-type]


def tiny_localizer(**kw: object) -> LevelLocalizer:
    args = dict(decoder_channels=16, slice_layers=1, slice_heads=2, dropout=0.0, drop_path=0.0)
    args.update(kw)
    return LevelLocalizer(TINY, backbone_kwargs={"channel_multiplier": 0.5}, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("in_shape", "kwargs", "out_shape"),
    [
        ((2, 3, 32, 32), {}, (2, 1, 3)),
        ((4, 3, 64, 64), {"n_targets": 5}, (4, 5, 3)),
        ((1, 5, 64, 48), {"in_slices": 5, "token_grid": 3}, (1, 1, 3)),
        ((2, 3, 64, 64), {"feature_index": -2, "n_levels": 0}, (2, 1, 3)),
        ((3, 7, 32, 32), {"in_slices": 7, "depth": 2, "n_targets": 2}, (3, 2, 3)),
    ],
)
def test_grader_shape_table(in_shape: tuple, kwargs: dict, out_shape: tuple) -> None:
    model = tiny_grader(**kwargs).eval()
    level = torch.arange(in_shape[0]) % 5
    with torch.no_grad():
        out = model(torch.rand(in_shape), level)
    assert out.shape == out_shape and torch.isfinite(out).all()


def test_grader_rejects_wrong_slice_count_and_level_shape() -> None:
    model = tiny_grader()
    with pytest.raises(ValueError, match=r"crops.slices must match"):
        model(torch.rand(2, 4, 32, 32))
    with pytest.raises(ValueError, match="level must have shape"):
        model(torch.rand(2, 3, 32, 32), torch.zeros(3, dtype=torch.long))


def test_grader_level_embedding_changes_the_output() -> None:
    model = tiny_grader().eval()
    x = torch.rand(1, 3, 32, 32).expand(5, -1, -1, -1)
    with torch.no_grad():
        out = model(x, torch.arange(5))
    assert not torch.allclose(out[0], out[4])  # same crop, different disc level


@pytest.mark.parametrize(
    ("in_shape", "n_targets", "context", "heat_shape"),
    [
        ((2, 7, 64, 64), 5, 1, (2, 5, 7, 16, 16)),
        ((1, 3, 64, 96), 10, 0, (1, 10, 3, 16, 24)),
        ((2, 4, 32, 32), 1, 2, (2, 1, 4, 8, 8)),
    ],
)
def test_localizer_shape_table(
    in_shape: tuple, n_targets: int, context: int, heat_shape: tuple
) -> None:
    model = tiny_localizer(n_targets=n_targets, context=context).eval()
    with torch.no_grad():
        out = model(torch.rand(in_shape))
    b, s, h, w = in_shape
    assert out["heatmaps"].shape == heat_shape
    assert out["slice_logits"].shape == (b, n_targets, s)
    assert out["xy"].shape == (b, n_targets, 2) and out["z"].shape == (b, n_targets)
    assert out["image_hw"] == (h, w)
    # Expectations lie inside the image and the stack.
    assert (out["xy"][..., 0] >= -0.5).all() and (out["xy"][..., 0] <= w - 0.5).all()
    assert (out["xy"][..., 1] >= -0.5).all() and (out["xy"][..., 1] <= h - 0.5).all()
    assert (out["z"] >= 0).all() and (out["z"] <= s - 1).all()


def test_localizer_padded_slices_get_no_probability() -> None:
    model = tiny_localizer(n_targets=5).eval()
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False  # second stack has 5 real slices, padded to 8 at the end
    with torch.no_grad():
        out = model(torch.rand(2, 8, 32, 32), mask)
    probs = out["slice_logits"].softmax(-1)
    assert probs[1, :, 5:].max() < 1e-6
    assert (out["z"][1] <= 4 + 1e-4).all()


def test_localizer_readout_maps_cells_to_pixel_centres() -> None:
    model = tiny_localizer(n_targets=1)
    logits = torch.full((1, 1, 3, 16, 16), -20.0)
    logits[0, 0, 2, 10, 5] = 20.0  # slice 2, row 10, column 5 of a stride-4 heatmap
    out = model._read_out(logits, (64, 64))
    # Cell j covers input pixels 4j..4j+3, centre 4j + 1.5.
    assert out["xy"][0, 0].tolist() == pytest.approx([21.5, 41.5], abs=1e-3)
    assert out["z"][0, 0].item() == pytest.approx(2.0, abs=1e-3)


def _learnable_crops(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops whose central square brightens with the class: a pattern a grader must pick up."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    x = 0.1 * torch.rand(n, 3, 32, 32, generator=gen)
    for i, c in enumerate(labels.tolist()):
        x[i, :, 10:22, 10:22] += 0.4 * c
    return x, labels[:, None]


def test_a_few_grader_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    model = tiny_grader()
    x, y = _learnable_crops()
    level = torch.arange(len(x)) % 5
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = grading_loss(model(x, level), y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_a_few_localizer_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    model = tiny_localizer(n_targets=1)
    gen = torch.Generator().manual_seed(1)
    b, s, n = 4, 5, 32
    x = 0.05 * torch.rand(b, s, n, n, generator=gen)
    z = torch.randint(1, s - 1, (b, 1), generator=gen)
    xy = torch.randint(6, n - 6, (b, 1, 2), generator=gen).float()
    for i in range(b):  # a bright blob marks the "disc" at (z, y, x)
        cx, cy = int(xy[i, 0, 0]), int(xy[i, 0, 1])
        x[i, int(z[i, 0]), cy - 2 : cy + 3, cx - 2 : cx + 3] = 1.0
    valid = torch.ones(b, 1, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = localizer_loss(model(x), xy, z, valid, sigma=1.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("kind", ["grader", "localizer"])
def test_save_load_round_trip_gives_equal_outputs(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    model = tiny_grader() if kind == "grader" else tiny_localizer(n_targets=2)
    x = torch.rand(2, 3, 32, 32)
    model.train()(x)  # move BatchNorm running stats away from their init
    model = model.to(memory_format=torch.channels_last).eval()
    meta = {"fold": 2, "group": "spinal", "config": load_config("quick").to_dict()}
    path = save_weights(model, tmp_path / "fold2", meta)
    assert path == tmp_path / "fold2" / "model.safetensors"
    assert read_sidecar(path)["meta"]["fold"] == 2
    # Rebuilt from the sidecar alone (no config module, no hub).
    loaded, loaded_meta = load_model(tmp_path / "fold2")
    assert loaded_meta == meta and type(loaded) is type(model)
    loaded = loaded.to(memory_format=torch.channels_last)  # same kernels -> bit-equal outputs
    with torch.no_grad():
        ref = model(x)
        got = loaded(x)
    if kind == "grader":
        assert torch.equal(ref, got)
    else:
        assert torch.equal(ref["heatmaps"], got["heatmaps"])
    # load_weights into a freshly built model as well.
    fresh = tiny_grader() if kind == "grader" else tiny_localizer(n_targets=2)
    assert load_weights(fresh, path)["group"] == "spinal"


def test_load_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(tiny_grader(), tmp_path / "nope")
    save_weights(tiny_grader(), tmp_path / "a.safetensors", {})
    with pytest.raises(WeightsError, match=r"a\.safetensors does not fit this model"):
        load_weights(tiny_grader(dim=64), tmp_path / "a.safetensors")
    (tmp_path / "a.json").write_text('{"format": "other"}')
    with pytest.raises(WeightsError, match="format"):
        load_weights(tiny_grader(), tmp_path / "a.safetensors")


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_load_weights_refuses_a_file_with_a_tensor_missing_or_extra(
    tmp_path: Path, change: str
) -> None:
    """Same shapes, one tensor fewer or one more: a file that does not fill the model exactly
    (a model of another version, a hand-edited file) is refused, never half-loaded."""
    from safetensors.torch import load_file, save_file

    path = save_weights(tiny_grader(), tmp_path / "w.safetensors", {})
    state = load_file(str(path))
    if change == "missing":
        state.pop(sorted(state)[0])
    else:
        state["extra.weight"] = torch.zeros(3)
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"w\.safetensors does not fit this model"):
        load_weights(tiny_grader(), path)


def test_build_from_config_matches_config() -> None:
    cfg = load_config("quick", ["model.depth=1", "crops.slices=3", "crops.size=32"])
    grader = build_grader(cfg, n_targets=5)
    assert len(grader.blocks) == 1 and grader.in_slices == 3
    assert grader(torch.rand(2, 3, 32, 32), torch.tensor([0, 4])).shape == (2, 5, 3)
    loc = build_localizer(cfg, n_targets=10)
    assert loc.spec["kwargs"]["backbone_kwargs"] == cfg.localizer.backbone_kwargs
    assert loc(torch.rand(1, 4, 32, 32))["heatmaps"].shape == (1, 10, 4, 8, 8)


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Hub and torch caches under ``tmp_path``, empty: weights cached on this machine must not
    change what a test sees. huggingface_hub reads its paths at import, so its constants too."""
    from huggingface_hub import constants

    hf = tmp_path / "hf"
    for var, value in (("HF_HOME", hf), ("HF_HUB_CACHE", hf / "hub"),
                       ("TORCH_HOME", tmp_path / "torch")):  # fmt: skip
        monkeypatch.setenv(var, str(value))
    monkeypatch.setattr(constants, "HF_HOME", str(hf))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf / "hub"))
    return hf / "hub"


@pytest.mark.parametrize("offline", [True, False])
def test_pretrained_requested_and_unavailable_is_a_clear_error_within_seconds(
    empty_caches: Path, monkeypatch: pytest.MonkeyPatch, offline: bool
) -> None:
    from huggingface_hub import constants

    # Offline by HF_HUB_OFFLINE, or "online" with a hub that refuses connections: both must fail
    # fast (no retries) with the ways out, never fall back to random weights.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    cfg = load_config("quick", ["model.pretrained=true", "localizer.pretrained=true"])
    cache = {"cache_dir": str(empty_caches)}  # timm's own cache argument, the same empty cache
    for build, key in ((build_grader, "model"), (build_localizer, "localizer")):
        getattr(cfg, key).backbone_kwargs = cache
        t0 = time.perf_counter()
        with pytest.raises(PretrainedUnavailable) as err:
            build(cfg)
        assert time.perf_counter() - t0 < 10
        msg = str(err.value)
        assert f"{key}.backbone 'test_efficientnet'" in msg and "timm/test_efficientnet" in msg
        assert "internet" in msg and f"{key}.pretrained_path=FILE" in msg
        assert f"{key}.pretrained=false" in msg
        assert ("HF_HUB_OFFLINE is set" in msg) == offline
    assert constants.HF_HUB_OFFLINE is offline  # restored after the attempt


def _imagenet_style_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 3-channel classifier checkpoint, as timm publishes them, saved as safetensors."""
    source = timm.create_model(TINY, pretrained=False, num_classes=1000)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    file = tmp_path / "tiny_in1k.safetensors"
    save_file(state, str(file))
    return file, state


def test_pretrained_path_loads_local_imagenet_style_weights(tmp_path: Path) -> None:
    file, source = _imagenet_style_file(tmp_path)
    key = "blocks.3.0.conv_pw.weight"
    torch.manual_seed(1)
    before = create_backbone(TINY, in_chans=1).state_dict()[key].clone()
    torch.manual_seed(1)  # the same random start: only the file can change the tensor
    backbone = create_backbone(TINY, in_chans=1, pretrained=True, pretrained_path=file)
    state = backbone.state_dict()
    assert not torch.equal(before, source[key]) and torch.equal(state[key], source[key])
    # timm folds the RGB stem into one grey channel by summing the colour filters.
    assert torch.allclose(
        state["conv_stem.weight"], source["conv_stem.weight"].sum(1, keepdim=True)
    )
    shared = [k for k in state if k in source and k != "conv_stem.weight"]
    assert len(shared) > 20
    assert all(torch.equal(state[k], source[k]) for k in shared)
    with pytest.raises(PretrainedUnavailable, match="does not exist"):
        create_backbone(TINY, pretrained=True, pretrained_path=tmp_path / "missing.safetensors")


@pytest.mark.parametrize("key", ["model", "localizer"])
def test_a_weights_file_with_pretrained_off_is_refused_not_ignored(tmp_path: Path, key) -> None:
    # quick says pretrained: false; naming a file there used to train from random weights, exit 0.
    file, _ = _imagenet_style_file(tmp_path)
    cfg = load_config("quick", [f"{key}.pretrained_path={file}"])
    with pytest.raises(PretrainedUnavailable, match=rf"set {key}.pretrained=true to load it"):
        weights.require_pretrained(cfg)
    cfg = load_config("quick", [f"{key}.pretrained_path={file}", f"{key}.pretrained=true"])
    cfg.localizer.backbone_kwargs = {}
    assert weights.require_pretrained(cfg)[key]["source"] == "file"


def test_both_backbones_load_pretrained_path_and_record_it(tmp_path: Path) -> None:
    file, source = _imagenet_style_file(tmp_path)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    keys = [f"{k}.pretrained_path={file}" for k in ("model", "localizer")]
    cfg = load_config("quick", [*keys, "model.pretrained=true", "localizer.pretrained=true"])
    cfg.localizer.backbone_kwargs = {}  # the file's architecture (quick narrows the localiser)
    expected = {"source": "file", "path": str(file.resolve()), "sha256": digest}
    assert weights.require_pretrained(cfg) == {"model": expected, "localizer": expected}
    for model in (build_grader(cfg), build_localizer(cfg)):
        state = model.encoder.state_dict()
        shared = [k for k in state if k in source and not k.startswith("conv_stem")]
        assert len(shared) > 20 and all(torch.equal(state[k], source[k]) for k in shared)
        assert weights.init_source(model) == expected
        # The sidecar records it, and a reloaded model reports it.
        path = save_weights(model, tmp_path / f"{type(model).__name__}.safetensors")
        assert read_sidecar(path)["init"] == expected
        assert weights.init_source(load_model(path)[0]) == expected
    assert weights.init_source(build_grader(load_config("quick"))) == {"source": "random"}


def _renamed(state: dict[str, torch.Tensor], rename) -> dict[str, torch.Tensor]:
    return {rename(k): v for k, v in state.items()}


@pytest.mark.parametrize(
    ("key", "build"), [("model", build_grader), ("localizer", build_localizer)]
)
@pytest.mark.parametrize(
    ("rename", "matched", "names"),
    [
        # efficientnet_pytorch-style names: nothing matches (timm would load none of it, silently)
        (lambda k: "_" + k, "0 of", ["not filled: conv_stem.weight", "in the file only: _blocks."]),
        # a wrapper's prefix, as a training checkpoint of some other code may carry
        (lambda k: "backbone." + k, "0 of", ["in the file only: backbone.blocks.0.0.bn1.bias"]),
        # all but one stage: nearly every tensor is not enough
        (lambda k: k.replace("blocks.4.", "stage4."), "of", ["not filled: blocks.4.0"]),
    ],
)
def test_pretrained_path_with_foreign_key_names_is_a_clear_error(
    tmp_path: Path, key: str, build, rename, matched: str, names: list[str]
) -> None:
    _, source = _imagenet_style_file(tmp_path)
    file = tmp_path / "renamed.safetensors"
    save_file(_renamed(source, rename), str(file))
    cfg = load_config("quick", [f"{key}.pretrained=true", f"{key}.pretrained_path={file}"])
    cfg.localizer.backbone_kwargs = {}  # the file's architecture (quick narrows the localiser)
    n = sum(
        not k.endswith("num_batches_tracked")
        for k in build(load_config("quick")).encoder.state_dict()
    )
    with pytest.raises(PretrainedUnavailable) as err:
        build(cfg)
    msg = str(err.value)
    assert "\n" not in msg and f"{key}.pretrained_path {str(file)!r} does not fit" in msg
    assert f"{matched} " in msg and "backbone tensors matched by name and shape" in msg
    found = int(msg.split(" of ")[0].rsplit(" ", 1)[-1])
    assert 0 < found < n if matched == "of" else found == 0
    assert all(name in msg for name in names), msg
    assert "convert-lite0" in msg and f"{key}.pretrained=false" in msg
    with pytest.raises(PretrainedUnavailable, match="matched by name and shape"):
        weights.require_pretrained(cfg)  # train's check before any data is read


def test_pretrained_path_of_another_width_or_architecture_is_a_clear_error(tmp_path: Path) -> None:
    narrow = timm.create_model(TINY, channel_multiplier=0.5, num_classes=1000)
    file = tmp_path / "narrow.safetensors"
    save_file({k: v.contiguous() for k, v in narrow.state_dict().items()}, str(file))
    with pytest.raises(
        PretrainedUnavailable, match=r"wrong shape: conv_stem\.weight \(16, 1, 3, 3\)"
    ):
        create_backbone(TINY, pretrained=True, pretrained_path=file)
    # A converted file names the architecture it was made for: same key names are not enough.
    _, source = _imagenet_style_file(tmp_path)
    tagged = tmp_path / "tagged.safetensors"
    save_file(source, str(tagged), metadata={"timm_architecture": "efficientnet_b0"})
    with pytest.raises(PretrainedUnavailable, match="converted for 'efficientnet_b0'"):
        create_backbone(TINY, pretrained=True, pretrained_path=tagged)
    garbage = tmp_path / "torn.safetensors"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(PretrainedUnavailable, match="not a readable safetensors"):
        create_backbone(TINY, pretrained=True, pretrained_path=garbage)


def test_a_localiser_only_run_needs_no_grader_weights(empty_caches: Path, monkeypatch) -> None:
    # `default` asks for both backbones' ImageNet weights; offline, with an empty cache, they
    # cannot be had. A run that trains the localiser alone (train.groups=[]) with a random
    # localiser must not stop on the grader's weights, which it never builds; with a grader group
    # it still must.
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import, like the paths
    cfg = load_config("default", ["train.groups=[]", "localizer.pretrained=false"])
    assert weights.require_pretrained(cfg) == {"localizer": {"source": "random"}}
    with pytest.raises(PretrainedUnavailable, match=r"model\.pretrained"):
        weights.require_pretrained(load_config("default", ["localizer.pretrained=false"]))


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown timm backbone"):
        create_backbone("efficientnet_b99")
