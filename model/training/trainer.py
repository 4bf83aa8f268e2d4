"""The ConVIRT trainer: data pipeline, optimisation loop, checkpoints, resume, DDP.

Exact resume is designed in rather than bolted on:

- the order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, and the
  augmentation and sentence choice of sample ``i`` in epoch ``e`` from ``(seed, e, i)``
  alone, so a run resumed at any optimizer step (mid-epoch included) sees the very batches
  the uninterrupted run saw, whatever the number of DataLoader workers;
- a checkpoint holds the model, optimizer, schedule, early-stopping and gradient-scaler
  states, the position (epoch, optimizer step within the epoch, global step) and the
  Python/NumPy/torch RNG states (dropout draws from torch's), taken at an optimizer-step
  boundary;
- SIGINT/SIGTERM only raise a flag; the loop saves and leaves at the next step boundary.

Under ``torchrun`` every process takes its contiguous slice of each global batch, the
loss gathers the embeddings of all processes (:class:`model.loss.ConVIRTLoss`), and DDP
averages the gradients, which equals the single-process gradient on the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from model.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from model.config import InvalidConfigError
from model.data.manifest import PairedRecord
from model.errors import ModelError
from model.training.config import (
    TrainConfig,
    apply_overrides,
    dump_train_config,
    parse_data_source,
    train_config_from_dict,
    train_config_to_dict,
)
from model.training.regularise import L2SP, backbone_param_groups
from model.training.schedule import EarlyStopping, LRSchedule

if TYPE_CHECKING:
    from model.convirt import EncoderModel

logger = logging.getLogger(__name__)

#: Seed streams: training draws and validation draws never share a generator.
_TRAIN_STREAM = 0
_VAL_STREAM = 1
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
CONFIG_FILE = "config.yaml"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


class TrainingDiverged(ModelError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""

    code = "training_diverged"


class TrainingDataError(ModelError):
    """The configured data source yields too few usable pairs to train on."""

    code = "invalid_training_data"


# --------------------------------------------------------------------------- data


def sample_seed(seed: int, stream: int, epoch: int, index: int) -> int:
    """A 64-bit seed for sample ``index`` of ``epoch``: a pure function of its arguments."""
    state = np.random.SeedSequence([seed, stream, epoch, index]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of ``epoch``: a permutation of ``range(n)`` drawn from (seed, epoch)."""
    rng = np.random.default_rng([seed, _TRAIN_STREAM, epoch])
    return rng.permutation(n)


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this process's share of each global batch as ``[(epoch, index), ...]``.

    The global batch ``b`` of an epoch is ``order[b*B:(b+1)*B]`` (``B`` = global batch size);
    process ``rank`` of ``world_size`` takes its contiguous slice of ``B / world_size``
    samples. The role of ``DistributedSampler``, plus what it lacks for exact resume: a
    start position within the epoch. The dataset receives the epoch with each index, so
    its random draws depend on (epoch, index) only. Runs in the main process, so
    :meth:`set_epoch` works with persistent DataLoader workers.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_batches: int | None = None,
    ) -> None:
        if batch_size % world_size:
            raise InvalidConfigError(
                f"data.batch_size: {batch_size} is not divisible by the {world_size} processes"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        full = num_samples // batch_size
        self.num_batches = full if num_batches is None else min(full, num_batches)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate and the global batch to start from (resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def global_batch(self, epoch: int, batch: int) -> list[int]:
        """Dataset indices of global batch ``batch`` of ``epoch`` (all processes together)."""
        if self.shuffle:
            order = epoch_permutation(self.num_samples, self.seed, epoch)
        else:
            order = np.arange(self.num_samples)
        return [int(i) for i in order[batch * self.batch_size : (batch + 1) * self.batch_size]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            order = epoch_permutation(self.num_samples, self.seed, self.epoch)
        else:
            order = np.arange(self.num_samples)
        local = self.batch_size // self.world_size
        for batch in range(self.start_batch, self.num_batches):
            start = batch * self.batch_size + self.rank * local
            yield [(self.epoch, int(i)) for i in order[start : start + local]]

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)


class PairDataset(Dataset[tuple[torch.Tensor, str]]):
    """Decoded, transformed radiograph and one sampled report sentence per ``(epoch, index)``.

    ``transform`` is a :class:`model.transforms.TrainTransform` (called with the sample's
    generator) when ``augment`` is True, else an :class:`model.transforms.EvalTransform`.
    The sentence is drawn with :func:`model.inputs.reports.sample_sentence` from the same
    generator, seeded by :func:`sample_seed`, out of the report's body or, with
    ``text_section="impression"``, its IMPRESSION section (see ``DataConfig``).
    """

    def __init__(
        self,
        records: Sequence[PairedRecord],
        transform: Callable[..., torch.Tensor],
        *,
        seed: int,
        augment: bool,
        text_section: str = "body",
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.seed = seed
        self.augment = augment
        self.text_section = text_section

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str]:
        from model.inputs.decode import decode_file
        from model.inputs.reports import sample_sentence

        epoch, index = key
        record = self.records[index]
        stream = _TRAIN_STREAM if self.augment else _VAL_STREAM
        rng = random.Random(sample_seed(self.seed, stream, epoch, index))
        pixels = decode_file(record.image_path).pixels  # (H, W) in [0, 1]
        image = self.transform(pixels, rng) if self.augment else self.transform(pixels)
        return image, sample_sentence(training_text(record.report, self.text_section), rng)


def training_text(report: str, section: str) -> str:
    """The part of ``report`` that training sentences are sampled from (``text_section``)."""
    if section == "impression":
        from model.inputs.reports import parse_sections

        impression = parse_sections(report).get("IMPRESSION", "").strip()
        if impression:
            return impression
    return report


def collate_pairs(batch: Sequence[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    """Stack images to (B, 3, S, S); sentences stay strings (tokenized in the main process)."""
    images = torch.stack([image for image, _ in batch])  # (B, 3, S, S)
    return images, [text for _, text in batch]


def load_records(source: str) -> list[PairedRecord]:
    """The paired records of ``data.source``: a manifest path or an adapter prefix."""
    from model.data import datasets

    kind, location = parse_data_source(source)
    if kind == "manifest":
        return list(datasets.manifest_records(location))
    if kind == "mimic-cxr":
        return list(datasets.mimic_cxr_records(location))
    return list(datasets.iu_xray_records(location))


def split_records(
    records: Sequence[PairedRecord], config: TrainConfig
) -> tuple[list[PairedRecord], list[PairedRecord]]:
    """(train, validation) records: patient-disjoint, never touching the ``test`` split.

    Records without report text are dropped (they carry nothing to contrast with), and so
    are records of the ``test`` split. :func:`model.data.datasets.split_by_patient` keeps the
    manifest's own ``train``/``validate`` assignment when every record has one (and
    ``data.use_manifest_split`` is on), else assigns whole patients with a seeded hash so
    that ``data.val_fraction`` of them validate.
    """
    from model.data.datasets import split_by_patient

    data = config.data
    usable = [r for r in records if r.report.strip()]
    if len(usable) < len(records):
        logger.warning("%d records without report text skipped", len(records) - len(usable))
    usable = [r for r in usable if r.split != "test"]
    if not data.use_manifest_split:
        usable = [dataclasses.replace(r, split=None) for r in usable]
    fractions = {"train": 1.0 - data.val_fraction, "validate": data.val_fraction}
    parts = split_by_patient(usable, fractions, seed=config.train.seed)
    train, val = list(parts["train"]), list(parts["validate"])
    if data.limit is not None:
        train = train[: data.limit]
    if len(train) < data.batch_size:
        raise TrainingDataError(
            f"{len(train)} training pairs in {data.source!r}, fewer than one batch "
            f"of {data.batch_size}"
        )
    return train, val


# --------------------------------------------------------------------------- runtime


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: its rank among ``world_size`` and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` → the local CUDA device when present, else the CPU; anything else as given."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError(f"train.device: {preference!r} requested but CUDA is absent")
    return device


def init_distributed(preference: str) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(preference, local_rank)
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns_group = True
    if world_size > 1:
        logger.info("process %d of %d on %s", rank, world_size, device)
    return DistContext(rank, world_size, local_rank, device, owns_group)


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a gradient scaler is needed)."""
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, False
        return torch.float16, True
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if device.type != "cuda":
        raise InvalidConfigError("train.precision: fp16 needs a CUDA device; use bf16 or fp32")
    return torch.float16, True


class _StopFlag:
    """SIGINT/SIGTERM handler: the first signal asks for a clean stop, a second one aborts."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        # Signal handlers can only be set from the main thread of the main interpreter.
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning(
            "%s received: saving a checkpoint at the end of this step (again to abort)",
            signal.Signals(signum).name,
        )


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------- results


@dataclass
class TrainResult:
    """What a run did: where it stopped and why, and its best validation loss.

    ``stop_reason`` is one of ``completed`` (all epochs), ``max_steps``, ``time_budget``,
    ``early_stopping`` or ``interrupted`` (SIGINT/SIGTERM; resume from ``last_checkpoint``).
    ``initial_val_loss`` is the untrained model's (None when resumed); ``val_losses`` and
    ``train_losses`` hold one value per completed epoch, over the whole run.
    """

    out_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    step: int
    epoch: int
    stop_reason: str
    best_val_loss: float | None
    initial_val_loss: float | None = None
    val_losses: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    signal: int | None = None


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Trains a ConVIRT model from a :class:`TrainConfig`.

    Args:
        config: the run's configuration (from the checkpoint when resuming).
        resume_from: a full checkpoint (``last.pt``) to continue exactly.
        step_callback: called after every optimizer step with the global step count
            (progress hooks, tests).
        init_weights: a full state dict to start from instead of the pretrained towers
            (``convirt train --init-from BUNDLE``: fine-tuning an exported or imported
            bundle); ignored when resuming, whose checkpoint holds the weights.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume_from: str | os.PathLike[str] | None = None,
        step_callback: Callable[[int], None] | None = None,
        init_weights: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        from model.convirt import build_encoder
        from model.loss import ConVIRTLoss

        self.config = config
        self.step_callback = step_callback
        self.ctx = init_distributed(config.train.device)
        self.out_dir = Path(config.train.out_dir)
        run = config.train
        checkpoint = load_checkpoint(resume_from) if resume_from is not None else None
        existing = self.out_dir / "checkpoints" / LAST_CHECKPOINT
        if checkpoint is None and existing.is_file():
            raise InvalidConfigError(
                f"train.out_dir {self.out_dir} already holds a run ({existing}): "
                "resume it or choose another out_dir"
            )
        self.initial_val_loss: float | None = None
        if checkpoint is not None and "optimizer" not in checkpoint:
            raise InvalidConfigError(
                f"{resume_from} holds weights only; resuming needs {LAST_CHECKPOINT}"
            )

        random.seed(run.seed)
        np.random.seed(run.seed)
        torch.manual_seed(run.seed)
        # Resumed or initial weights replace the pretrained ones: no need to read those.
        given = checkpoint is not None or init_weights is not None
        model = build_encoder(config.model, pretrained=False if given else None)
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
        elif init_weights is not None:
            model.load_state_dict(init_weights, strict=True)
        device = self.ctx.device
        self.autocast_dtype, use_scaler = resolve_precision(run.precision, device)
        self.channels_last = run.channels_last and device.type == "cuda"
        if self.ctx.distributed and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.module: EncoderModel = model
        self.model: nn.Module = model
        if self.ctx.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.loss_fn = ConVIRTLoss(
            config.loss.temperature,
            config.loss.lambda_,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )

        records = load_records(config.data.source)
        self.train_records, self.val_records = split_records(records, config)
        # The model knows the normalisation its backbone's weights expect.
        self.eval_transform = model.eval_transform()
        self.train_set = PairDataset(
            self.train_records,
            model.train_transform(config.augment),
            seed=run.seed,
            augment=True,
            text_section=config.data.text_section,
        )
        self.val_set = PairDataset(
            self.val_records,
            self.eval_transform,
            seed=run.seed,
            augment=False,
            text_section=config.data.text_section,
        )
        data = config.data
        self.steps_per_epoch = len(self.train_records) // data.batch_size // data.grad_accum_steps
        if self.steps_per_epoch < 1:
            raise TrainingDataError(
                f"{len(self.train_records)} training pairs make no optimizer step of "
                f"{data.batch_size} x {data.grad_accum_steps} pairs"
            )
        self.train_sampler = EpochBatchSampler(
            len(self.train_records),
            data.batch_size,
            seed=run.seed,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            num_batches=self.steps_per_epoch * data.grad_accum_steps,
        )
        self.train_loader = self._loader(self.train_set, self.train_sampler)
        val_batch = min(data.batch_size, len(self.val_records))
        val_batch -= val_batch % self.ctx.world_size
        self.val_sampler: EpochBatchSampler | None = None
        self.val_loader: DataLoader[Any] | None = None
        if val_batch >= 2:
            self.val_sampler = EpochBatchSampler(
                len(self.val_records),
                val_batch,
                seed=run.seed,
                shuffle=False,
                rank=self.ctx.rank,
                world_size=self.ctx.world_size,
            )
            self.val_loader = self._loader(self.val_set, self.val_sampler, persistent=False)
        else:
            logger.warning(
                "only %d validation pairs: no validation loss, no early stopping",
                len(self.val_records),
            )

        trainable = [p for p in self.module.parameters() if p.requires_grad]
        optim = config.optim
        self.optimizer = torch.optim.AdamW(
            backbone_param_groups(self.module, optim),
            lr=optim.lr,
            betas=(optim.beta1, optim.beta2),
            weight_decay=optim.weight_decay,
        )
        total_steps = run.epochs * self.steps_per_epoch
        if run.max_steps is not None:
            total_steps = min(total_steps, run.max_steps)
        self.schedule = LRSchedule(
            self.optimizer,
            base_lr=optim.lr,
            kind=optim.schedule,  # type: ignore[arg-type]
            warmup_steps=optim.warmup_steps,
            total_steps=total_steps,
            min_lr_ratio=optim.min_lr_ratio,
            plateau_factor=optim.plateau_factor,
            plateau_patience=optim.plateau_patience,
        )
        self.early_stopping = EarlyStopping(
            run.early_stopping_patience, run.early_stopping_min_delta
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        # L2-SP pulls towards the run's start: the weights now, or for a resumed run the
        # pretrained backbone it started from.
        start = None
        if checkpoint is not None and optim.l2sp > 0 and config.model.imported is None:
            from model.towers.image import build_image_tower

            start = build_image_tower(config.model.image)
        self._l2sp = L2SP.of(self.module, optim.l2sp, start)

        self.epoch = 0
        self.step_in_epoch = 0
        self.step = 0
        self.val_losses: list[float] = []
        self.train_losses: list[float] = []
        # Running sum of the current epoch's step losses (kept across a mid-epoch resume).
        self._epoch_loss_sum = 0.0
        self._epoch_loss_steps = 0
        if checkpoint is not None:
            self._restore(checkpoint)
            logger.info("resumed from %s at epoch %d, step %d", resume_from, self.epoch, self.step)
        n_trainable = sum(p.numel() for p in trainable)
        logger.info(
            "%d training / %d validation pairs; %d trainable parameters; %d steps per epoch; "
            "device %s, autocast %s",
            len(self.train_records),
            len(self.val_records),
            n_trainable,
            self.steps_per_epoch,
            device,
            self.autocast_dtype,
        )

    # ---------------------------------------------------------------- pieces

    def _loader(
        self, dataset: PairDataset, sampler: EpochBatchSampler, *, persistent: bool = True
    ) -> DataLoader[Any]:
        data = self.config.data
        workers = data.num_workers
        # A private generator keeps DataLoader's worker seeding off torch's global RNG,
        # whose state the checkpoint restores for dropout.
        generator = torch.Generator().manual_seed(self.config.train.seed)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=collate_pairs,
            pin_memory=data.pin_memory and self.ctx.device.type == "cuda",
            persistent_workers=persistent and workers > 0,
            generator=generator,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.ctx.device, non_blocking=True)  # (B, 3, S, S)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def compute_loss(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """The loss of one micro-batch of this process (autograd graph attached).

        Args:
            images: (B, 3, S, S) transformed images, on any device.
            texts: B sentences; ``texts[i]`` pairs with ``images[i]``.
        """
        tokens = {
            k: v.to(self.ctx.device, non_blocking=True)
            for k, v in self.module.tokenize(list(texts)).items()
        }
        with self._autocast():
            image_emb, text_emb = self.model(self._to_device(images), tokens)  # (B, D) each
        # The similarities and the softmax in float32 even under autocast.
        return self.loss_fn(image_emb.float(), text_emb.float())

    def forward_backward(
        self, images: torch.Tensor, texts: Sequence[str], *, sync: bool = True
    ) -> torch.Tensor:
        """Loss of one micro-batch and its gradient, accumulated into ``.grad``.

        The backward pass is scaled by ``1 / grad_accum_steps`` (and by the fp16 scaler);
        ``sync=False`` skips DDP's gradient all-reduce for all but the last micro-batch.
        Returns the detached, unscaled loss.
        """
        context = (
            self.model.no_sync()  # type: ignore[operator]
            if self.ctx.distributed and not sync
            else contextlib.nullcontext()
        )
        with context:
            loss = self.compute_loss(images, texts)
            # L2-SP pulls the backbone towards its start; the reported loss stays ConVIRT's.
            total = loss + self._l2sp.penalty() if self._l2sp is not None else loss
            scaled = total / self.config.data.grad_accum_steps
            self.scaler.scale(scaled).backward()
        return loss.detach()

    def _optimizer_step(self) -> None:
        max_norm = self.config.optim.max_grad_norm
        if max_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.module.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()

    @torch.inference_mode()
    def validate(self) -> float | None:
        """Mean validation loss (same batch size as training, eval transform), or None."""
        if self.val_loader is None or self.val_sampler is None:
            return None
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        self.val_sampler.set_epoch(0)
        for images, texts in self.val_loader:
            # The loss's gather is autograd-aware; inference mode just skips the graph.
            loss = self.compute_loss(images, texts)
            total[0] += float(loss) * len(texts)
            total[1] += len(texts)
        self.model.train()
        if self.ctx.distributed:
            dist.all_reduce(total)
        return float(total[0] / total[1]) if total[1] > 0 else None

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """This process's micro-batches of ``epoch`` from global batch ``start_batch`` on."""
        self.train_sampler.set_epoch(epoch, start_batch)
        yield from self.train_loader

    # ---------------------------------------------------------------- state

    def _state(self) -> dict[str, Any]:
        return {
            "kind": "full",
            "config": train_config_to_dict(self.config),
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "early_stopping": self.early_stopping.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "step": self.step,
                "epoch_loss_sum": self._epoch_loss_sum,
                "epoch_loss_steps": self._epoch_loss_steps,
            },
            "history": {"val_losses": self.val_losses, "train_losses": self.train_losses},
            "rng": capture_rng_state(),
        }

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["schedule"])
        self.early_stopping.load_state_dict(checkpoint["early_stopping"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        progress = checkpoint["progress"]
        self.epoch = int(progress["epoch"])
        self.step_in_epoch = int(progress["step_in_epoch"])
        self.step = int(progress["step"])
        self._epoch_loss_sum = float(progress["epoch_loss_sum"])
        self._epoch_loss_steps = int(progress["epoch_loss_steps"])
        history = checkpoint.get("history", {})
        self.val_losses = [float(v) for v in history.get("val_losses", [])]
        self.train_losses = [float(v) for v in history.get("train_losses", [])]
        # Last of all: everything above may have drawn random numbers.
        restore_rng_state(checkpoint["rng"])

    def save(self, name: str = LAST_CHECKPOINT) -> Path:
        """Write the full training state to ``out_dir/checkpoints/name`` (main process)."""
        path = self.out_dir / "checkpoints" / name
        if self.ctx.is_main:
            save_checkpoint(path, self._state())
        if self.ctx.distributed:
            dist.barrier()
        return path

    def _save_best(self) -> Path:
        path = self.out_dir / "checkpoints" / BEST_CHECKPOINT
        if self.ctx.is_main:
            save_checkpoint(
                path,
                {
                    "kind": "weights",
                    "config": train_config_to_dict(self.config),
                    "model": self.module.state_dict(),
                    "progress": {"epoch": self.epoch, "step": self.step},
                    "val_loss": self.early_stopping.best,
                },
            )
        return path

    def _log(self, record: dict[str, Any]) -> None:
        if not self.ctx.is_main:
            return
        with (self.out_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    # ---------------------------------------------------------------- loop

    def fit(self) -> TrainResult:
        """Train until done, stopped or interrupted; returns where and why it stopped."""
        run = self.config.train
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.step == 0:
                # A fresh run (perhaps one that diverged before its first checkpoint).
                (self.out_dir / METRICS_FILE).unlink(missing_ok=True)
            (self.out_dir / CONFIG_FILE).write_text(
                dump_train_config(self.config), encoding="utf-8"
            )
        if self.step == 0 and self.epoch == 0:
            # The untrained model's validation loss: the baseline the curve starts from.
            self.initial_val_loss = self.validate()
            self._log(
                {
                    "event": "epoch",
                    "step": 0,
                    "epoch": 0,
                    "train_loss": None,
                    "val_loss": self.initial_val_loss,
                    "best": False,
                    "lr": self.schedule.lr,
                }
            )
        stop_flag = _StopFlag()
        stop_flag.install()
        started = time.monotonic()
        reason = "completed"
        self.model.train()
        try:
            while self.epoch < run.epochs:
                if run.max_steps is not None and self.step >= run.max_steps:
                    reason = "max_steps"
                    break
                stopped = self._train_epoch(stop_flag, started)
                if self.step_in_epoch < self.steps_per_epoch:
                    # Stopped mid-epoch: the checkpoint below resumes from this very step.
                    reason = stopped or "interrupted"
                    break
                self._end_epoch()
                if stopped is not None:
                    reason = stopped
                    break
                if self.early_stopping.should_stop:
                    reason = "early_stopping"
                    break
            last = self.save()
        finally:
            stop_flag.restore()
        self._log({"event": "stop", "reason": reason, "step": self.step, "epoch": self.epoch})
        if self.ctx.is_main:
            plot_loss_curves(self.out_dir / METRICS_FILE, self.out_dir / LOSS_PLOT_FILE)
        logger.info("training stopped (%s) at step %d; checkpoint %s", reason, self.step, last)
        best = self.out_dir / "checkpoints" / BEST_CHECKPOINT
        return TrainResult(
            out_dir=self.out_dir,
            last_checkpoint=last,
            best_checkpoint=best if best.is_file() else None,
            step=self.step,
            epoch=self.epoch,
            stop_reason=reason,
            best_val_loss=self.early_stopping.best,
            initial_val_loss=self.initial_val_loss,
            val_losses=list(self.val_losses),
            train_losses=list(self.train_losses),
            signal=stop_flag.signal,
        )

    def _train_epoch(self, stop_flag: _StopFlag, started: float) -> str | None:
        """Optimizer steps from the current position to the end of the epoch.

        Returns the reason to stop early (``interrupted``, ``time_budget``, ``max_steps``),
        or None when the epoch ran to its end.
        """
        from tqdm import tqdm

        run = self.config.train
        accum = self.config.data.grad_accum_steps
        pairs_per_step = self.config.data.batch_size * accum
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"epoch {self.epoch + 1}/{run.epochs}",
            unit="step",
            disable=not (run.progress and self.ctx.is_main),
            leave=False,
        )
        window_loss, window_steps = 0.0, 0
        window_start = time.perf_counter()
        epoch_loss, epoch_steps = 0.0, 0
        micro, step_loss = 0, 0.0
        stopped: str | None = None
        try:
            for images, texts in self.batches(self.epoch, self.step_in_epoch * accum):
                micro += 1
                loss = self.forward_backward(images, texts, sync=micro == accum)
                step_loss += float(loss) / accum
                if micro < accum:
                    continue
                micro = 0
                # The loss is checked before the step, so a bad batch never reaches the weights.
                mean_loss, nonfinite = self._global_loss(step_loss)
                step_loss = 0.0
                if nonfinite:
                    self._diverged()
                self._optimizer_step()
                self.step += 1
                self.step_in_epoch += 1
                window_loss += mean_loss
                window_steps += 1
                epoch_loss += mean_loss
                epoch_steps += 1
                bar.update(1)
                if self.step % run.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                    elapsed = time.perf_counter() - window_start
                    pairs_s = window_steps * pairs_per_step / max(elapsed, 1e-9)
                    self._log(
                        {
                            "event": "step",
                            "step": self.step,
                            "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch,
                            "loss": window_loss / window_steps,
                            "lr": self.schedule.lr_at(self.step - 1),
                            "pairs_per_s": pairs_s,
                        }
                    )
                    bar.set_postfix(
                        loss=f"{window_loss / window_steps:.4f}", pairs_s=f"{pairs_s:.1f}"
                    )
                    window_loss, window_steps = 0.0, 0
                    window_start = time.perf_counter()
                if self.step_callback is not None:
                    self.step_callback(self.step)
                stopped = self._stop_reason(stop_flag, started)
                if stopped is not None:
                    break
        finally:
            bar.close()
        if epoch_steps:
            self._epoch_loss_sum += epoch_loss
            self._epoch_loss_steps += epoch_steps
        return stopped

    def _stop_reason(self, stop_flag: _StopFlag, started: float) -> str | None:
        """Why to stop after this step, agreed by all processes (they must stop together)."""
        run = self.config.train
        reasons = (
            ("interrupted", stop_flag.signal is not None),
            (
                "time_budget",
                run.time_budget_s is not None and time.monotonic() - started >= run.time_budget_s,
            ),
            ("max_steps", run.max_steps is not None and self.step >= run.max_steps),
        )
        flags = [flag for _, flag in reasons]
        if self.ctx.distributed:
            tensor = torch.tensor(flags, dtype=torch.float32, device=self.ctx.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flags = [bool(v > 0) for v in tensor.tolist()]
        for (name, _), flag in zip(reasons, flags, strict=True):
            if flag:
                return name
        return None

    def _global_loss(self, loss: float) -> tuple[float, bool]:
        """(mean loss over processes, whether any process saw a non-finite loss)."""
        finite = math.isfinite(loss)
        if not self.ctx.distributed:
            return loss, not finite
        flags = torch.tensor(
            [loss if finite else 0.0, 0.0 if finite else 1.0],
            dtype=torch.float64,
            device=self.ctx.device,
        )
        dist.all_reduce(flags)
        return float(flags[0]) / self.ctx.world_size, bool(flags[1] > 0)

    def _end_epoch(self) -> None:
        """Validate, update early stopping and the plateau schedule, log and checkpoint."""
        train_loss = (
            self._epoch_loss_sum / self._epoch_loss_steps if self._epoch_loss_steps else None
        )
        self._epoch_loss_sum, self._epoch_loss_steps = 0.0, 0
        val_loss = self.validate()
        self.epoch += 1
        self.step_in_epoch = 0
        if train_loss is not None:
            self.train_losses.append(train_loss)
        improved = False
        if val_loss is not None:
            self.val_losses.append(val_loss)
            improved = self.early_stopping.update(val_loss)
            self.schedule.on_validation(val_loss)
            if improved:
                self._save_best()
        self._log(
            {
                "event": "epoch",
                "step": self.step,
                "epoch": self.epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "best": improved,
                "lr": self.schedule.lr,
            }
        )
        logger.info(
            "epoch %d: train loss %s, validation loss %s",
            self.epoch,
            "n/a" if train_loss is None else f"{train_loss:.4f}",
            "n/a" if val_loss is None else f"{val_loss:.4f}",
        )
        self.save()

    def _diverged(self) -> None:
        last = self.out_dir / "checkpoints" / LAST_CHECKPOINT
        kept = f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint yet"
        message = (
            f"training loss is NaN or infinite at step {self.step + 1} (epoch {self.epoch + 1}); "
            f"{kept}. Lower optim.lr, set optim.max_grad_norm or use train.precision=fp32, "
            "then resume."
        )
        self._log({"event": "diverged", "step": self.step + 1, "epoch": self.epoch})
        raise TrainingDiverged(message)

    def close(self) -> None:
        """Leave the process group this trainer joined (if it did)."""
        if self.ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- plots


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_loss_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """Training and validation loss against the optimizer step, as a PNG (Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not metrics_path.is_file():
        return None
    records = read_metrics(metrics_path)
    steps = [r for r in records if r.get("event") == "step"]
    epochs = [r for r in records if r.get("event") == "epoch" and r.get("val_loss") is not None]
    if not steps:
        return None
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train")
    if epochs:
        axes.plot(
            [r["step"] for r in epochs],
            [r["val_loss"] for r in epochs],
            marker="o",
            label="validation",
        )
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("ConVIRT loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_path)
    return out_path


# --------------------------------------------------------------------------- entry points


def resume_config(
    checkpoint_path: str | os.PathLike[str], overrides: Sequence[str] = ()
) -> TrainConfig:
    """The config stored in a checkpoint, with ``overrides`` applied on top.

    Only overrides that do not change the data or the model (``train.epochs``,
    ``train.max_steps``, ``train.time_budget_s``, ``optim.lr``, ...) keep the resume exact.
    """
    stored = load_checkpoint(checkpoint_path)["config"]
    return train_config_from_dict(apply_overrides(stored, overrides))


def train(
    config: TrainConfig,
    *,
    resume_from: str | os.PathLike[str] | None = None,
    step_callback: Callable[[int], None] | None = None,
    init_weights: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Run one training job to its end (see :class:`Trainer`)."""
    trainer = Trainer(
        config, resume_from=resume_from, step_callback=step_callback, init_weights=init_weights
    )
    try:
        return trainer.fit()
    finally:
        trainer.close()


def model_from_checkpoint(checkpoint: dict[str, Any]) -> tuple[EncoderModel, TrainConfig]:
    """Rebuild the model stored in a loaded checkpoint (no pretrained weights are read)."""
    from model.convirt import build_encoder

    config = train_config_from_dict(checkpoint["config"])
    model = build_encoder(config.model, pretrained=False)
    model.load_state_dict(checkpoint["model"])
    return model, config
