"""Learning-rate schedule and early stopping for the trainer.

Both are small state machines with ``state_dict``/``load_state_dict`` so that a resumed run
continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch

from model.errors import ModelError

logger = logging.getLogger(__name__)

ScheduleKind = Literal["cosine", "plateau", "constant"]


class LRSchedule:
    """Linear warmup, then a cosine decay per optimizer step or a reduce-on-plateau per epoch.

    The learning rate of optimizer step ``s`` (0-based) is ``base_lr * (s + 1) / warmup_steps``
    during warmup, so the very first step already moves the weights. After warmup, ``cosine``
    decays from ``base_lr`` to ``base_lr * min_lr_ratio`` at ``total_steps``; ``plateau``
    multiplies a scale by ``plateau_factor`` whenever the validation loss has not improved for
    ``plateau_patience`` validations; ``constant`` keeps ``base_lr``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        base_lr: float,
        kind: ScheduleKind = "cosine",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        plateau_factor: float = 0.5,
        plateau_patience: int = 1,
        plateau_threshold: float = 1e-4,
        min_lr: float = 0.0,
    ) -> None:
        if kind == "cosine" and (total_steps is None or total_steps <= 0):
            raise ModelError("a cosine schedule needs total_steps > 0", code="invalid_config")
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.kind: ScheduleKind = kind
        self.warmup_steps = max(0, warmup_steps)
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.plateau_factor = plateau_factor
        self.plateau_patience = plateau_patience
        self.plateau_threshold = plateau_threshold
        self.min_lr = min_lr
        # Mutable state, saved in checkpoints.
        self.step_count = 0
        self.plateau_scale = 1.0
        self.plateau_best: float | None = None
        self.plateau_bad_epochs = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            assert self.total_steps is not None
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            ratio = self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (
                1.0 + math.cos(math.pi * progress)
            )
            return self.base_lr * ratio
        if self.kind == "plateau":
            return max(self.min_lr, self.base_lr * self.plateau_scale)
        return self.base_lr

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return self.lr_at(self.step_count)

    def step(self) -> None:
        """Advance by one optimizer step and set the next step's learning rate."""
        self.step_count += 1
        self._apply()

    def on_validation(self, val_loss: float) -> None:
        """Feed one validation loss (per epoch); only ``plateau`` reacts to it."""
        if self.kind != "plateau":
            return
        if self.plateau_best is None or val_loss < self.plateau_best - self.plateau_threshold:
            self.plateau_best = val_loss
            self.plateau_bad_epochs = 0
            return
        self.plateau_bad_epochs += 1
        if self.plateau_bad_epochs >= self.plateau_patience:
            self.plateau_scale *= self.plateau_factor
            self.plateau_bad_epochs = 0
            logger.info("validation loss plateaued: learning rate now %.3g", self.lr)
            self._apply()

    def _apply(self) -> None:
        lr = self.lr
        for group in self.optimizer.param_groups:
            # A group may run at a fraction of the rate, or stand still for its first steps
            # (the image backbone while the heads learn; see OptimConfig).
            frozen = self.step_count < group.get("frozen_steps", 0)
            group["lr"] = 0.0 if frozen else lr * group.get("lr_scale", 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step_count": self.step_count,
            "plateau_scale": self.plateau_scale,
            "plateau_best": self.plateau_best,
            "plateau_bad_epochs": self.plateau_bad_epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.plateau_scale = float(state["plateau_scale"])
        best = state["plateau_best"]
        self.plateau_best = None if best is None else float(best)
        self.plateau_bad_epochs = int(state["plateau_bad_epochs"])
        self._apply()


class EarlyStopping:
    """Stop when the validation loss has not improved by ``min_delta`` for ``patience`` epochs.

    ``patience <= 0`` disables stopping; the best loss is still tracked (it decides which
    checkpoint is the best one).
    """

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.bad_epochs = 0

    def update(self, val_loss: float) -> bool:
        """Record one validation loss; return True when it is a new best."""
        if self.best is None or val_loss < self.best - self.min_delta:
            self.best = val_loss
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state["best"]
        self.best = None if best is None else float(best)
        self.bad_epochs = int(state["bad_epochs"])
