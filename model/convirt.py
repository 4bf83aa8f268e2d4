"""The ConVIRT model: image tower + text tower, each with a projection into one space.

Contract notes (additions to the agreed surface; nothing in it changed):

- Image normalisation depends on the backbone: EfficientNet-Lite0's weights expect mean =
  std = 0.5 per channel, transformers backbones the ImageNet statistics (or those of a
  local checkpoint's ``preprocessor_config.json``). Build transforms through
  :meth:`ConVIRT.eval_transform` / :meth:`ConVIRT.train_transform` (or pass
  ``mean=model.image_mean, std=model.image_std``) rather than with the transforms'
  ImageNet defaults.
- :meth:`ConVIRT.save_tokenizer` writes the tokenizer files *and* the text encoder's
  ``config.json`` (no weights), so that directory can serve as ``text.path_or_id`` of a
  ``pretrained=False`` model, e.g. when the encoder bundle is loaded.
- :class:`model.loss.ConVIRTLoss` gathers with gradient by default; see its docstring for
  why that, not a rescaling, makes multi-rank gradients equal the global-batch ones.

Submodules: ``image_encoder`` (an :class:`~model.towers.image.ImageTower`),
``text_encoder`` (a :class:`~model.towers.text.TextTower`), ``image_projection`` and
``text_projection`` (:class:`~model.towers.heads.ProjectionHead`), and ``image_anchor``
(an :class:`~model.towers.anchor.ImageAnchor`, or None) when the config has an anchor.

With an anchor, :meth:`ConVIRT.encode_image` and :meth:`ConVIRT.encode_text` give the
served space (anchor part, then learned part; see ``AnchorConfig``), while
:meth:`ConVIRT.forward`, which training calls, gives the learned parts alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.config import AugmentConfig, ModelConfig
from model.errors import ModelError
from model.imported import ImportedDualEncoder
from model.towers.anchor import ImageAnchor
from model.towers.heads import ProjectionHead
from model.towers.image import build_image_tower
from model.towers.text import TextTower
from model.transforms import EvalTransform, TrainTransform

logger = logging.getLogger(__name__)


class ModelInputError(ModelError):
    """A batch given to the model has the wrong shape."""

    code = "invalid_model_input"


class ConVIRT(nn.Module):
    """Contrastive image–text model with a shared ``config.projection.dim`` space.

    Args:
        config: towers and projection heads.
        pretrained: ``None`` follows the config (the image tower's ``pretrained``; the text
            tower always loads its checkpoint); ``False`` builds every tower with random
            weights from its architecture alone (to load a checkpoint or bundle next);
            ``True`` loads pretrained weights for both.
    """

    def __init__(self, config: ModelConfig, *, pretrained: bool | None = None) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = build_image_tower(config.image, pretrained=pretrained)
        self.text_encoder = TextTower(
            config.text, pretrained=True if pretrained is None else pretrained
        )
        self.image_projection = ProjectionHead(
            self.image_encoder.out_dim,
            config.projection,
            orthogonal=config.projection.image_orthogonal,
        )
        self.text_projection = ProjectionHead(self.text_encoder.out_dim, config.projection)
        self.image_anchor = (
            ImageAnchor(config.image, config.anchor, pretrained=pretrained)
            if config.anchor is not None
            else None
        )

    @property
    def dim(self) -> int:
        """Size of the shared embedding space (the anchor's dimensions included)."""
        return self.config.embedding_dim

    @property
    def text_scale(self) -> float:
        """Text–image cosine in the served space ÷ the learned parts' cosine.

        1 without an anchor; ``sqrt(1 - anchor.weight)`` with one, since text is zero on
        the anchor's dimensions and the learned part of an image has that length.
        """
        anchor = self.image_anchor
        return 1.0 if anchor is None else math.sqrt(1.0 - anchor.weight)

    @property
    def tokenizer(self) -> Any:
        """The text tower's tokenizer (a transformers ``PreTrainedTokenizerBase``)."""
        return self.text_encoder.tokenizer

    @property
    def image_mean(self) -> tuple[float, float, float]:
        """Per-channel mean the image backbone's weights expect."""
        return self.image_encoder.mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        """Per-channel standard deviation the image backbone's weights expect."""
        return self.image_encoder.std

    def eval_transform(self, *, resize: int | None = None) -> EvalTransform:
        """The eval preprocessing for this model's input size and normalisation."""
        return EvalTransform(
            self.config.image.input_size, resize=resize, mean=self.image_mean, std=self.image_std
        )

    def train_transform(self, augment: AugmentConfig) -> TrainTransform:
        """The training augmentations for this model's input size and normalisation."""
        return TrainTransform(
            augment, self.config.image.input_size, mean=self.image_mean, std=self.image_std
        )

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask``, (B, T) each, padded to the longest text."""
        return self.text_encoder.tokenize(texts)

    def image_backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised → (B, F) pooled backbone features, before the head."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ModelInputError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        return self.image_encoder(x.to(self._device()))  # (B, F)

    def _project_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, projection.dim) learned projection, not normalised."""
        return self.image_projection(self.image_backbone_features(x))  # (B, P)

    def _project_text(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Tokens, (B, T) each → (B, projection.dim) learned projection, not normalised."""
        if "input_ids" not in tokens or "attention_mask" not in tokens:
            raise ModelInputError("tokens need 'input_ids' and 'attention_mask'")
        device = self._device()
        on_device = {k: tokens[k].to(device) for k in ("input_ids", "attention_mask")}
        return self.text_projection(self.text_encoder(on_device))  # (B, P)

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) normalised images → (B, dim), L2-normalised unless ``normalize=False``.

        With an anchor the result is always unit length: its two parts are weighted as
        unit vectors (``AnchorConfig``), so there is no raw projection to return.
        """
        projected = self._project_image(x)  # (B, P)
        if self.image_anchor is None:
            return F.normalize(projected, dim=-1) if normalize else projected
        weight = self.image_anchor.weight
        anchored = self.image_anchor(x.to(self._device()))  # (B, A)
        return torch.cat(
            [
                math.sqrt(weight) * F.normalize(anchored, dim=-1),
                math.sqrt(1.0 - weight) * F.normalize(projected.float(), dim=-1),
            ],
            dim=-1,
        )  # (B, A + P)

    def encode_text(
        self, tokens: Mapping[str, torch.Tensor], normalize: bool = True
    ) -> torch.Tensor:
        """Tokens from :meth:`tokenize`, (B, T) each → (B, dim), L2-normalised by default.

        With an anchor the text lies in the learned part only (zeros first) and is unit
        length whatever ``normalize`` says.
        """
        projected = self._project_text(tokens)  # (B, P)
        if self.image_anchor is None:
            return F.normalize(projected, dim=-1) if normalize else projected
        zeros = projected.new_zeros(projected.shape[0], self.image_anchor.dim)  # (B, A)
        return torch.cat([zeros, F.normalize(projected, dim=-1)], dim=-1)  # (B, A + P)

    def forward(
        self, images: torch.Tensor, tokens: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W), tokens (B, T) → L2-normalised (B, P) image and text embeddings.

        These are the learned parts, which the contrastive loss trains; without an anchor
        they are the whole embeddings.
        """
        image = F.normalize(self._project_image(images), dim=-1)  # (B, P)
        return image, F.normalize(self._project_text(tokens), dim=-1)

    def save_tokenizer(self, out_dir: Path) -> None:
        """Write the tokenizer files and the text encoder's config (no weights) to ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.text_encoder.tokenizer.save_pretrained(out_dir)
        self.text_encoder.encoder.config.save_pretrained(out_dir)


def build_model(config: ModelConfig, *, pretrained: bool | None = None) -> ConVIRT:
    """A :class:`ConVIRT` for ``config`` (see the class for ``pretrained``)."""
    model = ConVIRT(config, pretrained=pretrained)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "built ConVIRT (%s image tower, %s text tower): %d parameters, %d trainable",
        config.image.name,
        config.text.path_or_id or "MiniLM-L6",
        total,
        trainable,
    )
    return model


#: What :func:`build_encoder` returns: a ConVIRT model or an imported one with its surface.
EncoderModel = ConVIRT | ImportedDualEncoder


def build_encoder(config: ModelConfig, *, pretrained: bool | None = None) -> EncoderModel:
    """The model ``config`` describes: an imported image–text model or a ConVIRT one."""
    if config.imported is not None:
        model = ImportedDualEncoder(config, pretrained=pretrained)
        logger.info(
            "built imported %s model from %s: %d-d embeddings",
            config.imported.model_type or "image-text",
            config.imported.path_or_id,
            model.dim,
        )
        return model
    return build_model(config, pretrained=pretrained)
