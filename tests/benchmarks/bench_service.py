"""Service throughput: search latency over HTTP vs in-process, and bulk ingest vs encoding.

Run as a script (``python tests/benchmarks/bench_service.py``); it prints one JSON object.

Search. The database is filled with ``--vectors`` image rows (100k by default) whose
vectors are random unit vectors, written by a bulk insert (rows and embeddings, one shared
placeholder PNG); the service's start-up reconcile builds its index from them, exactly as
for real rows. A Flat index's search cost does not depend on what the vectors are, so the
latency is that of a 100k-image collection. ``convirt serve`` then runs as a subprocess
(real uvicorn on 127.0.0.1) and ``--requests`` requests per case are sent by 1 and by 8
concurrent clients (threads, one keep-alive connection each) to ``/search/text`` and to
``/search/image`` (a multipart upload of a synthetic radiograph). The same work done
in-process (bundle encode + index search on the saved index; decode first for images) is
timed the same way, alternating with the HTTP requests in ``--rounds`` blocks so that
background load on a shared machine hits both alike. Reported: p50/p99 latency (ms),
requests/s, and the HTTP/in-process p50 ratio (goal at 1 client: ≤ 1.3).

Ingest. ``--ingest-images`` synthetic radiographs are ingested with the code behind
``convirt ingest`` (decode, quantise, PNG + thumbnail, one transaction per batch, index
add), bundle already loaded, and compared with ``bundle.encode_images`` alone on the same
decoded pixels and batch size (goal: ingest ≥ 0.8× encode-only images/s).

The bundle is ``--bundle`` or, if omitted, one exported like the tests' (pretrained
towers, untrained heads): weights do not change inference cost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from app.commands.ingest import discover, ingest_sources  # noqa: E402
from app.db import create_engine_for, session_factory, upgrade_database  # noqa: E402
from app.models import Embedding, Image  # noqa: E402
from app.services.reconcile import register_model  # noqa: E402
from app.services.runtime import Runtime  # noqa: E402
from app.services.store import ImageStore  # noqa: E402
from app.settings import Settings  # noqa: E402
from index import VectorIndex  # noqa: E402
from model.bundle import EncoderBundle  # noqa: E402
from model.data.synthetic import generate_corpus  # noqa: E402
from model.inputs.decode import decode_image  # noqa: E402
from tests.app.process_support import free_port  # noqa: E402

TEXT_QUERY = "small left pleural effusion with blunting of the costophrenic angle"
INSERT_CHUNK = 5000
WARMUP_PER_CLIENT = 3


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(statistics.median(ordered) * 1e3, 2),
        "p99_ms": round(p99 * 1e3, 2),
    }


def _run_block(
    call: Callable[[], None], clients: int, per_client: int
) -> tuple[list[float], float]:
    """``clients`` threads making ``per_client`` calls each: (latencies, wall seconds)."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        mine: list[float] = []
        try:
            for _ in range(per_client):
                tick = time.perf_counter()
                call()
                mine.append(time.perf_counter() - tick)
        except BaseException as exc:
            errors.append(exc)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return latencies, elapsed


def compare(
    http_call: Callable[[], None],
    local_call: Callable[[], None],
    clients: int,
    requests: int,
    rounds: int,
) -> dict[str, Any]:
    """HTTP vs in-process, ``requests`` each, alternating in ``rounds`` blocks.

    Alternating spreads any change in background load (a shared machine) over both sides
    instead of letting it land on one.
    """
    per_block = max(1, requests // (clients * rounds))
    measured: dict[str, tuple[list[float], float]] = {"http": ([], 0.0), "in_process": ([], 0.0)}
    for _ in range(rounds):
        for name, call in (("http", http_call), ("in_process", local_call)):
            latencies, elapsed = _run_block(call, clients, per_block)
            seen, total = measured[name]
            measured[name] = (seen + latencies, total + elapsed)
    out: dict[str, Any] = {}
    for name, (latencies, elapsed) in measured.items():
        out[name] = {
            **_percentiles(latencies),
            "requests_per_s": round(len(latencies) / elapsed, 2),
            "requests": len(latencies),
        }
    out["clients"] = clients
    out["p50_ratio"] = round(out["http"]["p50_ms"] / out["in_process"]["p50_ms"], 3)
    return out


def fill_database(settings: Settings, bundle: EncoderBundle, count: int, seed: int) -> float:
    """Bulk-insert ``count`` image rows with random unit vectors; returns seconds taken."""
    started = time.perf_counter()
    upgrade_database(settings.database_url)
    engine = create_engine_for(settings)
    sessions = session_factory(engine)
    register_model(sessions, bundle)
    store = ImageStore(settings.data_dir, thumbnail_size=64, store_originals=False)
    placeholder = store.write("0" * 64, np.zeros((64, 64), np.uint8))
    rng = np.random.default_rng(seed)
    labels = ("Cardiomegaly", "Edema", "Pleural Effusion", "Pneumonia")
    try:
        for start in range(0, count, INSERT_CHUNK):
            ids = range(start + 1, min(start + INSERT_CHUNK, count) + 1)
            vectors = rng.standard_normal((len(ids), bundle.dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # (B, D)
            images = [
                {
                    "id": i,
                    "content_hash": hashlib.sha256(f"bench-{i}".encode()).hexdigest(),
                    "source_format": "png",
                    "width": 64,
                    "height": 64,
                    "bits": 8,
                    "photometric": "L",
                    "view_position": "PA" if i % 2 else "AP",
                    "labels": {name: float(rng.integers(0, 2)) for name in labels},
                    "image_path": placeholder.image_path,
                    "thumbnail_path": placeholder.thumbnail_path,
                }
                for i in ids
            ]
            embeddings = [
                {
                    "image_id": i,
                    "model_id": bundle.model_id,
                    "dim": bundle.dim,
                    "vector": vectors[j].astype("<f4").tobytes(),
                }
                for j, i in enumerate(ids)
            ]
            with sessions() as session, session.begin():
                session.execute(insert(Image), images)
                session.execute(insert(Embedding), embeddings)
    finally:
        engine.dispose()
    return time.perf_counter() - started


def start_server(settings: Settings, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "CONVIRT_DATA_DIR": str(settings.data_dir),
        "CONVIRT_DATABASE_URL": settings.database_url,
        "CONVIRT_BUNDLE_DIR": str(settings.bundle_dir),
        "CONVIRT_LOG_LEVEL": "WARNING",
        "CONVIRT_ENCODE_CONCURRENCY": str(settings.encode_concurrency),
    }
    return serve_with_env(env, port, log_path)


def serve_with_env(
    env: dict[str, str], port: int, log_path: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """``convirt serve`` on 127.0.0.1:``port`` with ``env``; returns once /ready is 200."""
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {log_path.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("server did not become ready")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def bench_search(
    settings: Settings,
    bundle: EncoderBundle,
    query_png: bytes,
    *,
    requests: int,
    rounds: int,
    work: Path,
) -> dict[str, Any]:
    process, base = start_server(settings, work / "server.log")
    results: dict[str, Any] = {}
    try:
        local = threading.local()

        def client() -> httpx.Client:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=base, timeout=60)
            found: httpx.Client = local.client
            return found

        def http_text() -> None:
            response = client().post("/search/text", json={"query": TEXT_QUERY, "k": 10})
            assert response.status_code == 200, response.text

        def http_image() -> None:
            response = client().post(
                "/search/image",
                files={"file": ("q.png", query_png, "image/png")},
                data={"k": "10"},
            )
            assert response.status_code == 200, response.text

        index = VectorIndex.load(settings.index_dir, expected_model_id=bundle.model_id)

        # In-process, the work runs on a pool as large as the service's inference pool:
        # the same concurrency policy, without HTTP, the event loop and the database.
        pool = ThreadPoolExecutor(max_workers=settings.encode_concurrency)

        def text_work() -> None:
            vector = bundle.encode_texts([TEXT_QUERY])  # (1, D)
            index.search(vector, 10)

        def image_work() -> None:
            vector = bundle.encode_images([decode_image(query_png).pixels])  # (1, D)
            index.search(vector, 10)

        def local_text() -> None:
            pool.submit(text_work).result()

        def local_image() -> None:
            pool.submit(image_work).result()

        for name, http_call, local_call in (
            ("search_text", http_text, local_text),
            ("search_image", http_image, local_image),
        ):
            for clients in (1, 8):
                # Warm-up: connections, worker threads, allocator, kernels for each shape.
                _run_block(http_call, clients, WARMUP_PER_CLIENT)
                _run_block(local_call, clients, WARMUP_PER_CLIENT)
            results[name] = {
                f"clients_{clients}": compare(http_call, local_call, clients, requests, rounds)
                for clients in (1, 8)
            }
        results["index_vectors"] = index.ntotal
    finally:
        stop_server(process)
    return results


def bench_ingest(
    bundle: EncoderBundle, corpus_manifest: Path, work: Path, batch_size: int
) -> dict[str, Any]:
    sources = discover(corpus_manifest)
    settings = Settings(
        data_dir=work / "ingest-data",
        bundle_dir=Path(bundle.path),
    )
    pixels = [decode_image(s.path.read_bytes()).pixels for s in sources]
    bundle.encode_images(pixels[:batch_size], batch_size=batch_size)  # warm-up
    started = time.perf_counter()
    bundle.encode_images(pixels, batch_size=batch_size)
    encode_s = time.perf_counter() - started

    runtime = Runtime.start(settings, bundle=bundle)
    try:
        started = time.perf_counter()
        counts = ingest_sources(runtime, sources, batch_size=batch_size, progress=False)
        runtime.index.save_if_dirty()
        ingest_s = time.perf_counter() - started
    finally:
        runtime.close()
    assert counts["created"] == len(sources), counts
    ingest_rate = len(sources) / ingest_s
    encode_rate = len(sources) / encode_s
    return {
        "images": len(sources),
        "batch_size": batch_size,
        "ingest_images_per_s": round(ingest_rate, 2),
        "encode_only_images_per_s": round(encode_rate, 2),
        "ratio": round(ingest_rate / encode_rate, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=100_000, help="rows in the search index")
    parser.add_argument("--requests", type=int, default=200, help="requests per search case")
    parser.add_argument(
        "--encode-concurrency", type=int, default=2, help="the service's inference threads"
    )
    parser.add_argument("--rounds", type=int, default=4, help="alternations HTTP/in-process")
    parser.add_argument("--ingest-images", type=int, default=64, help="images to ingest")
    parser.add_argument("--batch-size", type=int, default=16, help="ingest batch size")
    parser.add_argument("--bundle", type=Path, help="encoder bundle (default: build one)")
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: temp)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bundle_dir = args.bundle
        if bundle_dir is None:
            from tests.app.service_support import build_bundle

            bundle_dir = build_bundle(work / "bundle-build")
        bundle = EncoderBundle.load(bundle_dir, device="cpu")
        manifest = generate_corpus(
            work / "corpus", args.ingest_images, seed=args.seed, progress=False
        )
        query_png = discover(manifest)[0].path.read_bytes()

        settings = Settings(
            data_dir=work / "search-data",
            bundle_dir=bundle_dir,
            encode_concurrency=args.encode_concurrency,
        )
        fill_s = fill_database(settings, bundle, args.vectors, args.seed)
        search = bench_search(
            settings, bundle, query_png, requests=args.requests, rounds=args.rounds, work=work
        )
        ingest = bench_ingest(bundle, manifest, work, args.batch_size)

    import torch

    report = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "vectors": args.vectors,
        "encode_concurrency": args.encode_concurrency,
        "fill_database_s": round(fill_s, 1),
        "search": search,
        "ingest": ingest,
        "goals": {
            "search_text_1_client_p50_ratio_le_1.3": search["search_text"]["clients_1"]["p50_ratio"]
            <= 1.3,
            "search_image_1_client_p50_ratio_le_1.3": search["search_image"]["clients_1"][
                "p50_ratio"
            ]
            <= 1.3,
            "ingest_ratio_ge_0.8": ingest["ratio"] >= 0.8,
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
