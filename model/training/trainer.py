"""The ConVIRT trainer: the optimisation loop, checkpoints, resume and the entry points.

Exact resume is designed in rather than bolted on:

- the data side (:mod:`model.training.data`) draws every epoch order, augmentation and
  sentence from the seed and the sample's position alone;
- a checkpoint holds the model, optimizer, schedule, early-stopping and gradient-scaler
  states, the position (epoch, optimizer step within the epoch, global step) and the
  Python/NumPy/torch RNG states (dropout draws from torch's), taken at an optimizer-step
  boundary;
- SIGINT/SIGTERM only raise a flag (:class:`model.training.distributed.StopFlag`); the
  loop saves and leaves at the next step boundary.

Under ``torchrun`` the process set-up is :mod:`model.training.distributed`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from model.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from model.config import InvalidConfigError
from model.towers.image import CHANNELS_LAST_DEVICES
from model.training.config import TrainConfig, dump_train_config, train_config_to_dict
from model.training.data import (
    EpochBatchSampler,
    PairDataset,
    TrainingDataError,
    load_records,
    make_loader,
    split_records,
    spread_image_batches,
)
from model.training.distributed import (
    StopFlag,
    any_process,
    global_loss,
    init_distributed,
    leave_group,
    resolve_precision,
)
from model.training.plots import LOSS_PLOT_FILE, METRICS_FILE, plot_loss_curves
from model.training.regularise import backbone_param_groups, l2sp_for_run
from model.training.result import TrainingDiverged, TrainResult
from model.training.schedule import EarlyStopping, LRSchedule

if TYPE_CHECKING:
    from model.convirt import EncoderModel

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


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
        self.config = config
        self.step_callback = step_callback
        self.ctx = init_distributed(config.train.device)
        self.out_dir = Path(config.train.out_dir)
        self.initial_val_loss: float | None = None
        checkpoint = self._checkpoint_to_resume(resume_from)
        run = config.train
        random.seed(run.seed)
        np.random.seed(run.seed)
        torch.manual_seed(run.seed)
        # The order below is the order of the random draws: keep it, or resume is inexact.
        self._set_up_model(checkpoint, init_weights)
        self._set_up_data()
        self._fit_anchor()
        self._set_up_optimisation(checkpoint)
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
        logger.info(
            "%d training / %d validation pairs; %d trainable parameters; %d steps per epoch; "
            "device %s, autocast %s",
            len(self.train_records),
            len(self.val_records),
            sum(p.numel() for p in self._trainable()),
            self.steps_per_epoch,
            self.ctx.device,
            self.autocast_dtype,
        )

    # ---------------------------------------------------------------- set-up

    def _checkpoint_to_resume(
        self, resume_from: str | os.PathLike[str] | None
    ) -> dict[str, Any] | None:
        """The full checkpoint to continue from, after refusing to overwrite another run."""
        checkpoint = load_checkpoint(resume_from) if resume_from is not None else None
        existing = self.out_dir / "checkpoints" / LAST_CHECKPOINT
        if checkpoint is None and existing.is_file():
            raise InvalidConfigError(
                f"train.out_dir {self.out_dir} already holds a run ({existing}): "
                "resume it or choose another out_dir"
            )
        if checkpoint is not None and "optimizer" not in checkpoint:
            raise InvalidConfigError(
                f"{resume_from} holds weights only; resuming needs {LAST_CHECKPOINT}"
            )
        return checkpoint

    def _set_up_model(
        self,
        checkpoint: dict[str, Any] | None,
        init_weights: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """The model on this process's device (wrapped in DDP when distributed) and the loss."""
        from model.convirt import build_encoder
        from model.loss import ConVIRTLoss

        run = self.config.train
        # Resumed or initial weights replace the pretrained ones: no need to read those.
        given = checkpoint is not None or init_weights is not None
        model = build_encoder(self.config.model, pretrained=False if given else None)
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
        elif init_weights is not None:
            model.load_state_dict(init_weights, strict=True)
        device = self.ctx.device
        self.autocast_dtype, self._use_scaler = resolve_precision(run.precision, device)
        self.channels_last = run.channels_last and device.type in CHANNELS_LAST_DEVICES
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
            self.config.loss.temperature,
            self.config.loss.lambda_,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )

    def _set_up_data(self) -> None:
        """Records, splits, datasets, samplers and loaders of training and validation."""
        config, seed = self.config, self.config.train.seed
        data = config.data
        records = load_records(data.source)
        self.train_records, self.val_records = split_records(records, config)
        # The model knows the normalisation its backbone's weights expect.
        self.eval_transform = self.module.eval_transform()
        self.train_set = PairDataset(
            self.train_records,
            self.module.train_transform(config.augment),
            seed=seed,
            augment=True,
            text_section=data.text_section,
        )
        self.val_set = PairDataset(
            self.val_records,
            self.eval_transform,
            seed=seed,
            augment=False,
            text_section=data.text_section,
        )
        self.steps_per_epoch = len(self.train_records) // data.batch_size // data.grad_accum_steps
        if self.steps_per_epoch < 1:
            raise TrainingDataError(
                f"{len(self.train_records)} training pairs make no optimizer step of "
                f"{data.batch_size} x {data.grad_accum_steps} pairs"
            )
        self.train_sampler = EpochBatchSampler(
            len(self.train_records),
            data.batch_size,
            seed=seed,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            num_batches=self.steps_per_epoch * data.grad_accum_steps,
        )
        self.train_loader = self._loader(self.train_set, self.train_sampler)
        self._set_up_validation()

    def _fit_anchor(self) -> None:
        """Fit a new image anchor on training images; a resumed or initialised one stays."""
        anchor = getattr(self.module, "image_anchor", None)
        settings = self.config.model.anchor
        if anchor is None or settings is None or anchor.is_fitted:
            return
        size = self.config.data.batch_size
        batches = spread_image_batches(
            self.train_records, settings.fit_images, self.eval_transform, size
        )
        anchor.fit(torch.cat([anchor.features(self._to_device(b)).cpu() for b in batches]))

    def _set_up_validation(self) -> None:
        """Validation batches as large as training's (whole per process), if there are two."""
        val_batch = min(self.config.data.batch_size, len(self.val_records))
        val_batch -= val_batch % self.ctx.world_size
        self.val_sampler: EpochBatchSampler | None = None
        self.val_loader: DataLoader[Any] | None = None
        if val_batch < 2:
            logger.warning(
                "only %d validation pairs: no validation loss, no early stopping",
                len(self.val_records),
            )
            return
        self.val_sampler = EpochBatchSampler(
            len(self.val_records),
            val_batch,
            seed=self.config.train.seed,
            shuffle=False,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )
        self.val_loader = self._loader(self.val_set, self.val_sampler, persistent=False)

    def _set_up_optimisation(self, checkpoint: dict[str, Any] | None) -> None:
        """AdamW over the trainable parameters, the LR schedule, early stopping, the scaler."""
        run, optim = self.config.train, self.config.optim
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
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self._use_scaler)
        self._l2sp = l2sp_for_run(self.module, self.config, resumed=checkpoint is not None)

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    # ---------------------------------------------------------------- pieces

    def _loader(
        self, dataset: PairDataset, sampler: EpochBatchSampler, *, persistent: bool = True
    ) -> DataLoader[Any]:
        return make_loader(
            dataset,
            sampler,
            self.config.data,
            seed=self.config.train.seed,
            pin_memory=self.ctx.device.type == "cuda",
            persistent=persistent,
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

    def _log_epoch(self, train_loss: float | None, val_loss: float | None, *, best: bool) -> None:
        self._log(
            {
                "event": "epoch",
                "step": self.step,
                "epoch": self.epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "best": best,
                "lr": self.schedule.lr,
            }
        )

    # ---------------------------------------------------------------- loop

    def fit(self) -> TrainResult:
        """Train until done, stopped or interrupted; returns where and why it stopped."""
        self._start_run()
        stop_flag = StopFlag()
        stop_flag.install()
        self.model.train()
        try:
            reason = self._run_epochs(stop_flag, time.monotonic())
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

    def _start_run(self) -> None:
        """Write the run's config; a fresh run also logs the untrained validation loss."""
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
            self._log_epoch(None, self.initial_val_loss, best=False)

    def _run_epochs(self, stop_flag: StopFlag, started: float) -> str:
        """Epochs from the current position on; returns why they stopped."""
        run = self.config.train
        while self.epoch < run.epochs:
            if run.max_steps is not None and self.step >= run.max_steps:
                return "max_steps"
            stopped = self._train_epoch(stop_flag, started)
            if self.step_in_epoch < self.steps_per_epoch:
                # Stopped mid-epoch: the caller's checkpoint resumes from this very step.
                return stopped or "interrupted"
            self._end_epoch()
            if stopped is not None:
                return stopped
            if self.early_stopping.should_stop:
                return "early_stopping"
        return "completed"

    def _train_epoch(self, stop_flag: StopFlag, started: float) -> str | None:
        """Optimizer steps from the current position to the end of the epoch.

        Returns the reason to stop early (``interrupted``, ``time_budget``, ``max_steps``),
        or None when the epoch ran to its end.
        """
        from tqdm import tqdm

        run = self.config.train
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"epoch {self.epoch + 1}/{run.epochs}",
            unit="step",
            disable=not (run.progress and self.ctx.is_main),
            leave=False,
        )
        window: list[float] = []
        window_start = time.perf_counter()
        epoch_loss, epoch_steps = 0.0, 0
        stopped: str | None = None
        try:
            for mean_loss in self._optimizer_steps():
                window.append(mean_loss)
                epoch_loss += mean_loss
                epoch_steps += 1
                bar.update(1)
                if self.step % run.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                    self._log_steps(window, time.perf_counter() - window_start, bar)
                    window = []
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

    def _optimizer_steps(self) -> Iterator[float]:
        """Take the epoch's remaining optimizer steps; yield each one's loss over all processes."""
        accum = self.config.data.grad_accum_steps
        micro, step_loss = 0, 0.0
        for images, texts in self.batches(self.epoch, self.step_in_epoch * accum):
            micro += 1
            loss = self.forward_backward(images, texts, sync=micro == accum)
            step_loss += float(loss) / accum
            if micro < accum:
                continue
            micro = 0
            # The loss is checked before the step, so a bad batch never reaches the weights.
            mean_loss, nonfinite = global_loss(self.ctx, step_loss)
            step_loss = 0.0
            if nonfinite:
                self._diverged()
            self._optimizer_step()
            self.step += 1
            self.step_in_epoch += 1
            yield mean_loss

    def _log_steps(self, losses: list[float], elapsed: float, bar: Any) -> None:
        """One ``step`` record for the steps since the last one: mean loss and throughput."""
        pairs_per_step = self.config.data.batch_size * self.config.data.grad_accum_steps
        pairs_s = len(losses) * pairs_per_step / max(elapsed, 1e-9)
        mean = sum(losses) / len(losses)
        self._log(
            {
                "event": "step",
                "step": self.step,
                "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch,
                "loss": mean,
                "lr": self.schedule.lr_at(self.step - 1),
                "pairs_per_s": pairs_s,
            }
        )
        bar.set_postfix(loss=f"{mean:.4f}", pairs_s=f"{pairs_s:.1f}")

    def _stop_reason(self, stop_flag: StopFlag, started: float) -> str | None:
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
        flags = any_process(self.ctx, [flag for _, flag in reasons])
        for (name, _), flag in zip(reasons, flags, strict=True):
            if flag:
                return name
        return None

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
        self._log_epoch(train_loss, val_loss, best=improved)
        logger.info(
            "epoch %d: train loss %s, validation loss %s",
            self.epoch,
            "n/a" if train_loss is None else f"{train_loss:.4f}",
            "n/a" if val_loss is None else f"{val_loss:.4f}",
        )
        self.save()

    def _diverged(self) -> None:
        self._log({"event": "diverged", "step": self.step + 1, "epoch": self.epoch})
        last = self.out_dir / "checkpoints" / LAST_CHECKPOINT
        raise TrainingDiverged.at(self.step + 1, self.epoch, last)

    def close(self, *, failed: bool = False) -> None:
        """Leave the process group this trainer joined, unless it failed (see ``leave_group``)."""
        leave_group(self.ctx, failed=failed)


# --------------------------------------------------------------------------- entry points


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
        result = trainer.fit()
    except BaseException:
        trainer.close(failed=True)
        raise
    trainer.close()
    return result
