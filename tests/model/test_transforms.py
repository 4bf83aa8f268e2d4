"""Train and eval transforms: shapes, normalisation, determinism, and each augmentation's effect."""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import AugmentConfig, InvalidConfigError
from model.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    InvalidImageError,
    TrainTransform,
    affine_transform,
    gaussian_blur,
)

#: Every augmentation off: the train transform must reduce to the eval framing.
NO_AUG = AugmentConfig(crop_p=0.0, hflip_p=0.0, affine_p=0.0, jitter_p=0.0, blur_p=0.0)


def _radiograph(shared_dir: Path, name: str = "NORMAL2-IM-1427-0001.png") -> np.ndarray:
    with Image.open(shared_dir / "data" / "kermany-16" / "images" / name) as image:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _pattern(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width), dtype=np.float32)


def _gray(tensor: torch.Tensor, mean: float = IMAGENET_MEAN[0], std: float = IMAGENET_STD[0]):
    """Undo the normalisation of channel 0: the (S, S) gray image in [0, 1]."""
    return (tensor[0] * std + mean).numpy()


def _high_frequency_energy(image: np.ndarray) -> float:
    return float(np.mean(np.diff(image, axis=0) ** 2) + np.mean(np.diff(image, axis=1) ** 2))


def test_eval_output_shape_dtype_and_per_channel_normalisation() -> None:
    image = np.full((300, 200), 0.25, dtype=np.float32)
    out = EvalTransform(224)(image)
    assert out.shape == (3, 224, 224)
    assert out.dtype == torch.float32
    for c in range(3):
        expected = (0.25 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[c], torch.full((224, 224), expected), rtol=0, atol=1e-5)
    half = EvalTransform(8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(np.ones((8, 8), np.float32))
    assert torch.equal(half, torch.ones(3, 8, 8))


def test_eval_default_resize_is_the_imagenet_framing() -> None:
    assert EvalTransform(224).resize == 256
    assert EvalTransform(448).resize == 512


def test_eval_crop_without_resize_is_the_centred_square() -> None:
    image = np.arange(24, dtype=np.float32).reshape(4, 6) / 23.0
    out = EvalTransform(4, resize=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(image)
    expected = torch.from_numpy(image[:, 1:5]).expand(3, 4, 4)
    torch.testing.assert_close(out, expected)


def test_eval_matches_a_hand_computed_bilinear_resize_crop_and_normalise() -> None:
    image = np.array([[0.0, 0.4, 1.0], [0.8, 0.2, 0.6]], dtype=np.float32)
    out = EvalTransform(4, resize=4, mean=(0.5, 0.4, 0.3), std=(0.5, 0.25, 0.2))(image)
    # Doubling with pixel-centre alignment: new pixels sit a quarter of the way between
    # old centres; the border pixels keep the edge value. Shorter side 2 → 4, 3 → 6.
    rows = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    cols = np.array(
        [[1, 0, 0], [0.75, 0.25, 0], [0.25, 0.75, 0], [0, 0.75, 0.25], [0, 0.25, 0.75], [0, 0, 1]]
    )
    resized = rows @ image @ cols.T  # (4, 6)
    cropped = resized[:, 1:5]  # centre 4 of 6 columns
    for c, (mean, std) in enumerate([(0.5, 0.5), (0.4, 0.25), (0.3, 0.2)]):
        expected = torch.from_numpy((cropped - mean) / std).float()
        torch.testing.assert_close(out[c], expected, rtol=0, atol=1e-5)


def test_eval_keeps_the_aspect_ratio_of_tall_images() -> None:
    # A tall image with a bright top band: the band lies outside the centred crop.
    image = np.zeros((400, 100), dtype=np.float32)
    image[:100] = 1.0
    gray = _gray(EvalTransform(32, resize=32)(image))
    assert gray.shape == (32, 32)
    assert float(gray.max()) == pytest.approx(0.0, abs=1e-5)


def test_eval_is_deterministic_picklable_and_stacks(shared_dir: Path) -> None:
    transform = EvalTransform(224)
    image = _radiograph(shared_dir)
    first = transform(image)
    assert torch.equal(first, transform(image))
    clone = pickle.loads(pickle.dumps(transform))
    assert clone == transform
    assert torch.equal(clone(image), first)
    other = _radiograph(shared_dir, "NORMAL2-IM-1430-0001.png")
    batch = transform.stack([image, other])
    assert batch.shape == (2, 3, 224, 224)
    assert torch.equal(batch[0], first)
    assert transform.stack([]).shape == (0, 3, 224, 224)


def test_preprocessing_dict_round_trips_through_json() -> None:
    transform = EvalTransform(256, resize=300, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    data = json.loads(json.dumps(transform.to_dict()))
    assert data["channels"] == "repeat"
    restored = EvalTransform.from_dict(data)
    assert restored == transform
    image = _pattern()
    assert torch.equal(restored(image), transform(image))


@pytest.mark.parametrize(
    "data",
    [
        {"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "colour": "rgb"},
        {"size": 224, "mean": [0.5] * 3},
        {"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "channels": "sum"},
        {"size": 224, "mean": [0.5] * 2, "std": [0.5] * 3},
        {"size": 224, "mean": [0.5] * 3, "std": [0.0] * 3},
        {"size": 224, "resize": 100, "mean": [0.5] * 3, "std": [0.5] * 3},
    ],
)
def test_bad_preprocessing_dicts_are_rejected(data: dict[str, object]) -> None:
    with pytest.raises(InvalidConfigError):
        EvalTransform.from_dict(data)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((4, 4, 3), dtype=np.float32),
        np.zeros((0, 4), dtype=np.float32),
        np.full((4, 4), np.nan, dtype=np.float32),
        np.full((4, 4), 255.0, dtype=np.float32),
        np.zeros((4, 4), dtype=bool),
    ],
)
def test_transforms_reject_arrays_that_are_not_decoded_gray_images(image: np.ndarray) -> None:
    with pytest.raises(InvalidImageError) as info:
        EvalTransform(4)(image)
    assert info.value.code == "invalid_image"
    with pytest.raises(InvalidImageError):
        TrainTransform(AugmentConfig(), 4)(image, random.Random(0))


def test_train_output_shape_range_and_determinism(shared_dir: Path) -> None:
    transform = TrainTransform(AugmentConfig(), 224)
    image = _radiograph(shared_dir)
    out = transform(image, random.Random(7))
    assert out.shape == (3, 224, 224)
    assert out.dtype == torch.float32
    # Every channel is the same gray image, normalised with its channel's statistics.
    grays = [out[c] * IMAGENET_STD[c] + IMAGENET_MEAN[c] for c in range(3)]
    torch.testing.assert_close(grays[1], grays[0], rtol=0, atol=1e-5)
    assert float(grays[0].min()) >= -1e-5
    assert float(grays[0].max()) <= 1 + 1e-5
    assert torch.equal(out, transform(image, random.Random(7)))
    assert not torch.equal(out, transform(image, random.Random(8)))
    # Without an rng each call draws fresh randomness.
    assert not torch.equal(transform(image), transform(image))


def test_all_probabilities_zero_is_the_eval_path() -> None:
    image = _pattern(60, 90)
    out = TrainTransform(NO_AUG, 32)(image, random.Random(0))
    assert torch.equal(out, EvalTransform(32, resize=32)(image))


def test_crop_takes_a_sub_region_within_the_area_range() -> None:
    # A horizontal ramp: the crop's column span shows up as the output's value span.
    ramp = np.tile(np.linspace(0, 1, 200, dtype=np.float32), (200, 1))
    aug = replace(NO_AUG, crop_p=1.0, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    for seed in range(5):
        gray = _gray(TrainTransform(aug, 50)(ramp, random.Random(seed)))
        span = float(gray[:, -1].mean() - gray[:, 0].mean())
        # A quarter of the area at aspect 1 is half the width: the ramp spans ~0.5.
        assert span == pytest.approx(0.5, abs=0.03)
    left_edges = {
        round(float(_gray(TrainTransform(aug, 50)(ramp, random.Random(s)))[:, 0].mean()), 2)
        for s in range(5)
    }
    assert len(left_edges) > 1  # the position is random


def test_hflip_mirrors_the_image() -> None:
    image = _pattern(40, 40)
    plain = TrainTransform(NO_AUG, 40)(image, random.Random(0))
    flipped = TrainTransform(replace(NO_AUG, hflip_p=1.0), 40)(image, random.Random(0))
    assert torch.equal(flipped, torch.flip(plain, dims=[2]))


def test_affine_transform_rotates_shifts_and_scales_about_the_centre() -> None:
    image = _pattern(16, 16)
    np.testing.assert_allclose(
        affine_transform(image, 90.0, (0, 0), 1.0), np.rot90(image), atol=1e-5
    )
    np.testing.assert_allclose(affine_transform(image, 0.0, (0, 0), 1.0), image, atol=1e-6)
    shifted = affine_transform(image, 0.0, (3, 2), 1.0)
    np.testing.assert_allclose(shifted[2:, 3:], image[:-2, :-3], atol=1e-6)
    assert not shifted[:2].any()  # filled with 0
    assert not shifted[:, :3].any()
    square = np.zeros((32, 32), dtype=np.float32)
    square[8:24, 8:24] = 1.0
    halved = affine_transform(square, 0.0, (0, 0), 0.5)
    assert float(halved.sum()) == pytest.approx(square.sum() / 4, rel=0.05)
    assert halved[16, 16] == pytest.approx(1.0)


def test_random_affine_stays_within_its_ranges() -> None:
    # A bright centred bar: rotation within ±20° keeps its orientation near horizontal.
    bar = np.zeros((64, 64), dtype=np.float32)
    bar[30:34, 8:56] = 1.0
    aug = replace(NO_AUG, affine_p=1.0, affine_translate=0.0, affine_scale=(1.0, 1.0))
    angles = []
    for seed in range(8):
        moved = _gray(TrainTransform(aug, 64)(bar, random.Random(seed)))
        ys, xs = np.nonzero(moved > 0.5)
        cov = np.cov(np.stack([xs, ys]))
        eigvals, eigvecs = np.linalg.eigh(cov)
        major = eigvecs[:, np.argmax(eigvals)]
        angles.append(np.degrees(np.arctan(major[1] / major[0])))
    assert max(abs(a) for a in angles) <= 21.0
    assert max(abs(a) for a in angles) > 3.0  # it does rotate


def test_brightness_scales_the_mean_and_contrast_scales_the_spread() -> None:
    image = 0.2 + 0.4 * _pattern(32, 32)  # within [0.2, 0.6]: no clipping below
    plain = _gray(TrainTransform(NO_AUG, 32)(image, random.Random(0)))
    bright_aug = replace(NO_AUG, jitter_p=1.0, brightness=(1.4, 1.4), contrast=(1.0, 1.0))
    bright = _gray(TrainTransform(bright_aug, 32)(image, random.Random(0)))
    assert float(bright.mean()) == pytest.approx(1.4 * float(plain.mean()), rel=1e-4)
    flat_aug = replace(NO_AUG, jitter_p=1.0, brightness=(1.0, 1.0), contrast=(0.6, 0.6))
    flat = _gray(TrainTransform(flat_aug, 32)(image, random.Random(0)))
    assert float(flat.mean()) == pytest.approx(float(plain.mean()), rel=1e-4)
    assert float(flat.std()) == pytest.approx(0.6 * float(plain.std()), rel=1e-3)


def test_blur_lowers_high_frequency_energy_and_keeps_the_mean() -> None:
    image = _pattern(64, 64)
    plain = _gray(TrainTransform(NO_AUG, 64)(image, random.Random(0)))
    aug = replace(NO_AUG, blur_p=1.0, blur_sigma=(3.0, 3.0))
    blurred = _gray(TrainTransform(aug, 64)(image, random.Random(0)))
    assert _high_frequency_energy(blurred) < 0.05 * _high_frequency_energy(plain)
    assert float(blurred.mean()) == pytest.approx(float(plain.mean()), abs=0.01)
    slight = gaussian_blur(image, 0.5)
    assert _high_frequency_energy(blurred) < _high_frequency_energy(slight)
    assert _high_frequency_energy(slight) < _high_frequency_energy(image)
    assert gaussian_blur(image, 0.0) is image


def test_blur_of_a_constant_image_is_constant() -> None:
    constant = np.full((20, 30), 0.3, dtype=np.float32)
    np.testing.assert_allclose(gaussian_blur(constant, 2.5), constant, atol=1e-6)


def _full_resize_then_crop(image: np.ndarray, resize: int, size: int) -> np.ndarray:
    """The textbook eval framing, resizing the whole image: the reference to compare with."""
    height, width = image.shape
    if height <= width:
        new_h, new_w = resize, max(resize, round(width * resize / height))
    else:
        new_h, new_w = max(resize, round(height * resize / width)), resize
    pil = Image.fromarray(image.astype(np.float32))
    resized = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BILINEAR), np.float32)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


@pytest.mark.parametrize("shape", [(480, 640), (640, 480), (301, 157), (224, 1000)])
def test_eval_framing_equals_the_full_resize_then_centre_crop(shape: tuple[int, int]) -> None:
    image = _pattern(*shape, seed=3)
    out = _gray(EvalTransform(224)(image))
    np.testing.assert_allclose(out, _full_resize_then_crop(image, 256, 224), atol=2e-5)


@pytest.mark.parametrize("shape", [(1, 20_000), (20_000, 1), (3, 40_000)])
def test_transforms_of_extreme_aspect_ratios_stay_small(shape: tuple[int, int]) -> None:
    # Resizing the whole 1 × 20000 image to a short side of 256 would take
    # 256 × 5 120 000 floats (5 GB); the bounded framing resamples the crop only.
    import tracemalloc

    image = _pattern(*shape, seed=1)
    tracemalloc.start()
    try:
        eval_out = EvalTransform(224)(image)
        train_out = TrainTransform(NO_AUG, 224)(image, random.Random(0))
        augmented = TrainTransform(AugmentConfig(), 224)(image, random.Random(0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert eval_out.shape == train_out.shape == augmented.shape == (3, 224, 224)
    assert peak < 20 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB of numpy allocations"
