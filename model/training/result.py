"""What a training run ends with: its result, and the error of a run that diverged."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from model.errors import ModelError


class TrainingDiverged(ModelError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""

    code = "training_diverged"

    @classmethod
    def at(cls, step: int, epoch: int, last_checkpoint: Path) -> TrainingDiverged:
        """The error for a loss that went bad at 1-based ``step`` of 0-based ``epoch``."""
        kept = (
            f"the last good checkpoint {last_checkpoint} is kept"
            if last_checkpoint.is_file()
            else "no checkpoint yet"
        )
        return cls(
            f"training loss is NaN or infinite at step {step} (epoch {epoch + 1}); {kept}. "
            "Lower optim.lr, set optim.max_grad_norm or use train.precision=fp32, then resume."
        )


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
