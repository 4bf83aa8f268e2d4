"""TrainConfig: shipped YAML configs, ``key.path=value`` overrides and strict key checking."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.config import InvalidConfigError
from model.training.config import (
    TrainConfig,
    dump_train_config,
    load_train_config,
    parse_data_source,
    parse_override,
    train_config_from_dict,
    train_config_to_dict,
)


def test_cpu_small_config_uses_the_offline_default_towers() -> None:
    config = load_train_config("cpu-small")
    assert config.model.image.name == "efficientnet_lite0"
    assert config.model.image.pretrained is True
    assert config.model.text.path_or_id is None  # the MiniLM wheel
    # 256 learned dimensions and 256 of the frozen backbone's anchor: 512 in all.
    assert config.model.projection.dim == 256
    assert config.model.anchor is not None
    assert config.model.anchor.dim == 256
    assert config.model.embedding_dim == 512
    assert config.optim.lr == pytest.approx(1e-4)
    assert config.optim.weight_decay == pytest.approx(1e-6)


def test_paper_config_matches_the_publication() -> None:
    config = load_train_config("paper")
    assert config.model.image.name == "resnet50"
    assert config.model.text.path_or_id == "emilyalsentzer/Bio_ClinicalBERT"
    assert config.model.text.freeze_layers == 6
    assert config.model.text.pooling == "max"
    assert config.data.batch_size == 32
    assert config.optim.lr == pytest.approx(1e-4)
    assert config.optim.weight_decay == pytest.approx(1e-6)
    assert config.loss.temperature == pytest.approx(0.1)
    assert config.loss.lambda_ == pytest.approx(0.75)
    assert config.train.early_stopping_patience > 0


def test_overrides_are_typed_yaml_scalars() -> None:
    config = load_train_config(
        "cpu-small",
        [
            "optim.lr=3e-4",
            "data.batch_size=16",
            "train.max_steps=null",
            "train.progress=false",
            "optim.schedule=plateau",
            "augment.crop_scale=[0.7, 1.0]",
            "data.source=iu-xray:/data/iu",
        ],
    )
    assert config.optim.lr == pytest.approx(3e-4)
    assert isinstance(config.optim.lr, float)
    assert config.data.batch_size == 16
    assert config.train.max_steps is None
    assert config.train.progress is False
    assert config.optim.schedule == "plateau"
    assert config.augment.crop_scale == (0.7, 1.0)
    assert config.data.source == "iu-xray:/data/iu"


def test_a_file_config_keeps_defaults_for_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  lr: 5e-5\ntrain:\n  epochs: 2\n", encoding="utf-8")
    config = load_train_config(path)
    assert config.optim.lr == pytest.approx(5e-5)
    assert config.train.epochs == 2
    assert config.data.batch_size == TrainConfig().data.batch_size


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.lrr=1e-3", "optim.lrr"),
        ("nosuch.key=1", "nosuch"),
        ("model.image.nmae=x", "model.image.nmae"),
        ("data.batch_size=sixteen", "data.batch_size"),
        ("data.batch_size=1", "data.batch_size"),
        ("optim.schedule=linear", "schedule"),
        ("train.precision=fp8", "precision"),
        ("optim=3", "optim"),
        ("optim.lr", "key.path=value"),
        ("=3", "key.path=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(InvalidConfigError) as info:
        load_train_config("cpu-small", [override])
    assert info.value.code == "invalid_config"
    assert fragment in str(info.value)


def test_unknown_key_in_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  epoch: 3\n", encoding="utf-8")
    with pytest.raises(InvalidConfigError, match=r"train\.epoch"):
        load_train_config(path)


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match="cpu-small"):
        load_train_config(tmp_path / "absent.yaml")


def test_config_round_trips_through_dict_and_yaml(tmp_path: Path) -> None:
    config = load_train_config("paper", ["optim.lr=2e-5", "train.max_steps=7"])
    assert train_config_from_dict(train_config_to_dict(config)) == config
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_train_config(config), encoding="utf-8")
    assert load_train_config(path) == config


def test_parse_override_splits_the_path() -> None:
    assert parse_override("a.b.c=1.5") == (["a", "b", "c"], 1.5)
    assert parse_override("name=x=y") == (["name"], "x=y")


def test_data_source_prefixes() -> None:
    assert parse_data_source("mimic-cxr:/data/mimic") == ("mimic-cxr", "/data/mimic")
    assert parse_data_source("iu-xray:/data/iu") == ("iu-xray", "/data/iu")
    assert parse_data_source("/data/pairs.csv") == ("manifest", "/data/pairs.csv")
    assert parse_data_source("C:/data/pairs.csv") == ("manifest", "C:/data/pairs.csv")
    with pytest.raises(InvalidConfigError):
        parse_data_source("")
    with pytest.raises(InvalidConfigError):
        parse_data_source("mimic-cxr:")
