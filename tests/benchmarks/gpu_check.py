"""CUDA check of the trainer: autocast, channels_last and throughput; prints one JSON object.

Run on a machine with a GPU (it exits with status 2 without one)::

    python tests/benchmarks/gpu_check.py                      # 300 steps of cpu-small
    python tests/benchmarks/gpu_check.py --precision fp16     # GradScaler path
    python tests/benchmarks/gpu_check.py --steps 100 model.image.pretrained=false

It trains the small config for ``--steps`` optimizer steps on a synthetic corpus with the
trainer's CUDA path (bf16 autocast by default, channels_last, pinned memory, DataLoader
workers), checks that the path is really taken (autocast dtype, channels_last conv weights,
finite and falling loss), exports a bundle and times ``encode_images`` on the GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from model.bundle import EncoderBundle, export_bundle  # noqa: E402
from model.data.manifest import read_manifest  # noqa: E402
from model.data.synthetic import generate_corpus  # noqa: E402
from model.inputs.decode import decode_file  # noqa: E402
from model.training.config import load_train_config  # noqa: E402
from model.training.plots import read_metrics  # noqa: E402
from model.training.trainer import Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="cpu-small")
    parser.add_argument("--corpus", type=Path, help="synthetic corpus dir (default: a new one)")
    parser.add_argument("--studies", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--out", type=Path, help="run directory (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="extra key.path=value overrides")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_check", "error": "CUDA is not available"}))
        raise SystemExit(2)

    work = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if args.corpus is not None:
        manifest = args.corpus / "manifest.csv"
    else:
        manifest = generate_corpus(work / "corpus", args.studies, seed=21, progress=False)
    config = load_train_config(
        args.config,
        [
            f"data.source={manifest}",
            f"data.batch_size={args.batch_size}",
            f"data.num_workers={args.workers}",
            "data.pin_memory=true",
            f"train.precision={args.precision}",
            "train.channels_last=true",
            "train.device=auto",
            f"train.max_steps={args.steps}",
            "train.epochs=1000",
            "train.early_stopping_patience=0",
            "train.progress=false",
            "train.log_every=10",
            f"train.out_dir={work / 'run'}",
            *args.overrides,
        ],
    )
    stamps: list[float] = []

    def on_step(_: int) -> None:
        stamps.append(time.perf_counter())

    trainer = Trainer(config, step_callback=on_step)
    conv_weights = [m.weight for m in trainer.module.modules() if isinstance(m, torch.nn.Conv2d)]
    channels_last = bool(conv_weights) and all(
        w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights if w.ndim == 4
    )
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    wall = time.perf_counter() - started
    # Steady state: skip the first 10 steps (worker start-up, cuDNN autotuning).
    gaps = [b - a for a, b in itertools.pairwise(stamps)][10:]
    batch = config.data.batch_size * config.data.grad_accum_steps
    records = read_metrics(work / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["event"] == "step"]

    bundle = EncoderBundle.load(export_bundle(result.last_checkpoint, work / "bundle"))
    arrays = [decode_file(r.image_path).pixels for r in read_manifest(manifest)[:256]]
    bundle.encode_images(arrays[:64], batch_size=64)  # warm-up
    torch.cuda.synchronize()
    encode_started = time.perf_counter()
    vectors = bundle.encode_images(arrays, batch_size=64)
    torch.cuda.synchronize()
    encode_s = time.perf_counter() - encode_started

    report: dict[str, Any] = {
        "benchmark": "gpu_check",
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "config": args.config,
        "precision": args.precision,
        "autocast_dtype": str(trainer.autocast_dtype),
        "grad_scaler": trainer.scaler.is_enabled(),
        "channels_last_weights": channels_last,
        "batch_size": batch,
        "input_size": config.model.image.input_size,
        "num_workers": config.data.num_workers,
        "steps": result.step,
        "stop_reason": result.stop_reason,
        "wall_s": round(wall, 1),
        "pairs_per_s_median": round(batch / statistics.median(gaps), 1) if gaps else None,
        "pairs_per_s_overall": round(batch * result.step / wall, 1),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        # Each logged loss is the mean over log_every (10) steps.
        "loss_first_logged": round(losses[0], 4) if losses else None,
        "loss_last_logged": round(losses[-1], 4) if losses else None,
        "losses_finite": all(math.isfinite(value) for value in losses),
        "val_losses": [round(v, 4) for v in result.val_losses],
        "encode_images_per_s": round(len(arrays) / encode_s, 1),
        "encode_shape": list(vectors.shape),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
