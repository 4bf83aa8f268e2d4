"""The learning-rate schedule and early stopping, on small hand-checked cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from model.errors import ModelError
from model.training.schedule import EarlyStopping, LRSchedule


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(schedule: LRSchedule, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(schedule.optimizer.param_groups[0]["lr"])
        schedule.step()
    return seen


def test_warmup_is_linear_then_cosine_reaches_the_floor() -> None:
    schedule = LRSchedule(
        _optimizer(), base_lr=1.0, kind="cosine", warmup_steps=4, total_steps=12, min_lr_ratio=0.1
    )
    lrs = _lrs(schedule, 14)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    # Halfway through the decay the cosine sits at the mean of peak and floor.
    assert lrs[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[12] == pytest.approx(0.1)
    assert lrs[13] == pytest.approx(0.1)  # past the end it stays at the floor


def test_cosine_without_total_steps_is_refused() -> None:
    with pytest.raises(ModelError) as info:
        LRSchedule(_optimizer(), base_lr=1.0, kind="cosine", total_steps=None)
    assert info.value.code == "invalid_config"


def test_plateau_cuts_the_rate_after_patience_validations() -> None:
    schedule = LRSchedule(
        _optimizer(), base_lr=1.0, kind="plateau", plateau_factor=0.5, plateau_patience=2
    )
    for loss in (3.0, 2.0, 2.5):  # improving, improving, one bad epoch
        schedule.on_validation(loss)
    assert schedule.lr == pytest.approx(1.0)
    schedule.on_validation(2.1)  # second bad epoch in a row: cut
    assert schedule.lr == pytest.approx(0.5)
    assert schedule.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    schedule.on_validation(1.0)  # improvement resets the count
    schedule.on_validation(1.5)
    assert schedule.lr == pytest.approx(0.5)


def test_warmup_applies_to_plateau_too() -> None:
    schedule = LRSchedule(_optimizer(), base_lr=2.0, kind="plateau", warmup_steps=2)
    assert _lrs(schedule, 3) == pytest.approx([1.0, 2.0, 2.0])


def test_schedule_state_round_trips() -> None:
    first = LRSchedule(_optimizer(), base_lr=1.0, kind="plateau", plateau_patience=1)
    for loss in (1.0, 2.0, 3.0):
        first.on_validation(loss)
    first.step()
    second = LRSchedule(_optimizer(), base_lr=1.0, kind="plateau", plateau_patience=1)
    second.load_state_dict(first.state_dict())
    assert second.lr == pytest.approx(first.lr) == pytest.approx(0.25)
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx(0.25)


def test_early_stopping_counts_epochs_without_improvement() -> None:
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    assert stopper.update(1.0) is True
    assert stopper.update(0.995) is False  # below min_delta: not an improvement
    assert not stopper.should_stop
    assert stopper.update(0.5) is True
    assert stopper.update(0.6) is False
    assert stopper.update(0.7) is False
    assert stopper.should_stop
    assert stopper.best == pytest.approx(0.5)


def test_early_stopping_disabled_with_zero_patience() -> None:
    stopper = EarlyStopping(patience=0)
    for loss in (1.0, 2.0, 3.0, 4.0):
        stopper.update(loss)
    assert not stopper.should_stop
    restored = EarlyStopping(patience=0)
    restored.load_state_dict(stopper.state_dict())
    assert restored.best == 1.0
    assert restored.bad_epochs == 3
