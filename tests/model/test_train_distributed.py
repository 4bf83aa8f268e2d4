"""A single process's side of the distributed helpers: devices, precision, agreement."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import InvalidConfigError
from model.training.distributed import (
    DistContext,
    any_process,
    global_loss,
    resolve_device,
    resolve_precision,
)

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
