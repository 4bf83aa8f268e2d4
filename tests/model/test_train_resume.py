"""Exact resume after SIGINT (mid-epoch and at an epoch boundary), and the NaN guard."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.training.config import resume_config
from model.training.plots import read_metrics
from model.training.result import TrainingDiverged, TrainResult
from model.training.trainer import train
from tests.model.trainer_support import tiny_config

# 54 training pairs of the 64-study corpus, batches of 8: 6 optimizer steps per epoch.
STEPS_PER_EPOCH = 6


@pytest.fixture(scope="module")
def uninterrupted(
    corpus: Path, towers: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> TrainResult:
    # Augmentation, sentence sampling and dropout all on: each must replay exactly.
    out = tmp_path_factory.mktemp("straight")
    return train(tiny_config(corpus, out, towers, "train.epochs=2"))


def _sigint_at(step: int) -> object:
    def callback(current: int) -> None:
        if current == step:
            os.kill(os.getpid(), signal.SIGINT)

    return callback


@pytest.mark.slow
@pytest.mark.parametrize("stop_step", [4, STEPS_PER_EPOCH], ids=["mid-epoch", "epoch-boundary"])
def test_an_interrupted_run_resumes_exactly(
    corpus: Path,
    towers: tuple[Path, Path],
    tmp_path: Path,
    uninterrupted: TrainResult,
    stop_step: int,
) -> None:
    config = tiny_config(corpus, tmp_path / "run", towers, "train.epochs=2")
    # Python's own handler, or SIG_IGN when the suite runs in a background job.
    before = signal.getsignal(signal.SIGINT)
    first = train(config, step_callback=_sigint_at(stop_step))  # type: ignore[arg-type]
    assert first.stop_reason == "interrupted"
    assert first.signal == signal.SIGINT
    assert first.step == stop_step
    # The trainer's handler is gone once training returns: SIGINT is as it was.
    assert signal.getsignal(signal.SIGINT) is before

    # Resume with DataLoader workers: batches must not depend on who loads them.
    resumed_config = resume_config(first.last_checkpoint, ["data.num_workers=2"])
    second = train(resumed_config, resume_from=first.last_checkpoint)
    assert second.stop_reason == "completed"
    assert second.step == uninterrupted.step == 2 * STEPS_PER_EPOCH

    expected = load_checkpoint(uninterrupted.last_checkpoint)
    actual = load_checkpoint(second.last_checkpoint)
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(actual["model"][name], tensor, rtol=1e-6, atol=1e-7)
    assert second.train_losses == pytest.approx(uninterrupted.train_losses, rel=1e-6)
    assert second.val_losses == pytest.approx(uninterrupted.val_losses, rel=1e-6)
    assert second.best_val_loss == pytest.approx(uninterrupted.best_val_loss, rel=1e-6)

    def step_losses(run: Path) -> dict[int, float]:
        records = read_metrics(run / "metrics.jsonl")
        return {r["step"]: r["loss"] for r in records if r["event"] == "step"}

    # One metrics file across the interruption, every step logged once, same values.
    resumed_log = step_losses(tmp_path / "run")
    assert sorted(resumed_log) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert resumed_log == pytest.approx(step_losses(uninterrupted.out_dir), rel=1e-6)


@pytest.mark.slow
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(
    corpus: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    first = train(tiny_config(corpus, tmp_path / "run", towers, "train.epochs=1"))
    good = load_checkpoint(first.last_checkpoint)
    assert good["progress"]["step"] == STEPS_PER_EPOCH
    # An absurd learning rate overflows the weights within a step or two.
    config = resume_config(first.last_checkpoint, ["train.epochs=3", "optim.lr=1e30"])
    with pytest.raises(TrainingDiverged) as info:
        train(config, resume_from=first.last_checkpoint)
    assert info.value.code == "training_diverged"
    assert "NaN or infinite" in str(info.value)
    assert str(first.last_checkpoint) in str(info.value)
    kept = load_checkpoint(first.last_checkpoint)
    assert kept["progress"]["step"] == STEPS_PER_EPOCH
    for name, tensor in good["model"].items():
        assert torch.equal(kept["model"][name], tensor)
        assert torch.isfinite(tensor).all() or not tensor.is_floating_point()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["event"] == "diverged"
