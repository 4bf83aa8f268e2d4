"""The image anchor: a frozen backbone copy beside the learning one (``AnchorConfig``).

What users rely on: image→image similarity is ``w * anchor cosine + (1 - w) * learned
cosine``; text lies in the learned part only, so text→image ranking is the learned
model's; training never moves the anchor; and the bundle carries it, fitted.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.bundle import EncoderBundle, bundle_init, export_bundle
from model.checkpoint import load_checkpoint
from model.config import (
    AnchorConfig,
    ImageTowerConfig,
    ImportedModelConfig,
    InvalidConfigError,
    ModelConfig,
    config_to_dict,
)
from model.convirt import ConVIRT, build_model
from model.data.manifest import read_manifest
from model.inputs.decode import decode_file
from model.towers.anchor import AnchorNotFittedError, ImageAnchor
from model.training.config import train_config_from_dict, train_config_to_dict
from model.training.trainer import train
from tests.model.trainer_support import NO_AUGMENT, tiny_config

#: Anchor weight whose square roots are round: parts of length 0.8 and 0.6.
WEIGHT = 0.64


def _tiny_image(towers: tuple[Path, Path]) -> ImageTowerConfig:
    return ImageTowerConfig(name="hf", path_or_id=str(towers[0]), input_size=64)


#: Overrides of the tiny config: 8 learned dimensions and 8 of the anchor's.
ANCHORED = (
    "model.projection.dim=8",
    f'model.anchor={{"dim": 8, "weight": {WEIGHT}, "fit_images": 40}}',
)


def _fitted_model(corpus: Path, tmp_path: Path, towers: tuple[Path, Path]) -> ConVIRT:
    torch.manual_seed(0)
    model = build_model(tiny_config(corpus, tmp_path / "run", towers, *ANCHORED).model).eval()
    assert model.image_anchor is not None
    model.image_anchor.fit(torch.randn(40, model.image_anchor.mean.shape[0]))
    return model


def test_the_anchor_projects_onto_the_principal_axes_of_its_images(
    towers: tuple[Path, Path],
) -> None:
    anchor = ImageAnchor(_tiny_image(towers), AnchorConfig(dim=3))
    width = anchor.mean.shape[0]  # the tiny ResNet's 16 features
    generator = torch.Generator().manual_seed(0)
    centre = torch.full((width,), 2.0)
    # Spread mostly along feature 5, less along feature 2, a little along feature 9.
    spread = torch.zeros(width, width)
    spread[5, 5], spread[2, 2], spread[9, 9] = 10.0, 3.0, 1.0
    features = centre + torch.randn(500, width, generator=generator) @ spread  # (500, 16)

    anchor.fit(features)

    assert anchor.is_fitted
    torch.testing.assert_close(anchor.mean, features.mean(dim=0), atol=1e-4, rtol=0)
    torch.testing.assert_close(anchor.basis @ anchor.basis.T, torch.eye(3), atol=1e-5, rtol=0)
    assert [int(axis.abs().argmax()) for axis in anchor.basis] == [5, 2, 9]
    images = torch.randn(2, 3, 64, 64, generator=generator)
    expected = (anchor.features(images) - anchor.mean) @ anchor.basis.T
    torch.testing.assert_close(anchor(images), expected)


def test_fewer_images_than_axes_still_give_an_orthonormal_basis(
    towers: tuple[Path, Path],
) -> None:
    anchor = ImageAnchor(_tiny_image(towers), AnchorConfig(dim=12))
    anchor.fit(torch.randn(3, anchor.mean.shape[0]))
    torch.testing.assert_close(anchor.basis @ anchor.basis.T, torch.eye(12), atol=1e-5, rtol=0)


def test_an_unfitted_or_oversized_anchor_is_refused(towers: tuple[Path, Path]) -> None:
    anchor = ImageAnchor(_tiny_image(towers), AnchorConfig(dim=4))
    with pytest.raises(AnchorNotFittedError):
        anchor(torch.zeros(1, 3, 64, 64))
    with pytest.raises(InvalidConfigError, match=r"anchor\.dim"):
        ImageAnchor(_tiny_image(towers), AnchorConfig(dim=17))


@pytest.mark.parametrize(
    "bad", [{"weight": 0.0}, {"weight": 1.0}, {"weight": -0.2}, {"dim": 0}, {"fit_images": 0}]
)
def test_impossible_anchor_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(InvalidConfigError, match="anchor"):
        AnchorConfig(**bad)  # type: ignore[arg-type]


def test_an_imported_model_cannot_carry_an_anchor() -> None:
    with pytest.raises(InvalidConfigError, match="imported"):
        ModelConfig(imported=ImportedModelConfig(path_or_id="x"), anchor=AnchorConfig())


def test_image_similarity_blends_both_parts_and_text_sees_the_learned_one(
    corpus: Path, tmp_path: Path, towers: tuple[Path, Path]
) -> None:
    model = _fitted_model(corpus, tmp_path, towers)
    assert model.dim == 16
    assert model.text_scale == pytest.approx(0.6)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tokens = model.tokenize(["left pleural effusion", "clear lungs", "a", "b"])
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(tokens)
        learned_image, learned_text = model(images, tokens)
        anchored = torch.nn.functional.normalize(model.image_anchor(images), dim=-1)  # type: ignore[misc]

    assert image.shape == text.shape == (4, 16)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(image[:, :8].norm(dim=-1), torch.full((4,), 0.8))
    assert torch.count_nonzero(text[:, :8]) == 0
    # Training's embeddings are the learned parts alone.
    assert learned_image.shape == learned_text.shape == (4, 8)
    torch.testing.assert_close(image[:, 8:], 0.6 * learned_image)
    torch.testing.assert_close(text[:, 8:], learned_text)
    # image→image: 0.64 x the anchor's cosine + 0.36 x the learned one.
    blended = WEIGHT * anchored @ anchored.T + (1 - WEIGHT) * learned_image @ learned_image.T
    torch.testing.assert_close(image @ image.T, blended, atol=1e-5, rtol=0)
    # text→image: the learned cosine shortened by text_scale, so its ranking is unchanged.
    torch.testing.assert_close(text @ image.T, 0.6 * learned_text @ learned_image.T)


def test_training_fits_the_anchor_once_never_moves_it_and_the_bundle_carries_it(
    corpus: Path, tmp_path: Path, towers: tuple[Path, Path]
) -> None:
    config = tiny_config(
        corpus,
        tmp_path / "run",
        towers,
        *NO_AUGMENT,
        *ANCHORED,
        "train.max_steps=2",
    )
    torch.manual_seed(0)
    initial = build_model(config.model, pretrained=True)
    assert initial.image_anchor is not None
    initial_anchor = {k: v.clone() for k, v in initial.image_anchor.tower.state_dict().items()}
    initial_tower = {k: v.clone() for k, v in initial.image_encoder.state_dict().items()}

    result = train(config)

    state = load_checkpoint(result.last_checkpoint)["model"]
    assert bool(state["image_anchor.fitted"])
    for key, value in initial_anchor.items():
        torch.testing.assert_close(state[f"image_anchor.tower.{key}"], value, rtol=0, atol=0)
    moved = [
        key
        for key, value in initial_tower.items()
        if value.is_floating_point() and not torch.equal(state[f"image_encoder.{key}"], value)
    ]
    assert moved, "the learning tower did not learn"

    bundle = EncoderBundle.load(export_bundle(result.last_checkpoint, tmp_path / "bundle"))
    assert bundle.dim == 16
    # Zero-shot divides the served space's shorter text-image similarities by a
    # temperature shortened alike: the probabilities stay those of training.
    assert bundle.temperature == pytest.approx(config.loss.temperature * math.sqrt(1 - WEIGHT))
    images = [decode_file(r.image_path).pixels for r in read_manifest(corpus)[:3]]
    vectors = bundle.encode_images(images)
    assert vectors.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors[:, :8], axis=1), 0.8, atol=1e-5)
    texts = bundle.encode_texts(["Small left pleural effusion."])
    assert not texts[:, :8].any()

    # Fine-tuning the bundle (convirt train --init-from) keeps its fitted anchor as it is.
    model_config, weights = bundle_init(tmp_path / "bundle")
    assert model_config.anchor == config.model.anchor
    data = train_config_to_dict(config)
    data["model"] = config_to_dict(model_config)  # as convirt train --init-from does
    data["train"]["out_dir"] = str(tmp_path / "tuned")
    tuned = train(train_config_from_dict(data), init_weights=weights)
    tuned_state = load_checkpoint(tuned.last_checkpoint)["model"]
    for key in ("image_anchor.mean", "image_anchor.basis"):
        torch.testing.assert_close(tuned_state[key], state[key], rtol=0, atol=0)
