"""Plain helpers of the trainer, bundle and DDP tests: tiny towers, a tiny config and a
manifest of unique sentences (the fixtures built from them are in ``conftest.py``).

The tiny towers are real transformers models (a two-stage ResNet and a two-layer BERT with
the MiniLM tokenizer) saved to local directories with random weights, so the trainer runs
its whole code path in a fraction of the time of the shipped towers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from model.training.config import TrainConfig, load_train_config


def make_tiny_towers(root: Path) -> tuple[Path, Path]:
    """(image backbone dir, text encoder dir) of tiny randomly initialised models."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import BertConfig, BertModel, ResNetConfig, ResNetModel

    from model.towers.text import default_text_model_dir

    image_dir, text_dir = root / "tiny-resnet", root / "tiny-bert"
    if (image_dir / "config.json").is_file() and (text_dir / "config.json").is_file():
        return image_dir, text_dir
    # Seeded so that every process (DDP ranks included) builds identical files.
    torch.manual_seed(1234)
    resnet = ResNetModel(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    )
    resnet.save_pretrained(image_dir)
    minilm = default_text_model_dir()
    text_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).is_file():
            shutil.copy(minilm / name, text_dir / name)
    bert = BertModel(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    )
    bert.save_pretrained(text_dir)
    return image_dir, text_dir


def tiny_config(
    manifest: Path, out_dir: Path, towers: tuple[Path, Path], *overrides: str
) -> TrainConfig:
    """A fast CPU training config on ``manifest`` with the tiny towers."""
    image_dir, text_dir = towers
    return load_train_config(
        "cpu-small",
        [
            "model.image.name=hf",
            f"model.image.path_or_id={image_dir}",
            "model.image.input_size=64",
            f"model.text.path_or_id={text_dir}",
            "model.text.freeze_layers=1",
            "model.text.max_length=48",
            "model.projection.dim=512",
            f"data.source={manifest}",
            "data.batch_size=8",
            "data.num_workers=0",
            "optim.lr=1e-3",
            # The trainer's mechanics, not cpu-small's backbone-keeping recipe (a slow
            # backbone, frozen batch-norm statistics, the anchor), which the tiny towers
            # do not need; tests/model/test_anchor.py adds the anchor back.
            "optim.image_backbone_lr_scale=1.0",
            "model.image.freeze_batchnorm=false",
            "model.image.freeze_blocks=0",
            "model.projection.kind=nonlinear",
            "model.projection.image_orthogonal=false",
            "model.anchor=null",
            "optim.warmup_steps=2",
            "train.epochs=2",
            "train.progress=false",
            "train.log_every=1",
            "train.precision=fp32",
            f"train.out_dir={out_dir}",
            *overrides,
        ],
    )


def unique_sentence_manifest(source: Path, out_dir: Path, n_train: int, n_val: int) -> Path:
    """A manifest of the first studies of ``source`` whose reports are one unique sentence.

    Synthetic reports share most sentences ("No acute fracture."), so a few steps on them
    barely move the loss; with one distinct sentence per study the pairs can be fitted, which
    is what a smoke test of the optimisation needs to see.
    """
    import dataclasses

    from model.data.manifest import read_manifest, write_manifest

    records = read_manifest(source)[: n_train + n_val]
    rewritten = [
        dataclasses.replace(
            record,
            report=f"Study {record.study_id} of patient {record.patient_id}.",
            split="train" if i < n_train else "validate",
        )
        for i, record in enumerate(records)
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_manifest(rewritten, out_dir / "manifest.csv")


#: Overrides that turn every augmentation off (deterministic inputs for fitting checks).
NO_AUGMENT = (
    "augment.crop_p=0",
    "augment.hflip_p=0",
    "augment.affine_p=0",
    "augment.jitter_p=0",
    "augment.blur_p=0",
)
