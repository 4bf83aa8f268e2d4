"""Trainer and bundle throughput against the bare towers; prints one JSON object.

Run as a script: ``python tests/benchmarks/bench_train.py [--steps 8] [--workers 2]``.

- ``train``: pairs/s of the real training loop (decode, augment, sentence sampling,
  DataLoader workers, tokenization, forward, loss, backward, AdamW) on a synthetic corpus,
  against pairs/s of the same model doing forward + loss + backward + AdamW on tensors
  already in memory. The ratio says whether the input pipeline holds the model back
  (goal >= 0.8).
- ``encode``: images/s of ``EncoderBundle.encode_images`` on decoded arrays (eval transform
  included), against the bare image tower's forward on ready tensors (goal >= 0.9).

Timings skip the first steps (warm-up: worker start, allocator, first-call overheads) and
use the median of the timed steps, so one stall of a shared machine does not dominate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.bundle import EncoderBundle, export_bundle  # noqa: E402
from model.convirt import build_model  # noqa: E402
from model.data.manifest import read_manifest  # noqa: E402
from model.data.synthetic import generate_corpus  # noqa: E402
from model.inputs.decode import decode_file  # noqa: E402
from model.inputs.reports import sample_sentence  # noqa: E402
from model.loss import ConVIRTLoss  # noqa: E402
from model.training.config import TrainConfig, load_train_config  # noqa: E402
from model.training.trainer import Trainer  # noqa: E402


def bare_training(config: TrainConfig, texts: list[str], steps: int, warmup: int) -> list[float]:
    """Seconds per step of forward + loss + backward + AdamW on tensors already in memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(config.model).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = ConVIRTLoss(config.loss.temperature, config.loss.lambda_)
    size = config.model.image.input_size
    batch = config.data.batch_size
    images = torch.randn(batch, 3, size, size, device=device)  # (B, 3, S, S)
    tokens = {k: v.to(device) for k, v in model.tokenize(texts[:batch]).items()}  # (B, T)
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        image_emb, text_emb = model(images, tokens)  # (B, D) each
        loss = loss_fn(image_emb, text_emb)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return times


def pipeline_training(config: TrainConfig, steps: int, warmup: int) -> list[float]:
    """Seconds per optimizer step of the real trainer, between consecutive step ends."""
    stamps: list[float] = []
    trainer = Trainer(config, step_callback=lambda _: stamps.append(time.perf_counter()))
    try:
        trainer.fit()
    finally:
        trainer.close()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return gaps[max(0, warmup - 1) :][:steps]


def encode_rates(
    bundle_dir: Path, arrays: list[np.ndarray], batch: int, repeats: int
) -> dict[str, float]:
    bundle = EncoderBundle.load(bundle_dir)
    bundle.encode_images(arrays[:batch], batch_size=batch)  # warm-up
    pipeline = []
    for _ in range(repeats):
        started = time.perf_counter()
        bundle.encode_images(arrays, batch_size=batch)
        pipeline.append(time.perf_counter() - started)
    ready = bundle.preprocessing.stack(arrays[:batch]).to(bundle.device)  # (B, 3, S, S)
    bare = []
    with torch.inference_mode():
        bundle.model.encode_image(ready)
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(len(arrays) // batch):
                bundle.model.encode_image(ready)
            if bundle.device.type == "cuda":
                torch.cuda.synchronize()
            timed = len(arrays) // batch * batch
            bare.append((time.perf_counter() - started) * len(arrays) / timed)
    return {
        "bundle_images_per_s": len(arrays) / statistics.median(pipeline),
        "bare_images_per_s": len(arrays) / statistics.median(bare),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="cpu-small")
    parser.add_argument("--corpus", type=Path, help="synthetic corpus dir (default: a new one)")
    parser.add_argument("--studies", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--encode-images", type=int, default=128)
    parser.add_argument("overrides", nargs="*", help="extra key.path=value overrides")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    if args.corpus is not None:
        manifest = args.corpus / "manifest.csv"
    else:
        manifest = generate_corpus(work / "corpus", args.studies, seed=11, progress=False)
    config = load_train_config(
        args.config,
        [
            f"data.source={manifest}",
            f"data.batch_size={args.batch_size}",
            f"data.num_workers={args.workers}",
            f"train.max_steps={args.warmup + args.steps + 1}",
            "train.progress=false",
            "train.log_every=1000",
            f"train.out_dir={work / 'run'}",
            *args.overrides,
        ],
    )
    records = read_manifest(manifest)
    rng = random.Random(0)
    texts = [sample_sentence(r.report, rng) for r in records]

    bare = bare_training(config, texts, args.steps, args.warmup)
    real = pipeline_training(config, args.steps, args.warmup)
    batch = config.data.batch_size
    bare_rate = batch / statistics.median(bare)
    real_rate = batch / statistics.median(real)

    bundle_dir = export_bundle(work / "run" / "checkpoints" / "last.pt", work / "bundle")
    arrays = [decode_file(r.image_path).pixels for r in records[: args.encode_images]]
    encode = encode_rates(bundle_dir, arrays, batch, repeats=3)

    result: dict[str, Any] = {
        "benchmark": "train",
        "config": args.config,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "batch_size": batch,
        "input_size": config.model.image.input_size,
        "num_workers": config.data.num_workers,
        "timed_steps": len(real),
        "train": {
            "pipeline_pairs_per_s": round(real_rate, 3),
            "bare_pairs_per_s": round(bare_rate, 3),
            "ratio": round(real_rate / bare_rate, 3),
            "goal": 0.8,
        },
        "encode": {
            "bundle_images_per_s": round(encode["bundle_images_per_s"], 2),
            "bare_images_per_s": round(encode["bare_images_per_s"], 2),
            "ratio": round(encode["bundle_images_per_s"] / encode["bare_images_per_s"], 3),
            "goal": 0.9,
        },
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
