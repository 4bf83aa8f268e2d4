"""A published transformers image–text model (CLIP, SigLIP, …) behind the ConVIRT surface.

:class:`ImportedDualEncoder` wraps any transformers model with ``get_image_features`` and
``get_text_features`` so that the encoder bundle, the trainer and the evaluation use it
exactly like a :class:`model.convirt.ConVIRT`: ``tokenize``, ``encode_image``,
``encode_text``, ``forward``, ``eval_transform``/``train_transform`` and
``save_tokenizer``. Its embedding size is the model's own (``dim``), not 512.

The wrapped model lives in the ``model`` attribute, so its weights are the state-dict
keys ``model.…``; with ``pretrained=False`` it is built from its ``config.json`` alone
(random weights, to load a bundle's next), which is how a bundle is loaded offline.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.config import AugmentConfig, ImportedModelConfig, ModelConfig
from model.errors import ModelError
from model.towers.image import is_local_path
from model.transforms import EvalTransform, TrainTransform

logger = logging.getLogger(__name__)


class ImportedModelError(ModelError):
    """A transformers model cannot serve as an image–text encoder."""

    code = "imported_model_invalid"


def features(output: Any) -> torch.Tensor:
    """The embedding tensor of ``get_image_features``/``get_text_features``.

    Older transformers return the (B, D) tensor itself, newer ones a model output whose
    ``pooler_output`` holds it.
    """
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise ImportedModelError(f"the model returned {type(output).__name__}, not embeddings")


class ImportedDualEncoder(nn.Module):
    """A transformers image–text model with the inference and training surface of ConVIRT.

    Args:
        config: the model config; ``config.imported`` must be set.
        pretrained: load the weights from ``imported.path_or_id`` (``None`` or ``True``)
            or build the architecture with random weights (``False``).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        pretrained: bool | None = None,
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if config.imported is None:
            raise ImportedModelError("ImportedDualEncoder needs config.imported")
        self.config = config
        self.imported: ImportedModelConfig = config.imported
        source = self.imported.path_or_id
        local = is_local_path(source)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        self.tokenizer = tokenizer
        if model is not None:
            self.model = model
        elif pretrained is False:
            hf_config = AutoConfig.from_pretrained(source, local_files_only=local)
            self.model = AutoModel.from_config(hf_config)
        else:
            self.model = AutoModel.from_pretrained(source, local_files_only=local)
        for method in ("get_image_features", "get_text_features"):
            if not callable(getattr(self.model, method, None)):
                raise ImportedModelError(
                    f"{type(self.model).__name__} from {source} has no {method}: "
                    "not an image–text model"
                )

    @classmethod
    def wrap(cls, config: ModelConfig, *, model: Any, tokenizer: Any) -> ImportedDualEncoder:
        """Wrap an already loaded transformers model and its tokenizer (no files read)."""
        return cls(config, model=model, tokenizer=tokenizer)

    @property
    def dim(self) -> int:
        """Size of the model's own embedding space."""
        return self.config.projection.dim

    @property
    def text_scale(self) -> float:
        """Text–image cosine in the served space ÷ training's: 1, there is no anchor."""
        return 1.0

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.imported.mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.imported.std

    def eval_transform(self, *, resize: int | None = None) -> EvalTransform:
        """The image processor's framing: shorter side to ``resize``, centre crop, normalise."""
        return EvalTransform(
            self.imported.input_size,
            resize=self.imported.resize if resize is None else resize,
            mean=self.image_mean,
            std=self.image_std,
        )

    def train_transform(self, augment: AugmentConfig) -> TrainTransform:
        return TrainTransform(
            augment, self.imported.input_size, mean=self.image_mean, std=self.image_std
        )

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask``, (B, T) each, padded as the model was trained."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ImportedModelError("tokenize expects a sequence of strings")
        encoded = self.tokenizer(
            list(texts),
            padding=self.imported.text_padding,
            truncation=True,
            max_length=self.imported.max_length,
            return_tensors="pt",
        )
        ids = encoded["input_ids"]  # (B, T)
        mask = encoded.get("attention_mask")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask}

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, S, S) normalised images → (B, dim), L2-normalised unless ``normalize=False``."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ImportedModelError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        out = features(self.model.get_image_features(pixel_values=x.to(self._device())))  # (B, D)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(
        self, tokens: Mapping[str, torch.Tensor], normalize: bool = True
    ) -> torch.Tensor:
        """Tokens from :meth:`tokenize`, (B, T) each → (B, dim), L2-normalised by default."""
        if "input_ids" not in tokens:
            raise ImportedModelError("tokens need 'input_ids'")
        device = self._device()
        inputs = {"input_ids": tokens["input_ids"].to(device)}
        if self.imported.text_attention_mask and "attention_mask" in tokens:
            inputs["attention_mask"] = tokens["attention_mask"].to(device)
        out = features(self.model.get_text_features(**inputs))  # (B, D)
        return F.normalize(out, dim=-1) if normalize else out

    def forward(
        self, images: torch.Tensor, tokens: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, S, S), tokens (B, T) → L2-normalised (B, dim) image and text embeddings."""
        return self.encode_image(images), self.encode_text(tokens)

    def save_tokenizer(self, out_dir: Path) -> None:
        """Write the tokenizer and the model's architecture config (no weights) to ``out_dir``.

        That directory then serves as ``imported.path_or_id`` of a ``pretrained=False``
        model, which is how a bundle is loaded without the original source.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out_dir)
        self.model.config.save_pretrained(out_dir)
