"""``import_model``: an encoder bundle from a published transformers image–text model.

Any model that transformers' ``AutoModel`` loads with ``get_image_features`` and
``get_text_features`` qualifies: ``CLIPModel``, ``SiglipModel`` and their relatives (a
radiology CLIP such as PubMedCLIP among them). The bundle has the same files and model-id
rule as a trained one; its ``dim`` is the model's own embedding size, found by encoding a
probe image and a probe text, and its preprocessing comes from the model's image
processor (``preprocessor_config.json``):

- ``crop_size`` (or a square ``size``) is the input side; ``size.shortest_edge`` the
  side the shorter edge is resized to before the centre crop. A processor that resizes
  to a fixed height and width (SigLIP) is framed as shorter side to that size, then a
  centre crop: the same for square images, a small crop instead of a stretch otherwise.
- ``image_mean``/``image_std`` normalise the gray channel repeated three times.

Text is padded as the model family was trained: SigLIP to its fixed length, without an
attention mask; the others to the longest text, with one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import torch

from model.bundle import BundleError, provenance_doc, write_bundle
from model.config import ImportedModelConfig, ModelConfig, ProjectionConfig
from model.towers.image import is_local_path

logger = logging.getLogger(__name__)

#: Model families whose text was padded to a fixed length and read without a mask.
FIXED_LENGTH_TEXT: Final = ("siglip", "siglip2")


class ImportSourceError(BundleError):
    """The model to import cannot be read: unreachable hub id, missing files, wrong kind."""

    code = "import_source_unavailable"


def _offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _unreachable(source: str, exc: Exception) -> ImportSourceError:
    reason = (
        "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set"
        if _offline()
        else "no network was available to reach the model hub, or it has no such model"
    )
    return ImportSourceError(
        f"cannot import {source!r}: it is not a local directory and {reason} ({exc}). "
        "Download the model where there is network (save_pretrained or the hub's "
        "snapshot) and import that directory."
    )


def _load_parts(source: str) -> tuple[Any, Any, Any]:
    """The transformers model, tokenizer and image processor of ``source``."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    local = is_local_path(source)
    if not local and Path(source).expanduser().exists():
        raise ImportSourceError(f"cannot import {source!r}: it is a file, not a model directory")
    try:
        model = AutoModel.from_pretrained(source, local_files_only=local or _offline())
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local or _offline())
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=local or _offline())
    except (OSError, ValueError, KeyError) as exc:
        if local:
            raise ImportSourceError(
                f"cannot import {source!r}: not a transformers image–text model directory "
                f"with its tokenizer and image processor ({exc})"
            ) from None
        raise _unreachable(source, exc) from None
    for method in ("get_image_features", "get_text_features"):
        if not callable(getattr(model, method, None)):
            raise ImportSourceError(
                f"cannot import {source!r}: {type(model).__name__} has no {method}, "
                "so it is not an image–text model"
            )
    return model, tokenizer, processor


def _framing(processor: Any) -> tuple[int, int]:
    """(input side, shorter-side resize) of an image processor."""
    size: Mapping[str, int] = dict(getattr(processor, "size", None) or {})
    crop: Mapping[str, int] = dict(getattr(processor, "crop_size", None) or {})
    do_crop = bool(getattr(processor, "do_center_crop", False)) and crop
    if "shortest_edge" in size:
        resize = int(size["shortest_edge"])
        side = min(int(crop["height"]), int(crop["width"])) if do_crop else resize
    elif "height" in size and "width" in size:
        resize = min(int(size["height"]), int(size["width"]))
        side = min(int(crop["height"]), int(crop["width"]), resize) if do_crop else resize
    else:
        raise ImportSourceError(f"image processor size {dict(size)} is not understood")
    return side, max(side, resize)


def _stats(values: Any, name: str) -> tuple[float, float, float]:
    if values is None:
        raise ImportSourceError(f"the image processor has no {name}")
    if isinstance(values, int | float):
        values = [values] * 3
    if len(values) != 3:
        raise ImportSourceError(f"image processor {name} {values} is not per RGB channel")
    return (float(values[0]), float(values[1]), float(values[2]))


def imported_config(source: str, model: Any, tokenizer: Any, processor: Any) -> ImportedModelConfig:
    """The :class:`ImportedModelConfig` of a loaded model (``path_or_id`` set to ``source``)."""
    side, resize = _framing(processor)
    model_type = str(getattr(model.config, "model_type", "") or "")
    text_config = getattr(model.config, "text_config", None)
    positions = int(getattr(text_config, "max_position_embeddings", 0) or 0)
    limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
    # Tokenizers without a real limit report a huge sentinel; the positions bound it.
    max_length = min(v for v in (positions, limit, 512) if v > 0)
    fixed = model_type in FIXED_LENGTH_TEXT
    return ImportedModelConfig(
        path_or_id=source,
        source=source,
        model_type=model_type,
        input_size=side,
        resize=resize,
        mean=_stats(getattr(processor, "image_mean", None), "image_mean"),
        std=_stats(getattr(processor, "image_std", None), "image_std"),
        text_padding="max_length" if fixed else "longest",
        text_attention_mask=not fixed,
        max_length=max_length,
    )


def _probe_dim(encoder: Any) -> int:
    """The embedding size, from one probe image and one probe text; both must agree."""
    side = encoder.imported.input_size
    with torch.inference_mode():
        image = encoder.encode_image(torch.zeros(1, 3, side, side))  # (1, D)
        text = encoder.encode_text(encoder.tokenize(["no acute cardiopulmonary process"]))
    if image.ndim != 2 or image.shape != text.shape:
        raise ImportSourceError(
            f"image embeddings {tuple(image.shape)} and text embeddings {tuple(text.shape)} "
            "do not share one space"
        )
    return int(image.shape[-1])


def import_model(
    source: str,
    out_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    training_data: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the encoder bundle of the transformers image–text model at ``source``.

    Args:
        source: a local directory (``save_pretrained`` output) or a hub id; a hub id needs
            the network or the local hub cache.
        out_dir: the bundle directory to write.
        name: the bundle's model name (default: the last part of ``source``).
        training_data: what the model was trained on, for the provenance (default: "as
            published by SOURCE").
        overwrite: replace a non-empty ``out_dir``.

    Raises:
        ImportSourceError: the source cannot be read or is not an image–text model.
        BundleInvalidError: ``out_dir`` is not empty and ``overwrite`` is False.
    """
    from model.imported import ImportedDualEncoder

    hf_model, tokenizer, processor = _load_parts(source)
    imported = imported_config(source, hf_model, tokenizer, processor)
    encoder = ImportedDualEncoder.wrap(
        ModelConfig(imported=imported), model=hf_model, tokenizer=tokenizer
    )
    encoder.eval()
    dim = _probe_dim(encoder)
    encoder.config.projection = ProjectionConfig(dim=dim)
    label = name or Path(source.rstrip("/")).name or source
    provenance = provenance_doc(
        "imported",
        source=source,
        training_data=training_data or f"as published by {source} (not trained here)",
    )
    logger.info("importing %s (%s): %d-d embeddings", source, imported.model_type, dim)
    return write_bundle(
        encoder,
        out_dir,
        name=label,
        source={"imported_from": source, "model_type": imported.model_type},
        provenance=provenance,
        overwrite=overwrite,
    )
