"""Config dataclasses: defaults, YAML round trip, and errors that name the key path."""

from __future__ import annotations

import pytest
import yaml

from model.config import (
    AugmentConfig,
    ImageTowerConfig,
    InvalidConfigError,
    LossConfig,
    ModelConfig,
    ProjectionConfig,
    TextTowerConfig,
    config_from_dict,
    config_to_dict,
)
from model.errors import ModelError


def test_defaults_follow_the_paper_and_the_shipped_wheels() -> None:
    cfg = ModelConfig()
    assert cfg.image.name == "efficientnet_lite0"
    assert cfg.image.input_size == 224
    assert cfg.text.path_or_id is None
    assert cfg.text.pooling == "max"
    assert cfg.text.max_length == 128
    assert cfg.projection == ProjectionConfig(dim=512, kind="nonlinear", hidden_dim=None)
    assert LossConfig() == LossConfig(temperature=0.1, lambda_=0.75)
    aug = AugmentConfig()
    assert aug.crop_scale == (0.6, 1.0)
    assert aug.affine_degrees == 20.0
    assert aug.brightness == (0.6, 1.4)
    assert aug.blur_sigma == (0.1, 3.0)


def test_yaml_round_trip_restores_nested_dataclasses_and_tuples() -> None:
    cfg = ModelConfig(
        image=ImageTowerConfig(name="resnet50", pretrained=False, input_size=256),
        text=TextTowerConfig(pooling="mean", freeze_layers=0),
        projection=ProjectionConfig(kind="linear", hidden_dim=1024),
    )
    text = yaml.safe_dump(config_to_dict(cfg))
    assert config_from_dict(ModelConfig, yaml.safe_load(text)) == cfg

    aug = AugmentConfig(crop_scale=(0.5, 0.9), blur_p=1.0)
    data = yaml.safe_load(yaml.safe_dump(config_to_dict(aug)))
    assert data["crop_scale"] == [0.5, 0.9]
    restored = config_from_dict(AugmentConfig, data)
    assert restored == aug
    assert isinstance(restored.crop_scale, tuple)


def test_missing_keys_take_defaults_and_ints_are_accepted_for_floats() -> None:
    cfg = config_from_dict(ModelConfig, {"text": {"pooling": "mean"}})
    assert cfg.text.pooling == "mean"
    assert cfg.image == ImageTowerConfig()
    loss = config_from_dict(LossConfig, {"temperature": 1})
    assert loss.temperature == 1.0
    assert isinstance(loss.temperature, float)


def test_unknown_key_is_rejected_with_its_path() -> None:
    with pytest.raises(InvalidConfigError, match=r"image\.nmae") as info:
        config_from_dict(ModelConfig, {"image": {"nmae": "resnet50"}})
    assert info.value.code == "invalid_config"
    assert isinstance(info.value, ModelError)
    with pytest.raises(InvalidConfigError, match="extra"):
        config_from_dict(ModelConfig, {"extra": 1})


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"image": {"input_size": "224"}}, r"image\.input_size"),
        ({"image": {"pretrained": 1}}, r"image\.pretrained"),
        ({"projection": {"dim": 51.2}}, r"projection\.dim"),
        ({"text": "minilm"}, r"text: expected a mapping"),
        ({"image": {"path_or_id": 3}}, r"image\.path_or_id"),
    ],
)
def test_wrong_types_are_rejected_with_their_path(data: dict[str, object], path: str) -> None:
    with pytest.raises(InvalidConfigError, match=path):
        config_from_dict(ModelConfig, data)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"image": {"name": "vgg"}}, r"image\.name"),
        ({"image": {"name": "hf"}}, r"image\.path_or_id"),
        ({"text": {"pooling": "cls"}}, r"text\.pooling"),
        ({"projection": {"kind": "mlp"}}, r"projection\.kind"),
    ],
)
def test_invalid_values_are_rejected_with_their_path(data: dict[str, object], path: str) -> None:
    with pytest.raises(InvalidConfigError, match=path):
        config_from_dict(ModelConfig, data)


def test_augment_ranges_and_probabilities_are_checked() -> None:
    with pytest.raises(InvalidConfigError, match=r"crop_scale\[1\]"):
        config_from_dict(AugmentConfig, {"crop_scale": [0.6, "1"]})
    with pytest.raises(InvalidConfigError, match="crop_scale"):
        config_from_dict(AugmentConfig, {"crop_scale": [0.6, 1.0, 1.0]})
    with pytest.raises(InvalidConfigError, match="crop_scale"):
        AugmentConfig(crop_scale=(1.0, 0.6))
    with pytest.raises(InvalidConfigError, match="blur_p"):
        AugmentConfig(blur_p=1.5)
    with pytest.raises(InvalidConfigError, match="lambda_"):
        LossConfig(lambda_=-0.1)
