"""The ConVIRT module: encoders, shapes, checkpoint and bundle routes, and that it learns."""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import AugmentConfig, ImageTowerConfig, ModelConfig, ProjectionConfig
from model.convirt import ConVIRT, ModelInputError, build_model
from model.loss import ConVIRTLoss
from model.towers.efficientnet_lite import LITE_MEAN, LITE_STD
from model.transforms import EvalTransform

TEXTS = ["no acute cardiopulmonary abnormality", "right lower lobe consolidation"]


@pytest.fixture(scope="module")
def model() -> ConVIRT:
    return build_model(ModelConfig()).eval()


def _kermany(shared_dir: Path) -> tuple[list[np.ndarray], list[str]]:
    """Four real radiographs (2 normal, 2 bacterial pneumonia) with matching sentences."""
    rows = (shared_dir / "data" / "kermany-16" / "labels.csv").read_text().splitlines()[1:]
    chosen = [r for r in rows if ",normal," in r][:2] + [r for r in rows if ",normal," not in r][:2]
    images, texts = [], []
    for row in chosen:
        name, label = row.split(",")[:2]
        with Image.open(shared_dir / "data" / "kermany-16" / "images" / name) as image:
            images.append(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)
        texts.append("the lungs are clear" if label == "normal" else "patchy lobar consolidation")
    return images, texts


def test_forward_returns_unit_embeddings_of_both_modalities(model: ConVIRT) -> None:
    images = torch.randn(2, 3, 96, 96)
    tokens = model.tokenize(TEXTS)
    with torch.no_grad():
        image_emb, text_emb = model(images, tokens)
        assert image_emb.shape == text_emb.shape == (2, 512)
        torch.testing.assert_close(image_emb.norm(dim=1), torch.ones(2))
        torch.testing.assert_close(text_emb.norm(dim=1), torch.ones(2))
        torch.testing.assert_close(image_emb, model.encode_image(images))
        torch.testing.assert_close(text_emb, model.encode_text(tokens))
        raw = model.encode_text(tokens, normalize=False)
        assert not torch.allclose(raw.norm(dim=1), torch.ones(2))
        torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=1), text_emb)
    assert model.dim == 512


def test_backbone_features_are_the_pooled_tower_output(model: ConVIRT) -> None:
    images = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        features = model.image_backbone_features(images)
        assert features.shape == (3, 1280)
        torch.testing.assert_close(features, model.image_encoder(images))


def test_transforms_carry_the_backbones_normalisation(model: ConVIRT) -> None:
    assert (model.image_mean, model.image_std) == (LITE_MEAN, LITE_STD)
    eval_transform = model.eval_transform()
    assert (eval_transform.size, eval_transform.mean, eval_transform.std) == (
        224,
        LITE_MEAN,
        LITE_STD,
    )
    train_transform = model.train_transform(AugmentConfig())
    assert (train_transform.size, train_transform.mean) == (224, LITE_MEAN)


def test_tokenizer_is_the_text_towers(model: ConVIRT) -> None:
    tokens = model.tokenize(TEXTS)
    assert model.tokenizer.decode(tokens["input_ids"][1], skip_special_tokens=True) == TEXTS[1]


def test_wrong_inputs_raise_typed_errors(model: ConVIRT) -> None:
    with pytest.raises(ModelInputError) as info:
        model.encode_image(torch.zeros(1, 1, 64, 64))
    assert info.value.code == "invalid_model_input"
    with pytest.raises(ModelInputError):
        model.encode_text({"input_ids": torch.zeros(1, 3, dtype=torch.long)})


def test_random_init_model_restores_a_checkpoint_exactly(model: ConVIRT) -> None:
    fresh = build_model(ModelConfig(), pretrained=False).eval()
    state = model.state_dict()
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in state.items()
    }
    images = torch.randn(2, 3, 96, 96)
    tokens = model.tokenize(TEXTS)
    with torch.no_grad():
        assert not torch.allclose(fresh.encode_image(images), model.encode_image(images))
        fresh.load_state_dict(state, strict=True)
        torch.testing.assert_close(fresh.encode_image(images), model.encode_image(images))
        torch.testing.assert_close(fresh.encode_text(tokens), model.encode_text(tokens))


def test_saved_tokenizer_dir_rebuilds_the_text_tower(model: ConVIRT, tmp_path: Path) -> None:
    out = tmp_path / "tokenizer"
    model.save_tokenizer(out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith((".safetensors", ".bin")) for name in names)
    config = replace(model.config, text=replace(model.config.text, path_or_id=str(out)))
    rebuilt = build_model(config, pretrained=False).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    tokens = rebuilt.tokenize(TEXTS)
    assert torch.equal(tokens["input_ids"], model.tokenize(TEXTS)["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_text(tokens), model.encode_text(tokens))


def test_linear_projection_and_other_backbones_plug_in(tmp_path: Path) -> None:
    from transformers import ResNetConfig, ResNetModel

    path = tmp_path / "tiny-resnet"
    ResNetModel(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    ).save_pretrained(path)
    config = ModelConfig(
        image=ImageTowerConfig(name="resnet50", path_or_id=str(path), input_size=64),
        projection=ProjectionConfig(dim=32, kind="linear"),
    )
    small = build_model(config).eval()
    assert small.image_projection.in_dim == 16
    assert small.text_projection.in_dim == 384
    with torch.no_grad():
        image_emb, text_emb = small(torch.randn(2, 3, 64, 64), small.tokenize(TEXTS))
    assert image_emb.shape == text_emb.shape == (2, 32)


def test_gradients_reach_every_trainable_parameter_and_no_frozen_one(model: ConVIRT) -> None:
    trainee = copy.deepcopy(model).train()
    image_emb, text_emb = trainee(torch.randn(4, 3, 64, 64), trainee.tokenize(TEXTS * 2))
    ConVIRTLoss()(image_emb, text_emb).backward()
    missing = [n for n, p in trainee.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # DDP fails on parameters that never receive a gradient
    frozen = [n for n, p in trainee.named_parameters() if not p.requires_grad]
    assert any("embeddings" in n for n in frozen)
    assert all(p.grad is None for p in trainee.parameters() if not p.requires_grad)


@pytest.mark.slow  # ~10 s of CPU: four forward passes and three optimizer steps on both towers
def test_a_few_steps_on_real_pairs_lower_the_loss(model: ConVIRT, shared_dir: Path) -> None:
    torch.manual_seed(0)
    images, texts = _kermany(shared_dir)
    trainee = copy.deepcopy(model)
    # A small input keeps the test quick; the towers pool globally, so any size works.
    batch = EvalTransform(64, mean=trainee.image_mean, std=trainee.image_std).stack(images)
    tokens = trainee.tokenize(texts)
    loss_fn = ConVIRTLoss()
    word_embeddings = trainee.text_encoder.encoder.embeddings.word_embeddings.weight
    frozen_before = word_embeddings.detach().clone()

    def evaluate() -> float:
        with torch.no_grad():
            return loss_fn(*trainee(batch, tokens)).item()

    # Eval mode (no dropout, fixed batch-norm statistics) makes each step descend exactly
    # the objective measured, so the check does not hinge on the heads' random init.
    trainee.eval()
    history = [evaluate()]
    optimizer = torch.optim.Adam([p for p in trainee.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(*trainee(batch, tokens)).backward()
        optimizer.step()
        history.append(evaluate())
    assert all(later < earlier for earlier, later in itertools.pairwise(history))
    assert history[-1] < 0.8 * history[0]
    assert torch.equal(word_embeddings, frozen_before)
