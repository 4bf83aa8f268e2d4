"""Where a training process runs: its rank and device under ``torchrun``, its numeric
precision, and how it reacts to SIGINT/SIGTERM.

Under ``torchrun`` every process takes its contiguous slice of each global batch, the
loss gathers the embeddings of all processes (:class:`model.loss.ConVIRTLoss`), and DDP
averages the gradients, which equals the single-process gradient on the global batch.
SIGINT/SIGTERM only raise a flag (:class:`StopFlag`); the trainer saves and leaves at the
next step boundary.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from model.config import InvalidConfigError

logger = logging.getLogger(__name__)


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


def any_process(ctx: DistContext, flags: list[bool]) -> list[bool]:
    """Each flag, raised if any process raised it: the processes must stop together."""
    if not ctx.distributed:
        return flags
    tensor = torch.tensor(flags, dtype=torch.float32, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in tensor.tolist()]


def global_loss(ctx: DistContext, loss: float) -> tuple[float, bool]:
    """(mean loss over processes, whether any process saw a non-finite loss)."""
    finite = math.isfinite(loss)
    if not ctx.distributed:
        return loss, not finite
    flags = torch.tensor(
        [loss if finite else 0.0, 0.0 if finite else 1.0],
        dtype=torch.float64,
        device=ctx.device,
    )
    dist.all_reduce(flags)
    return float(flags[0]) / ctx.world_size, bool(flags[1] > 0)


class StopFlag:
    """SIGINT/SIGTERM handler: the first signal asks for a clean stop, a second one aborts."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        # Signal handlers can only be set from the main thread of the main interpreter.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signal is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning(
            "%s received: saving a checkpoint at the end of this step (again to abort)",
            signal.Signals(signum).name,
        )


def leave_group(ctx: DistContext, *, failed: bool) -> None:
    """Destroy the process group ``ctx`` joined (if it did), after a successful run only.

    After a failure the group is left alone: the other processes may be waiting in a
    collective that this one will never join, and tearing the group down then can hang
    (pytorch/pytorch#75097), which would keep this process from exiting and the launcher
    from stopping the rest. The process is about to exit anyway.
    """
    if not (ctx.owns_group and dist.is_initialized()):
        return
    if failed:
        logger.warning(
            "process %d of %d failed; leaving its process group to the launcher",
            ctx.rank,
            ctx.world_size,
        )
        return
    dist.destroy_process_group()
