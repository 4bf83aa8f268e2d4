"""The training configuration: dataclasses loadable from YAML, with ``key.path=value`` overrides.

``TrainConfig`` nests the model's own sections (``model``, ``augment``, ``loss``, from
:mod:`model.config`) and the trainer's (``data``, ``optim``, ``train``). A YAML file holds
any subset of the keys; the rest keep their defaults. Overrides such as
``optim.lr=3e-4 data.batch_size=16`` are parsed as YAML scalars, so ``1e-4`` is a float,
``16`` an int, ``true`` a bool and ``null`` None; unknown keys and mistyped values raise
:class:`model.config.InvalidConfigError` naming the key path.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model.config import (
    AugmentConfig,
    InvalidConfigError,
    LossConfig,
    ModelConfig,
    config_from_dict,
    config_to_dict,
)

SCHEDULES = ("cosine", "plateau", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DATA_ADAPTERS = ("mimic-cxr", "iu-xray")


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; configs and overrides mean a float."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    # A SafeLoader subclass: no Python objects are ever constructed.
    return yaml.load(text, Loader=_ConfigLoader)


#: The configs shipped with the package, addressable by name (``--config cpu-small``).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


#: Where a training sentence may be sampled from (``DataConfig.text_section``).
TEXT_SECTIONS: tuple[str, ...] = ("body", "impression")


@dataclass
class DataConfig:
    """Where the pairs come from and how they are batched.

    ``source`` is a manifest path (CSV/JSONL, see :mod:`model.data.manifest`) or an adapter
    prefix: ``mimic-cxr:ROOT`` (MIMIC-CXR-JPG) or ``iu-xray:ROOT`` (IU X-ray / Open-i).
    ``batch_size`` is the number of pairs in one contrastive batch, summed over all
    processes under DDP (each process holds ``batch_size / world_size``); the batch is the
    pool of negatives, so it is kept independent of the number of GPUs.
    ``grad_accum_steps`` micro-batches are averaged into one optimizer step.
    The validation split is ``val_fraction`` of the patients (patient-disjoint), unless the
    manifest assigns splits itself (``train``/``validate``) and ``use_manifest_split`` is on.
    ``pin_memory`` takes effect only on CUDA. ``limit`` caps the number of training pairs
    (smoke runs). ``text_section`` picks where the training sentence is sampled from:
    ``"body"`` (FINDINGS and IMPRESSION, the paper's recipe) or ``"impression"`` (the
    IMPRESSION alone, falling back to the body when a report has none): on a short CPU
    budget the impression's few, finding-bearing sentences give a far stronger signal
    than the body's many normal-anatomy sentences, which act as false negatives.
    """

    source: str = ""
    batch_size: int = 32
    grad_accum_steps: int = 1
    num_workers: int = 2
    pin_memory: bool = True
    val_fraction: float = 0.1
    use_manifest_split: bool = True
    limit: int | None = None
    text_section: str = "body"

    def __post_init__(self) -> None:
        if self.text_section not in TEXT_SECTIONS:
            raise InvalidConfigError(
                f"text_section: {self.text_section!r} is not one of {', '.join(TEXT_SECTIONS)}"
            )
        if self.batch_size < 2:
            raise InvalidConfigError(
                f"batch_size: {self.batch_size} (a contrastive batch needs 2+)"
            )
        if self.grad_accum_steps < 1:
            raise InvalidConfigError(f"grad_accum_steps: {self.grad_accum_steps} is below 1")
        if self.num_workers < 0:
            raise InvalidConfigError(f"num_workers: {self.num_workers} is negative")
        if not 0.0 < self.val_fraction < 1.0:
            raise InvalidConfigError(f"val_fraction: {self.val_fraction} not in (0, 1)")
        if self.limit is not None and self.limit < 2:
            raise InvalidConfigError(f"limit: {self.limit} is below 2")


@dataclass
class OptimConfig:
    """AdamW over the trainable parameters, warmup then a cosine or plateau schedule.

    The paper's values are the defaults: lr 1e-4, weight decay 1e-6. ``min_lr_ratio`` is the
    end of the cosine as a fraction of ``lr``; ``plateau_factor``/``plateau_patience`` cut
    the rate when the validation loss stalls; ``max_grad_norm`` unset means no clipping.

    Keeping a pretrained image backbone's general features while the heads learn (the
    three act on the image backbone's parameters only; ConVIRT models, not imported ones):
    ``image_backbone_lr_scale`` multiplies its learning rate; ``image_backbone_frozen_steps``
    holds it still for the first steps while the heads learn (LP-FT: linear probe, then
    fine-tune; Kumar et al. 2022); ``l2sp`` adds ``l2sp / 2 * ||w - w0||^2`` towards its
    initial weights ``w0`` to the loss (L2-SP; Li et al. 2018).
    """

    lr: float = 1e-4
    weight_decay: float = 1e-6
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    max_grad_norm: float | None = None
    image_backbone_lr_scale: float = 1.0
    image_backbone_frozen_steps: int = 0
    l2sp: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.image_backbone_lr_scale <= 1e3:
            raise InvalidConfigError(
                f"image_backbone_lr_scale: {self.image_backbone_lr_scale} not in [0, 1000]"
            )
        if self.image_backbone_frozen_steps < 0:
            raise InvalidConfigError(
                f"image_backbone_frozen_steps: {self.image_backbone_frozen_steps} is negative"
            )
        if self.l2sp < 0.0:
            raise InvalidConfigError(f"l2sp: {self.l2sp} is negative")
        if self.schedule not in SCHEDULES:
            raise InvalidConfigError(
                f"schedule: {self.schedule!r} is not one of {', '.join(SCHEDULES)}"
            )
        if self.lr <= 0.0:
            raise InvalidConfigError(f"lr: {self.lr} is not positive")
        if self.weight_decay < 0.0:
            raise InvalidConfigError(f"weight_decay: {self.weight_decay} is negative")
        if self.warmup_steps < 0:
            raise InvalidConfigError(f"warmup_steps: {self.warmup_steps} is negative")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise InvalidConfigError(f"min_lr_ratio: {self.min_lr_ratio} not in [0, 1]")
        if not 0.0 < self.plateau_factor < 1.0:
            raise InvalidConfigError(f"plateau_factor: {self.plateau_factor} not in (0, 1)")
        if self.plateau_patience < 1:
            raise InvalidConfigError(f"plateau_patience: {self.plateau_patience} is below 1")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0.0:
            raise InvalidConfigError(f"max_grad_norm: {self.max_grad_norm} is not positive")


@dataclass
class RunConfig:
    """How long, where and how precisely to train.

    Training stops at the first of: ``epochs`` done, ``max_steps`` optimizer steps,
    ``time_budget_s`` seconds of this process, or ``early_stopping_patience`` epochs
    without a validation improvement larger than ``early_stopping_min_delta`` (0 disables
    early stopping). ``precision`` ``auto`` is bf16 autocast on a CUDA device that supports
    it, else fp16 with a gradient scaler on CUDA, else fp32; ``channels_last`` applies on
    CUDA and the CPU. ``device`` ``auto`` picks CUDA when present (under ``torchrun`` the process's
    ``LOCAL_RANK`` device). ``out_dir`` receives the checkpoints, ``metrics.jsonl``, the
    resolved ``config.yaml`` and ``loss.png``.
    """

    epochs: int = 10
    max_steps: int | None = None
    time_budget_s: float | None = None
    early_stopping_patience: int = 3
    early_stopping_min_delta: float = 0.0
    seed: int = 0
    precision: str = "auto"
    channels_last: bool = True
    device: str = "auto"
    out_dir: str = "runs/convirt"
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InvalidConfigError(f"epochs: {self.epochs} is below 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidConfigError(f"max_steps: {self.max_steps} is below 1")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise InvalidConfigError(f"time_budget_s: {self.time_budget_s} is not positive")
        if self.early_stopping_patience < 0:
            raise InvalidConfigError(
                f"early_stopping_patience: {self.early_stopping_patience} is negative"
            )
        if self.precision not in PRECISIONS:
            raise InvalidConfigError(
                f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}"
            )
        if self.log_every < 1:
            raise InvalidConfigError(f"log_every: {self.log_every} is below 1")


@dataclass
class TrainConfig:
    """Everything a training run needs; ``name`` becomes the exported model's name."""

    name: str = "convirt"
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and its YAML-scalar value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InvalidConfigError(f"override {text!r} is not of the form key.path=value")
    parts = key.split(".")
    if any(not part for part in parts):
        raise InvalidConfigError(f"override {text!r} has an empty key in its path")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise InvalidConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of the plain config ``data`` with each ``key.path=value`` override set.

    The keys are not checked here; :func:`config_from_dict` rejects unknown ones afterwards,
    with the full path.
    """
    result: dict[str, Any] = copy.deepcopy(dict(data))
    for text in overrides:
        parts, value = parse_override(text)
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                path = ".".join(parts[: depth + 1])
                raise InvalidConfigError(f"override {text!r}: {path} is not a section")
            node = child
        node[parts[-1]] = value
    return result


def resolve_config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A config file path, or the name of a shipped config (``cpu-small``, ``paper``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise InvalidConfigError(
        f"config {name_or_path} is neither a file nor a shipped config ({known})"
    )


def load_train_config(
    path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()
) -> TrainConfig:
    """Read a YAML config (a file or a shipped name; None means all defaults), then overrides."""
    data: Any = {}
    if path is not None:
        source = resolve_config_path(path)
        try:
            data = _load_yaml(source.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise InvalidConfigError(f"config {source} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidConfigError(f"config {source} must hold a mapping at its top level")
    return train_config_from_dict(apply_overrides(data, overrides))


def resume_config(
    checkpoint_path: str | os.PathLike[str], overrides: Iterable[str] = ()
) -> TrainConfig:
    """The config stored in a training checkpoint, with ``overrides`` applied on top.

    Only overrides that do not change the data or the model (``train.epochs``,
    ``train.max_steps``, ``train.time_budget_s``, ``optim.lr``, ...) keep the resume exact.
    """
    from model.checkpoint import load_checkpoint

    stored = load_checkpoint(checkpoint_path)["config"]
    return train_config_from_dict(apply_overrides(stored, overrides))


def train_config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Strictly build a :class:`TrainConfig` from plain nested data."""
    return config_from_dict(TrainConfig, data)


def train_config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain nested dict of ``config``; :func:`train_config_from_dict` inverts it."""
    return config_to_dict(config)


def dump_train_config(config: TrainConfig) -> str:
    """``config`` as YAML text, loadable by :func:`load_train_config`."""
    text: str = yaml.safe_dump(train_config_to_dict(config), sort_keys=False)
    return text


def parse_data_source(source: str) -> tuple[str, str]:
    """Split ``data.source`` into (kind, location): kind is ``manifest`` or an adapter name.

    A Windows drive letter (``C:\\data``) is not mistaken for an adapter prefix: only the
    known adapter names are.
    """
    if not source:
        raise InvalidConfigError(
            "data.source is empty: give --data MANIFEST, mimic-cxr:ROOT or iu-xray:ROOT"
        )
    prefix, sep, rest = source.partition(":")
    if sep and prefix in DATA_ADAPTERS:
        if not rest:
            raise InvalidConfigError(f"data.source {source!r} names no root folder")
        return prefix, rest
    return "manifest", source
