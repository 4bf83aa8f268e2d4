"""A single process's side of the distributed helpers: devices, precision, agreement."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.distributed as dist

import model.training.trainer as trainer_module
from model.config import InvalidConfigError
from model.training.distributed import (
    DistContext,
    any_process,
    global_loss,
    resolve_device,
    resolve_precision,
)
from model.training.result import TrainingDiverged
from model.training.trainer import Trainer, train

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_group=False)


def test_precision_follows_the_device() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == (None, False)
    assert resolve_precision("fp32", cpu) == (None, False)
    assert resolve_precision("bf16", cpu) == (torch.bfloat16, False)
    with pytest.raises(InvalidConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)


def test_devices_resolve_or_are_refused() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(InvalidConfigError, match="CUDA is absent"):
            resolve_device("cuda")


def test_one_process_agrees_with_itself() -> None:
    assert CPU.is_main
    assert not CPU.distributed
    assert any_process(CPU, [False, True, False]) == [False, True, False]
    assert global_loss(CPU, 2.5) == (2.5, False)
    mean, nonfinite = global_loss(CPU, math.nan)
    assert nonfinite
    assert math.isnan(mean)
    assert global_loss(CPU, math.inf)[1]


def _trainer_that(monkeypatch: pytest.MonkeyPatch, fit: Callable[[], object]) -> None:
    """Make ``train()`` build a trainer that owns the process group and whose fit is ``fit``."""
    trainer = Trainer.__new__(Trainer)
    trainer.ctx = DistContext(0, 1, 0, torch.device("cpu"), owns_group=True)
    monkeypatch.setattr(trainer, "fit", fit)
    monkeypatch.setattr(trainer_module, "Trainer", lambda *args, **kwargs: trainer)


def test_a_failed_process_leaves_its_group_to_the_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real (one-process) gloo group: whether train() tears it down is what is checked.
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:

        def diverge() -> object:
            raise TrainingDiverged("training loss is NaN")

        _trainer_that(monkeypatch, diverge)
        with pytest.raises(TrainingDiverged):
            train(cast(Any, None))
        # Peers of a failed process may sit in a collective it will never join; tearing
        # the group down could hang instead of letting torchrun stop them.
        assert dist.is_initialized()

        _trainer_that(monkeypatch, lambda: "finished")
        assert cast(object, train(cast(Any, None))) == "finished"
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
