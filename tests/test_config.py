"""Config loading, overrides with type coercion, base chains, errors and YAML round trips."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import pytest
import yaml

from spinegrade import config
from spinegrade.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    save_config,
)


def test_default_yaml_matches_dataclass_defaults() -> None:
    # default.yaml lists every key; it must not drift from the dataclass defaults.
    assert load_config("default").to_dict() == Config().to_dict()


def test_quick_is_a_cpu_variant_of_default() -> None:
    quick, default = load_config("quick"), load_config("default")
    assert quick.name == "quick"
    assert quick.train.accelerator == "cpu" and quick.model.pretrained is False
    # The demo and the tests (quick + tiny overrides) never ask for downloadable weights.
    from tiny_config import TINY_RUN

    for cfg in (quick, load_config("quick", TINY_RUN)):
        assert cfg.model.pretrained is False and cfg.localizer.pretrained is False
    assert default.model.pretrained and default.localizer.pretrained
    assert quick.crops.size < default.crops.size
    # Keys quick does not set are inherited from default.
    assert quick.optim == default.optim and quick.loss == default.loss
    assert quick.localizer.backbone_kwargs == {"channel_multiplier": 0.75}


@pytest.mark.parametrize(
    ("override", "path", "expected"),
    [
        ("train.epochs=3", ("train", "epochs"), 3),
        ("train.epochs=3.0", ("train", "epochs"), 3),
        ("train.lr=1e-3", ("train", "lr"), 1e-3),
        ("train.lr=2", ("train", "lr"), 2.0),
        ("train.amp=false", ("train", "amp"), False),
        ("train.amp=yes", ("train", "amp"), True),
        ("train.folds=[0, 2]", ("train", "folds"), [0, 2]),
        ("train.folds=null", ("train", "folds"), None),
        ("train.groups=[spinal]", ("train", "groups"), ["spinal"]),
        ("model.backbone=efficientnet_b1", ("model", "backbone"), "efficientnet_b1"),
        ("model.pretrained_path=/w/b0.st", ("model", "pretrained_path"), "/w/b0.st"),
        ("model.pretrained_path=none", ("model", "pretrained_path"), None),
        ("model.backbone_kwargs={a: 0.5}", ("model", "backbone_kwargs"), {"a": 0.5}),
        ("loss.class_weights=[1, 2, 4]", ("loss", "class_weights"), [1.0, 2.0, 4.0]),
        ("name=my run", ("name",), "my run"),
        ("seed=7", ("seed",), 7),
    ],
)  # fmt: skip
def test_overrides_are_coerced(override: str, path: tuple[str, ...], expected: object) -> None:
    cfg = load_config("quick", [override])
    value = cfg
    for part in path:
        value = getattr(value, part)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "did you mean 'epochs'"),
        ("trian.epochs=3", "did you mean 'train'"),
        ("train.epochs=three", "expected an integer"),
        ("train.epochs=2.5", "expected an integer"),
        ("train.amp=maybe", "expected true/false"),
        ("train.folds=3", "expected a list"),
        ("model.backbone_kwargs=[1]", "expected a mapping"),
        ("train=3", "is a section"),
        ("train.epochs.x=3", "is a value, not a section"),
        ("train.epochs", "is not key=value"),
    ],
)
def test_override_errors_are_clear(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("quick", [override])


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config("quick", ["train.folds=[1, 3]", "model.backbone_kwargs={drop_rate: 0.2}"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert "base" not in path.read_text()  # the resolved config stands alone
    assert config_from_dict(cfg.to_dict()) == cfg


def test_user_file_with_relative_base_chain(tmp_path: Path) -> None:
    (tmp_path / "mid.yaml").write_text("base: quick\ntrain:\n  epochs: 2\nmodel:\n  depth: 3\n")
    sub = tmp_path / "exp"
    sub.mkdir()
    (sub / "top.yaml").write_text("base: ../mid.yaml\nname: top\nmodel:\n  depth: 4\n")
    cfg = load_config(sub / "top.yaml", ["train.lr=0.01"])
    assert (cfg.name, cfg.train.epochs, cfg.model.depth, cfg.train.lr) == ("top", 2, 4, 0.01)
    assert cfg.crops.size == load_config("quick").crops.size  # inherited from quick


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("model:\n  depht: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'model\.depht'.*'depth'"):
        load_config(bad_key)
    with pytest.raises(ConfigError, match="neither a packaged config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="neither a packaged config"):
        load_config("qiuck")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(not_mapping)
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text("base: cycle.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(cycle)


def test_every_section_is_a_dataclass_with_typed_fields() -> None:
    cfg = Config()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            assert dataclasses.fields(value), f.name
    # Mutable defaults are not shared between instances.
    a, b = Config(), Config()
    a.train.groups.append("x")
    assert b.train.groups == ["spinal", "foraminal", "subarticular"]


def test_default_yaml_lists_every_key() -> None:
    # "Every key is listed" in default.yaml: a new field must be added there too.
    text = resources.files("spinegrade").joinpath("configs", "default.yaml").read_text()
    listed = yaml.safe_load(text)
    for section, values in Config().to_dict().items():
        if isinstance(values, dict):
            assert set(listed[section]) == set(values), section
        else:
            assert section in listed


def test_old_run_folder_with_removed_key_still_loads(tmp_path: Path, caplog, monkeypatch) -> None:
    # Run folders written before train.devices was removed hold it in config.yaml and sidecars.
    monkeypatch.setattr(config, "_warned", set())
    old = load_config("quick").to_dict()
    old["train"]["devices"] = 4
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    with caplog.at_level("WARNING", logger="spinegrade.config"):
        assert load_config(path) == load_config("quick")
        assert config_from_dict(old) == load_config("quick")
    notes = [r.getMessage() for r in caplog.records if "train.devices" in r.getMessage()]
    assert len(notes) == 1 and "torchrun" in notes[0]  # warned once, not once per fold
    # Set anew, it is an error that says how to launch several GPUs.
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node"):
        load_config("quick", ["train.devices=2"])
