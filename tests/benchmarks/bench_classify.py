"""Latency of POST /classify against POST /search/image on the same uploaded image.

Run as a script (``python tests/benchmarks/bench_classify.py --bundle DIR --manifest
FILE``); it prints one JSON object. The first ``--images`` records of the labelled
manifest are ingested (with their labels, so the k-NN second opinion has voters), then
``convirt serve`` runs as a subprocess (real uvicorn on 127.0.0.1) and one client sends
the same multipart upload of a held-out image to ``/search/image`` (k = the service's
``classify_knn_k``) and to ``/classify``, alternating in ``--rounds`` blocks so that
background load on a shared machine hits both alike. Reported: p50/p99 latency (ms) per
endpoint, the /classify ÷ /search/image p50 ratio (goal ≤ 1.2) and the load average
before and after. A classify request does the search's work (decode, encode, index
search) plus the prompt probabilities (a (1, D) × (D, C) product, the prompt embeddings
being cached after the first request) and a wider neighbour search that skips unlabelled
images.

Without ``--bundle`` one is exported like the tests' (pretrained towers, untrained
heads); without ``--manifest`` a synthetic corpus is generated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx  # noqa: E402

from app.commands.ingest import discover, ingest_sources  # noqa: E402
from app.services.runtime import Runtime  # noqa: E402
from app.settings import Settings  # noqa: E402
from model.bundle import EncoderBundle  # noqa: E402
from tests.benchmarks.bench_service import (  # noqa: E402
    _percentiles,
    _run_block,
    start_server,
    stop_server,
)

WARMUP = 3


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def bench(base: str, png: bytes, *, k: int, requests: int, rounds: int) -> dict[str, Any]:
    client = httpx.Client(base_url=base, timeout=120)
    files = {"file": ("query.png", png, "image/png")}

    def search() -> None:
        response = client.post("/search/image", files=files, data={"k": str(k)})
        response.raise_for_status()

    def classify() -> None:
        response = client.post("/classify", files=files)
        response.raise_for_status()

    for _ in range(WARMUP):
        search()
        classify()
    per_block = max(1, requests // rounds)
    samples: dict[str, list[float]] = {"search_image": [], "classify": []}
    for _ in range(rounds):
        for name, call in (("search_image", search), ("classify", classify)):
            latencies, _ = _run_block(call, 1, per_block)
            samples[name].extend(latencies)
    answer = client.post("/classify", files=files).json()
    client.close()
    out: dict[str, Any] = {
        name: {**_percentiles(values), "requests": len(values)} for name, values in samples.items()
    }
    out["p50_ratio"] = round(out["classify"]["p50_ms"] / out["search_image"]["p50_ms"], 3)
    out["voters_per_finding"] = sorted({f["knn"]["neighbours"] for f in answer["findings"]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="encoder bundle (default: build one)")
    parser.add_argument("--manifest", type=Path, help="labelled manifest (default: synthetic)")
    parser.add_argument("--images", type=int, default=300, help="records to ingest")
    parser.add_argument("--requests", type=int, default=100, help="requests per endpoint")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the endpoints")
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: temp)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-classify-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bundle_dir = args.bundle
        if bundle_dir is None:
            from tests.app.service_support import build_bundle

            bundle_dir = build_bundle(work / "bundle-build")
        manifest = args.manifest
        if manifest is None:
            from model.data.synthetic import generate_corpus

            manifest = generate_corpus(work / "corpus", args.images + 1, progress=False)
        sources = discover(manifest)
        stored, query = sources[: args.images], sources[args.images % len(sources)]
        settings = Settings(data_dir=work / "data", bundle_dir=bundle_dir)
        bundle = EncoderBundle.load(bundle_dir, device="cpu")
        runtime = Runtime.start(settings, bundle=bundle)
        try:
            counts = ingest_sources(runtime, stored, batch_size=16, progress=False)
            runtime.index.save_if_dirty()
        finally:
            runtime.close()
        load_before = _load()
        process, base = start_server(settings, work / "server.log")
        try:
            figures = bench(
                base,
                query.path.read_bytes(),
                k=settings.classify_knn_k,
                requests=args.requests,
                rounds=args.rounds,
            )
        finally:
            stop_server(process)

    import torch

    report = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "bundle": str(bundle_dir),
        "model_id": bundle.model_id,
        "stored_images": counts["created"] + counts["existing"],
        "load_average_before": load_before,
        "load_average_after": _load(),
        **figures,
        "goals": {"classify_p50_le_1.2x_search_image": figures["p50_ratio"] <= 1.2},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
