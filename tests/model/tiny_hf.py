"""Tiny, randomly initialised CLIP and SigLIP models saved like published ones (offline).

Each directory holds what ``save_pretrained`` writes for a hub model: the model's config
and weights, a tokenizer and an image processor. The tokenizer is a word-level one built
here from a small local vocabulary, so nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Words of the synthetic reports and the usual queries; everything else is [UNK].
_WORD_TEXT = (
    "no acute cardiopulmonary process normal chest the a of and with without is are "
    "there left right bilateral lung lungs base bases upper lower lobe pleural effusion "
    "effusions pneumothorax consolidation opacity opacities atelectasis edema pulmonary "
    "cardiomegaly enlarged cardiac silhouette heart size mediastinum fracture rib support "
    "device devices tube line catheter pacemaker lesion nodule mass pneumonia small large "
    "moderate mild severe blunting costophrenic angle angles clear stable new increased"
)
WORDS = tuple(_WORD_TEXT.split())
SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
TEXT_LENGTH = 16
IMAGE_SIZE = 32


def _tokenizer(padding_side: str = "right") -> object:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIALS, *WORDS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=TEXT_LENGTH,
        padding_side=padding_side,
    )


def _text_config(**extra: object) -> dict[str, object]:
    return {
        "vocab_size": len(SPECIALS) + len(WORDS),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": TEXT_LENGTH,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
        **extra,
    }


def _vision_config() -> dict[str, object]:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
    }


def save_tiny_clip(out: Path, *, projection_dim: int = 48) -> Path:
    """A tiny ``CLIPModel`` with ``projection_dim``-d embeddings, saved in ``out``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=_text_config(),
        vision_config=_vision_config(),
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(out)
    _tokenizer().save_pretrained(out)  # type: ignore[attr-defined]
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    ).save_pretrained(out)
    return out


def save_tiny_siglip(out: Path) -> Path:
    """A tiny ``SiglipModel`` (32-d embeddings: its towers' width), saved in ``out``."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(0)
    config = SiglipConfig(text_config=_text_config(), vision_config=_vision_config())
    SiglipModel(config).save_pretrained(out)
    _tokenizer().save_pretrained(out)  # type: ignore[attr-defined]
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out)
    return out
