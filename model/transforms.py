"""Train and eval image transforms (Pillow, numpy and torch only; no torchvision).

Inputs are decoded radiographs: float32 arrays of shape (H, W) with values in [0, 1].
Outputs are float32 tensors of shape (3, S, S): the gray channel repeated three times and
normalised per channel with the backbone's mean and std (see ``ImageTowerConfig``), so a
pretrained RGB backbone sees inputs distributed like its training data.

:class:`EvalTransform` (resize the shorter side, centre crop, normalise) is the one eval
preprocessing: the trainer's validation, the encoder bundle and the service all use it, and
its :meth:`EvalTransform.to_dict` is what the bundle's JSON config stores.

:class:`TrainTransform` applies the ConVIRT augmentations in the paper's order, each with
the probability of :class:`~model.config.AugmentConfig`; all randomness comes from the
``rng`` argument, so a seeded ``random.Random`` reproduces an augmentation exactly.
Resampling is bilinear throughout (Pillow antialiases when it shrinks), and areas moved in
by the affine transform are filled with 0, the dark background of a radiograph.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.config import AugmentConfig, InvalidConfigError
from model.errors import ModelError

#: ImageNet statistics, per RGB channel, of torchvision-style pretrained backbones.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Values this far outside [0, 1] are taken for rounding error and clipped, not rejected.
_RANGE_TOLERANCE = 1e-3


class InvalidImageError(ModelError):
    """The array given to a transform is not a decoded grayscale image."""

    code = "invalid_image"


def _check_image(image: np.ndarray) -> np.ndarray:
    """Validate a decoded (H, W) image and return it as float32 within [0, 1]."""
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(f"expected a numpy array, got {type(image).__name__}")
    if image.ndim != 2 or image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidImageError(f"expected a 2-D grayscale (H, W) array, got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.floating) or np.issubdtype(image.dtype, np.integer)):
        raise InvalidImageError(f"expected a numeric array, got dtype {image.dtype}")
    array = np.asarray(image, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InvalidImageError("image contains NaN or infinite values")
    if low < -_RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
        raise InvalidImageError(f"image values span [{low:.4g}, {high:.4g}], expected [0, 1]")
    if low >= 0.0 and high <= 1.0:
        return array  # already in range: no copy of a possibly large image
    return np.clip(array, 0.0, 1.0)


def _check_stats(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) != 3:
        raise InvalidConfigError(f"{name}: expected 3 per-channel values, got {len(values)}")
    if name == "std" and any(v <= 0 for v in values):
        raise InvalidConfigError(f"std: {tuple(values)} must be positive")
    return (float(values[0]), float(values[1]), float(values[2]))


def _to_tensor(
    image: np.ndarray, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> torch.Tensor:
    """(S, S) gray in [0, 1] → (3, S, S) float32, channel c normalised by mean[c], std[c]."""
    # A copy: Pillow hands out read-only buffers, which torch refuses to wrap safely.
    gray = torch.from_numpy(np.array(image, dtype=np.float32))  # (S, S)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (gray.unsqueeze(0).expand(3, -1, -1) - mean_t) / std_t  # (3, S, S)


def _pil(image: np.ndarray) -> Image.Image:
    """A Pillow mode "F" (32-bit float) image sharing the values of an (H, W) array."""
    return Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))


def _resize_shorter_and_centre_crop(image: np.ndarray, resize: int, size: int) -> np.ndarray:
    """(H, W) → shorter side ``resize`` (aspect kept) → centre (size, size) crop.

    Only the source region under the final crop is resampled (Pillow's ``box``), straight
    to (size, size): the full resize of a 1 × N image would be ``resize`` × ``resize``·N
    floats (gigabytes for a few kilobytes of PNG), whereas this costs size² whatever the
    aspect ratio. The sampling positions and filter support are those of the full resize,
    so the result is the same crop up to float rounding.
    """
    height, width = image.shape
    if height <= width:
        new_h, new_w = resize, max(resize, round(width * resize / height))
    else:
        new_h, new_w = max(resize, round(height * resize / width)), resize
    top = (new_h - size) // 2
    left = (new_w - size) // 2
    if (new_h, new_w) == (height, width):
        return image[top : top + size, left : left + size]
    scale_x, scale_y = width / new_w, height / new_h  # source pixels per resized pixel
    box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
    resized = _pil(image).resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized, dtype=np.float32)  # (size, size)


class EvalTransform:
    """Deterministic eval preprocessing: resize shorter side, centre crop, normalise.

    Args:
        size: side S of the square output.
        resize: target of the shorter side before the crop; default ``round(S * 256 / 224)``
            (256 for 224), the usual ImageNet eval framing.
        mean, std: per-channel normalisation of the repeated gray channel.
    """

    def __init__(
        self,
        size: int = 224,
        *,
        resize: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if size < 1:
            raise InvalidConfigError(f"size: {size} is not positive")
        self.size = size
        self.resize = round(size * 256 / 224) if resize is None else resize
        if self.resize < size:
            raise InvalidConfigError(f"resize: {self.resize} is smaller than the crop {size}")
        self.mean = _check_stats("mean", mean)
        self.std = _check_stats("std", std)

    def __repr__(self) -> str:
        return (
            f"EvalTransform(size={self.size}, resize={self.resize}, "
            f"mean={self.mean}, std={self.std})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EvalTransform):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.size, self.resize, self.mean, self.std))

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """(H, W) float in [0, 1] → (3, S, S) float32 normalised."""
        cropped = _resize_shorter_and_centre_crop(_check_image(image), self.resize, self.size)
        return _to_tensor(cropped, self.mean, self.std)

    def stack(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Transform a batch of (H_i, W_i) images into one (B, 3, S, S) tensor."""
        if len(images) == 0:
            return torch.empty((0, 3, self.size, self.size), dtype=torch.float32)
        return torch.stack([self(image) for image in images])

    def to_dict(self) -> dict[str, Any]:
        """The preprocessing as plain JSON data (stored in the encoder bundle's config)."""
        return {
            "size": self.size,
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
            "channels": "repeat",
            "interpolation": "bilinear",
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalTransform:
        """Inverse of :meth:`to_dict`; unknown keys or unsupported choices are rejected."""
        expected = {"size", "resize", "mean", "std", "channels", "interpolation"}
        unknown = sorted(set(data) - expected)
        missing = sorted({"size", "mean", "std"} - set(data))
        if unknown or missing:
            raise InvalidConfigError(
                f"preprocessing: unknown keys {unknown}, missing keys {missing}"
            )
        if data.get("channels", "repeat") != "repeat":
            raise InvalidConfigError(f"preprocessing.channels: {data['channels']!r} unsupported")
        if data.get("interpolation", "bilinear") != "bilinear":
            raise InvalidConfigError(
                f"preprocessing.interpolation: {data['interpolation']!r} unsupported"
            )
        try:
            size = int(data["size"])
            resize = None if data.get("resize") is None else int(data["resize"])
            mean = [float(v) for v in data["mean"]]
            std = [float(v) for v in data["std"]]
        except (TypeError, ValueError) as exc:
            raise InvalidConfigError(f"preprocessing: {exc}") from None
        return cls(size, resize=resize, mean=mean, std=std)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (σ in pixels) of an (H, W) image, reflecting at the borders."""
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(image.astype(np.float64), radius, mode="reflect")  # (H+2r, W+2r)
    height, width = image.shape
    rows = sum(k * padded[:, i : i + width] for i, k in enumerate(kernel))  # (H+2r, W)
    out = sum(k * rows[i : i + height, :] for i, k in enumerate(kernel))  # (H, W)
    return np.asarray(out, dtype=np.float32)


def affine_transform(
    image: np.ndarray, angle: float, shift: tuple[float, float], scale: float
) -> np.ndarray:
    """Rotate by ``angle`` degrees (counter-clockwise as displayed), scale, then shift.

    The rotation and scaling are about the image centre; ``shift`` is (x, y) in pixels
    (right, down). Points moved in from outside the image are 0. Returns (H, W) float32.
    """
    height, width = image.shape
    theta = math.radians(angle)
    cx, cy = width / 2.0, height / 2.0
    # Pillow maps each output point to its source point: the inverse of
    # p_out = c + s·R(θ)(p_in − c) + t, i.e. p_in = c + R(−θ)(p_out − c − t) / s,
    # with y pointing down, so a positive θ of R turns the picture counter-clockwise.
    cos, sin = math.cos(theta) / scale, math.sin(theta) / scale
    a, b, d, e = cos, -sin, sin, cos
    ox, oy = cx + shift[0], cy + shift[1]
    c = cx - a * ox - b * oy
    f = cy - d * ox - e * oy
    moved = _pil(image).transform(
        (width, height),
        Image.Transform.AFFINE,
        (a, b, c, d, e, f),
        resample=Image.Resampling.BILINEAR,
        fillcolor=0.0,
    )
    return np.asarray(moved, dtype=np.float32)


class TrainTransform:
    """ConVIRT training augmentations followed by the eval normalisation.

    Order: random resized crop (or, when skipped, the centred square) to (S, S) →
    horizontal flip → affine (rotation, translation, scale about the centre) → brightness
    then contrast jitter → Gaussian blur → gray repeated to 3 channels → normalise.
    With every probability at 0 the output equals ``EvalTransform(S, resize=S)``.
    """

    def __init__(
        self,
        augment: AugmentConfig,
        size: int = 224,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if size < 1:
            raise InvalidConfigError(f"size: {size} is not positive")
        self.augment = augment
        self.size = size
        self.mean = _check_stats("mean", mean)
        self.std = _check_stats("std", std)

    def __repr__(self) -> str:
        return f"TrainTransform(size={self.size}, augment={self.augment})"

    def _crop_box(
        self, height: int, width: int, rng: random.Random
    ) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of a random crop of the sampled area and aspect."""
        aug = self.augment
        area = height * width
        log_low, log_high = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*aug.crop_scale)
            ratio = math.exp(rng.uniform(log_low, log_high))
            crop_w = round(math.sqrt(target * ratio))
            crop_h = round(math.sqrt(target / ratio))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                left = rng.randint(0, width - crop_w)
                top = rng.randint(0, height - crop_h)
                return (left, top, left + crop_w, top + crop_h)
        # Extreme aspect ratios: the largest centred crop whose aspect is within range.
        aspect = min(max(width / height, aug.crop_ratio[0]), aug.crop_ratio[1])
        crop_w = min(width, round(height * aspect))
        crop_h = min(height, round(crop_w / aspect))
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        return (left, top, left + crop_w, top + crop_h)

    def _random_affine(self, image: np.ndarray, rng: random.Random) -> np.ndarray:
        aug = self.augment
        height, width = image.shape
        angle = rng.uniform(-aug.affine_degrees, aug.affine_degrees)
        shift_x = rng.uniform(-aug.affine_translate, aug.affine_translate) * width
        shift_y = rng.uniform(-aug.affine_translate, aug.affine_translate) * height
        scale = rng.uniform(*aug.affine_scale)
        return affine_transform(image, angle, (shift_x, shift_y), scale)

    def __call__(self, image: np.ndarray, rng: random.Random | None = None) -> torch.Tensor:
        """(H, W) float in [0, 1] → augmented (3, S, S) float32 normalised.

        Without ``rng`` a fresh OS-seeded generator is used, so DataLoader workers that
        share a copy of this object still draw different augmentations.
        """
        rng = random.Random() if rng is None else rng
        aug = self.augment
        array = _check_image(image)
        size = self.size
        if rng.random() < aug.crop_p:
            box = self._crop_box(array.shape[0], array.shape[1], rng)
            cropped = _pil(array).resize((size, size), Image.Resampling.BILINEAR, box=box)
            out = np.asarray(cropped, dtype=np.float32)
        else:
            out = _resize_shorter_and_centre_crop(array, size, size)
        if rng.random() < aug.hflip_p:
            out = out[:, ::-1]
        if rng.random() < aug.affine_p:
            out = self._random_affine(out, rng)
        if rng.random() < aug.jitter_p:
            out = out * rng.uniform(*aug.brightness)
            mean = float(out.mean())
            out = (out - mean) * rng.uniform(*aug.contrast) + mean
            out = np.clip(out, 0.0, 1.0)
        if rng.random() < aug.blur_p:
            out = gaussian_blur(out, rng.uniform(*aug.blur_sigma))
        return _to_tensor(out, self.mean, self.std)
