"""One data-parallel gradient computation, run by ``test_ddp.py`` under ``torchrun`` (or alone).

Usage: ``python ddp_worker.py OUT MANIFEST TOWERS_DIR RUN_DIR``. Builds the trainer on the
tiny towers (joining the process group that ``torchrun`` describes, if any), takes the
first global batch of epoch 0, runs one forward/backward through the trainer, and has rank
0 save the loss averaged over processes and the gradients (after DDP's all-reduce) to OUT.

The model runs in eval mode: dropout draws and BatchNorm batch statistics differ between
one process of 8 samples and two of 4 by construction (SyncBatchNorm is CUDA-only), and
they are not what this check is about; gradients flow the same in eval mode.

A worker that is still running ``DDP_WORKER_DEADLINE_S`` seconds after it started prints
every thread's stack to stderr and exits, so that a hang in gloo reaches the test as a
failure with its stacks instead of as a silent timeout.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(out: str, manifest: str, towers_dir: str, run_dir: str) -> None:
    deadline = float(os.environ.get("DDP_WORKER_DEADLINE_S", "0"))
    if deadline > 0:
        faulthandler.dump_traceback_later(deadline, exit=True)
    import torch
    import torch.distributed as dist

    from model.training.trainer import Trainer
    from tests.model.trainer_support import make_tiny_towers, tiny_config

    towers = make_tiny_towers(Path(towers_dir))
    trainer = Trainer(tiny_config(Path(manifest), Path(run_dir), towers))
    try:
        trainer.model.eval()
        images, texts = next(iter(trainer.batches(0)))
        loss = trainer.forward_backward(images, texts)
        world = trainer.ctx.world_size
        if world > 1:
            dist.all_reduce(loss)
            loss = loss / world
        grads = {
            name: param.grad.detach().clone()
            for name, param in trainer.module.named_parameters()
            if param.grad is not None
        }
        if trainer.ctx.is_main:
            # Written whole or not at all: the test reads it even when teardown fails.
            partial = Path(out).with_suffix(".partial")
            torch.save(
                {
                    "loss": float(loss),
                    "grads": grads,
                    "world_size": world,
                    "local_batch": len(texts),
                    "global_batch": trainer.train_sampler.global_batch(0, 0),
                },
                partial,
            )
            partial.replace(out)
        if world > 1:
            # Leave the group together: gloo aborts a process torn down mid-collective.
            dist.barrier()
    finally:
        trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
