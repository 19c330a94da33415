"""Starting a run from another run's weights: ``localizer.init_from`` and ``model.init_from``.

The session's tiny 2-fold run (conftest.tiny_trained) is the source. A run that starts from it
with 0 epochs keeps its starting weights, so its saved nets must be the source's, fold for fold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spinegrade.config import load_config
from spinegrade.models import weights
from spinegrade.models.registry import build_localizer
from spinegrade.training import init_from
from spinegrade.training.cv import cross_validate
from spinegrade.training.init_from import InitFromError, check_init_from, start_net
from tiny_config import TINY_RUN

LOCALIZERS = ("localizer_spinal", "localizer_foraminal")
GRADERS = ("grader_spinal", "grader_foraminal", "grader_subarticular")


def _cfg(*overrides: str):
    return load_config("quick", [*TINY_RUN, *overrides])


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _record(src: Path, fold: int, net: str) -> dict:
    file = f"{net}.safetensors"
    digest = hashlib.sha256((src / f"fold_{fold}" / file).read_bytes()).hexdigest()
    return {"source": "run", "path": str(src.resolve()), "fold": fold, "file": file,
            "sha256": digest}  # fmt: skip


def _resume_checkpoint(ckpt: Path, cfg) -> dict[str, torch.Tensor]:
    """A checkpoint of fold 0's spinal localiser (one epoch done) with weights of its own."""
    from spinegrade.training.checkpoints import WeightAverage, save_checkpoint
    from spinegrade.training.optim import make_optimizer

    torch.manual_seed(12345)  # a random start of its own, neither fold's nor the source's
    net = build_localizer(cfg, n_targets=5)
    opt = make_optimizer(net, cfg.localizer.lr, cfg.optim, cfg.localizer.weight_decay)
    average = WeightAverage(net, 0.9)
    save_checkpoint(ckpt / "localizer_spinal", net, opt, {"epoch": 1, "history": []}, average)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_a_run_starts_from_the_source_runs_fold_weights(tiny_trained, tmp_path, caplog) -> None:
    data, src = tiny_trained
    cache, out = src.parent / "cache", tmp_path / "run2"
    # Both folds of the source differ (other seeds), so fold-for-fold is a real check.
    for net in (*LOCALIZERS, *GRADERS):
        a, b = (_tensors(src / f"fold_{k}" / f"{net}.safetensors") for k in (0, 1))
        assert not _same(a, b), net
    # Fold 0's spinal localiser was interrupted after its checkpoint: it must resume from it.
    cfg = _cfg("localizer.epochs=0", "train.epochs=0",
               f"localizer.init_from={src}", f"model.init_from={src}")  # fmt: skip
    resumed = _resume_checkpoint(out / "fold_0" / "checkpoints", cfg)
    with caplog.at_level(logging.WARNING, logger=init_from.__name__):
        cv = cross_validate(data, cache, out, cfg, progress=False)
    assert not [r for r in caplog.records if "optimistic" in r.getMessage()]  # same folds
    assert cv is not None
    for fold in (0, 1):
        metrics = json.loads((out / f"fold_{fold}" / "metrics.json").read_text())
        for net in (*LOCALIZERS, *GRADERS):
            file = f"fold_{fold}/{net}.safetensors"
            saved, start = _tensors(out / file), _tensors(src / file)
            if (fold, net) == (0, "localizer_spinal"):
                assert _same(saved, resumed) and not _same(saved, start)
            else:
                assert _same(saved, start), file
            # Where it started is recorded in the sidecar, metrics.json and cv.json.
            record = _record(src, fold, net)
            assert weights.read_sidecar(out / file)["init"] == record
            assert metrics["init"][net] == record
            role = "localizer" if net.startswith("localizer") else "model"
            assert record in cv["init"][role]
        assert cv["per_fold"][fold]["init"] == metrics["init"]
    assert len(cv["init"]["model"]) == 2 * len(GRADERS)  # per fold and file: nothing else
    text = weights.describe_source(_record(src, 1, "grader_spinal"))
    assert text.startswith(f"run {src.resolve()} fold 1 (grader_spinal.safetensors, sha256 ")
    # The config saved with the run names the source run by its absolute path.
    saved_cfg = load_config(out / "config.yaml")
    assert saved_cfg.localizer.init_from == saved_cfg.model.init_from == str(src.resolve())


def test_source_fold_is_the_same_fold_else_the_lowest_complete_one(tiny_trained, caplog) -> None:
    data, src = tiny_trained
    run = src.resolve()
    assert [init_from.source_fold(run, k, "model") for k in (0, 1, 2, 7, None)] == [0, 1, 0, 0, 0]
    cfg = _cfg(f"model.init_from={src}")
    with caplog.at_level(logging.WARNING, logger=init_from.__name__):
        assert check_init_from(cfg, folds=[1, 2], data_dir=data) == {"model": run}
        check_init_from(_cfg(f"model.init_from={src}", "seed=7"), folds=[1], data_dir=data)
    warnings = [r.getMessage() for r in caplog.records if r.name == init_from.__name__]
    assert len(warnings) == 2 and all("optimistic" in w for w in warnings)
    assert "this run's fold 2 starts from its fold 0," in warnings[0]
    assert "folds were made differently (seed 42 there, 7 here)" in warnings[1]
    net = start_net(cfg, "model", "foraminal", 3)
    assert _same(net.state_dict(), _tensors(src / "fold_0" / "grader_foraminal.safetensors"))
    assert weights.init_source(net) == _record(src, 0, "grader_foraminal")


LOC, GRADER = "fold_0/localizer_spinal.safetensors", "fold_0/grader_spinal.safetensors"
SHAPES = "tensors of another shape"


@pytest.mark.parametrize(
    ("override", "file", "says"),
    [
        # other shapes: named with the tensors and the config key that differs
        ("localizer.decoder_channels=16", LOC,
         [SHAPES, "lateral.0.weight", "localizer.decoder_channels 8 there, 16 here"]),
        ("localizer.backbone_kwargs={}", LOC,
         [SHAPES, "localizer.backbone_kwargs {'channel_multiplier': 0.75} there, {} here"]),
        # the same tensors, other arithmetic: not the same net either
        ("model.heads=1", GRADER, ["model.heads 2 there, 1 here"]),
        ("model.level_embedding=false", GRADER,
         ["tensors unexpected (level_embed.weight)", "model.level_embedding 5 there, 0 here"]),
    ],
)  # fmt: skip
def test_a_net_of_another_architecture_stops_training_before_it_starts(
    tiny_trained, tmp_path, override: str, file: str, says: list[str]
) -> None:
    data, src = tiny_trained
    key = override.split(".")[0]
    cfg = _cfg(override, f"{key}.init_from={src}")
    out = tmp_path / "run2"
    with pytest.raises(InitFromError) as err:
        cross_validate(data, src.parent / "cache", out, cfg, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and f"{key}.init_from: {src.resolve() / file} does not fit" in msg
    assert all(s in msg for s in says), msg
    assert f"Build it as {src.resolve() / 'config.yaml'} does" in msg
    assert not out.exists()  # nothing was written, let alone trained


def test_a_missing_or_incomplete_source_run_is_a_clear_error(tiny_trained, tmp_path) -> None:
    data, src = tiny_trained
    cache = src.parent / "cache"

    def error(run: Path, key: str = "localizer", out: Path | None = None) -> str:
        cfg = _cfg(f"{key}.init_from={run}")
        with pytest.raises(InitFromError) as err:
            cross_validate(data, cache, out or tmp_path / "out", cfg, progress=False)
        assert not (tmp_path / "out").exists()
        return str(err.value)

    missing = tmp_path / "no_such_run"
    assert f"localizer.init_from: run folder {str(missing)!r} does not exist" in error(missing)
    (tmp_path / "empty").mkdir()
    assert "is not a run folder (no config.yaml)" in error(tmp_path / "empty", "model")
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    (copy / "fold_1" / "grader_subarticular.safetensors").unlink()
    msg = error(copy, "model")
    assert f"{copy / 'fold_1' / 'grader_subarticular.safetensors'} is missing" in msg
    assert "did not train grader 'subarticular' in fold 1" in msg
    torn = copy / "fold_0" / "localizer_spinal.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])
    assert f"localizer.init_from: {torn} cannot be read (" in error(copy)
    for fold in (0, 1):
        (copy / f"fold_{fold}" / "metrics.json").unlink()
    assert "has no complete fold (fold_K/metrics.json)" in error(copy)
    assert "is the run being trained" in error(src, "model", out=src)


def test_init_from_needs_no_imagenet_weights(tiny_trained, monkeypatch) -> None:
    # pretrained=true with no hub: the run's weights replace the backbone, so nothing is fetched.
    _, src = tiny_trained

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked for weights that init_from replaces")

    monkeypatch.setattr(weights, "_from_hub", no_hub)
    on = ["model.pretrained=true", "localizer.pretrained=true"]
    cfg = _cfg(*on, f"model.init_from={src}", f"localizer.init_from={src}")
    run = {"source": "run", "path": str(src.resolve())}
    assert weights.require_pretrained(cfg) == {"model": run, "localizer": run}
    assert check_init_from(cfg) == {"model": src.resolve(), "localizer": src.resolve()}
    net = start_net(cfg, "localizer", "foraminal", 1)
    assert _same(net.state_dict(), _tensors(src / "fold_1" / "localizer_foraminal.safetensors"))
    # Without init_from the same config still asks the hub (and is refused, never random).
    with pytest.raises(AssertionError, match="the hub was asked"):
        weights.require_pretrained(_cfg(*on, f"localizer.init_from={src}"))
