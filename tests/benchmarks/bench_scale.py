"""Benchmark of many processes on one database; prints one JSON object.

- ``feed_lag``: a writer commits images (row, 512-d embedding and change feed record in one
  transaction, as an ingest does) at ``--rate`` per second for ``--seconds``; a follower
  in *another process* applies the feed to its own index. Lag = the moment the vector is
  in the follower's index minus the writer's commit (same machine, same clock); p50/p99
  per backend: SQLite (polling every 0.5 s) and PostgreSQL (LISTEN/NOTIFY plus polling).
  Goal: p99 ≤ 1 s.
- ``cold_start``: ``--cold-n`` stored vectors and a saved snapshot, then ``--tail`` more
  changes committed after it. A starting process either loads the snapshot and replays
  the tail (what the service does) or rebuilds from every stored embedding (what it does
  without a usable snapshot). Bundle loading is left out: it is the same for both.
  Goal: ≥ 5× faster, ≤ 60 s at 1M.
- ``search``: requests/s of ``POST /search/text`` from 8 client threads against
  ``convirt serve --workers 1`` and ``--workers 2`` (needs ``--bundle-dir``; report only).

PostgreSQL: ``--postgres-url``, or a throwaway cluster made with Debian's ``initdb`` when
it is installed. Run:

    .venv/bin/python tests/benchmarks/bench_scale.py --cold-n 100000 --out /tmp/scale.json
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from app.db import create_engine_for_url, session_factory, upgrade_database  # noqa: E402
from app.models import Embedding, EncoderModel, Image  # noqa: E402
from app.services import feed  # noqa: E402
from app.services.follower import FeedFollower  # noqa: E402
from app.services.live_index import LiveIndex  # noqa: E402
from app.services.reconcile import open_index, rebuild_index  # noqa: E402
from app.services.snapshot import save_snapshot  # noqa: E402
from index import VectorIndex  # noqa: E402
from tests.app.process_support import free_port  # noqa: E402

logger = logging.getLogger("bench_scale")

DIM = 512
MODEL_ID = "sha256:" + "b" * 64
INSERT_BATCH = 5000
#: A throwaway local cluster: trust on loopback, no fsync at init.
TRUST = ("--auth=trust", "--no-sync")


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)  # (N, 512)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _prepare(url: str) -> None:
    upgrade_database(url)
    engine = create_engine_for_url(url)
    with session_factory(engine)() as session, session.begin():
        session.add(EncoderModel(id=MODEL_ID, name="bench", dim=DIM, is_active=True))
    engine.dispose()


def _image_rows(start: int, n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(start, start + n):
        digest = hashlib.sha256(f"bench-{i}".encode()).hexdigest()
        rows.append(
            {
                "content_hash": digest,
                "source_format": "png",
                "width": 1,
                "height": 1,
                "labels": {},
                "image_path": f"images/{digest}.png",
                "thumbnail_path": f"thumbs/{digest}.png",
            }
        )
    return rows


def _commit_images(sessions: Any, start: int, vectors: np.ndarray) -> list[int]:
    """One transaction: image rows, their embeddings, their feed records (as ingest)."""
    with sessions() as session, session.begin():
        ids = list(
            session.scalars(
                insert(Image).returning(Image.id, sort_by_parameter_order=True),
                _image_rows(start, len(vectors)),
            )
        )
        session.execute(
            insert(Embedding),
            [
                {"image_id": i, "model_id": MODEL_ID, "dim": DIM, "vector": v.tobytes()}
                for i, v in zip(ids, vectors, strict=True)
            ],
        )
        feed.record_adds(session, MODEL_ID, ids)
    return [int(i) for i in ids]


# -- feed lag ----------------------------------------------------------------------------


def _follower_process(url: str, ready: Any, stop: Any, out: Any) -> None:
    """Another process: follow the feed, note when each id reached the index."""
    engine = create_engine_for_url(url)
    sessions = session_factory(engine)
    live = LiveIndex(VectorIndex.build("Flat", DIM, model_id=MODEL_ID), Path(tempfile.mkdtemp()))
    seen: dict[int, float] = {}
    plain_add = live.add

    def timed_add(ids: Any, vectors: Any) -> bool:
        result = plain_add(ids, vectors)
        now = time.time()
        for i in ids:
            seen.setdefault(int(i), now)
        return result

    live.add = timed_add  # type: ignore[method-assign]
    follower = FeedFollower(
        engine=engine, sessions=sessions, index=live, model_id=MODEL_ID, poll_interval_s=0.5
    )
    follower.catch_up()
    follower.start()
    ready.set()
    stop.wait()
    time.sleep(1.5)  # the last commits get their chance
    follower.stop()
    out.put(seen)
    engine.dispose()


def feed_lag(url: str, rate: float, seconds: float) -> dict[str, Any]:
    _prepare(url)
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_follower_process, args=(url, ready, stop, out))
    child.start()
    assert ready.wait(120), "the follower did not start"
    engine = create_engine_for_url(url)
    sessions = session_factory(engine)
    rng = np.random.default_rng(0)
    committed: dict[int, float] = {}
    count = int(rate * seconds)
    start = time.monotonic()
    for n in range(count):
        # An even pace: image n commits at start + n / rate.
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        (image_id,) = _commit_images(sessions, n, _unit(rng, 1))
        committed[image_id] = time.time()
    stop.set()
    seen: dict[int, float] = out.get(timeout=120)
    child.join(timeout=60)
    engine.dispose()
    lags = sorted(seen[i] - t for i, t in committed.items() if i in seen)
    return {
        "writes": count,
        "rate_per_s": rate,
        "applied": len(lags),
        "missed": count - len(lags),
        "p50_s": round(statistics.median(lags), 4),
        "p99_s": round(lags[min(len(lags) - 1, int(0.99 * len(lags)))], 4),
        "max_s": round(lags[-1], 4),
        "goal_p99_s": 1.0,
    }


# -- cold start --------------------------------------------------------------------------


def cold_start(url: str, n: int, tail: int, work: Path) -> dict[str, Any]:
    _prepare(url)
    engine = create_engine_for_url(url)
    sessions = session_factory(engine)
    rng = np.random.default_rng(1)
    started = time.perf_counter()
    for offset in range(0, n, INSERT_BATCH):
        _commit_images(sessions, offset, _unit(rng, min(INSERT_BATCH, n - offset)))
    insert_s = time.perf_counter() - started
    index_dir = work / "index"
    snapshot, sequence = rebuild_index(sessions, model_id=MODEL_ID, dim=DIM, factory="Flat")
    save_snapshot(snapshot, index_dir, sequence)
    del snapshot
    for offset in range(n, n + tail, 100):
        _commit_images(sessions, offset, _unit(rng, min(100, n + tail - offset)))

    started = time.perf_counter()
    loaded, reason, position, _unsaved = open_index(
        sessions, index_dir=index_dir, model_id=MODEL_ID, dim=DIM, factory="Flat"
    )
    assert reason is None, reason
    live = LiveIndex(loaded, index_dir, sequence=position)
    follower = FeedFollower(
        engine=engine, sessions=sessions, index=live, model_id=MODEL_ID, poll_interval_s=0.5
    )
    replayed = follower.catch_up()
    with sessions() as session:
        head, stored = feed.head_and_count(session, MODEL_ID)
    snapshot_s = time.perf_counter() - started
    assert live.ntotal == stored == n + tail
    assert head == live.sequence
    del loaded, live, follower

    started = time.perf_counter()
    rebuilt, _ = rebuild_index(sessions, model_id=MODEL_ID, dim=DIM, factory="Flat")
    rebuild_s = time.perf_counter() - started
    assert rebuilt.ntotal == n + tail
    engine.dispose()
    return {
        "vectors": n,
        "tail": tail,
        "replayed": replayed,
        "insert_s": round(insert_s, 2),
        "snapshot_plus_tail_s": round(snapshot_s, 3),
        "full_rebuild_s": round(rebuild_s, 3),
        "speedup": round(rebuild_s / snapshot_s, 2),
        "goal": "speedup >= 5 and snapshot_plus_tail_s <= 60 at 1M",
    }


# -- search throughput -------------------------------------------------------------------


def search_throughput(bundle_dir: Path, work: Path, workers: int, seconds: float) -> float:
    import httpx

    port = free_port()
    data = work / f"serve-{workers}"
    argv = [
        sys.executable,
        "-m",
        "app.cli",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    argv += ["--data-dir", str(data), "--bundle-dir", str(bundle_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CONVIRT_EVALUATION_WORKER": "false"}
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        time.sleep(10 if workers > 1 else 1)  # the other workers finish loading
        done = [0] * 8
        stop_at = time.monotonic() + seconds

        def client(slot: int) -> None:
            with httpx.Client(base_url=base, timeout=30) as http:
                while time.monotonic() < stop_at:
                    response = http.post("/search/text", json={"query": "effusion", "k": 10})
                    done[slot] += response.status_code == 200

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return round(sum(done) / seconds, 1)
    finally:
        server.terminate()
        server.wait(timeout=60)


# -- PostgreSQL --------------------------------------------------------------------------


@contextmanager
def throwaway_postgres(work: Path) -> Iterator[str | None]:
    """A cluster of Debian's PostgreSQL in ``work``, or None when it is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        yield None
        return
    bin_dir = Path(found[-1]).parent
    base = work / "pg"
    base.mkdir()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if os.geteuid() == 0:
        shutil.chown(base, user="postgres")
    port = free_port()
    subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(base / "data"), "-U", "postgres", *TRUST],
        check=True,
        capture_output=True,
    )
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base}"
    # The server's output goes to a file: a pipe it held open would block this call.
    start = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(base / "data"), "-o", options]
    start.extend(("-l", str(base / "server.log"), "-w", "start"))
    subprocess.run(
        start,
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(base / "data"), "-m", "fast", "stop"],
            check=False,
            capture_output=True,
        )


def _fresh_database(server_url: str, name: str) -> str:
    import psycopg

    plain = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="writer images per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="writer duration")
    parser.add_argument("--cold-n", type=int, default=1_000_000, help="stored vectors")
    parser.add_argument("--tail", type=int, default=1000, help="changes after the snapshot")
    parser.add_argument("--postgres-url", help="a server URL (else a throwaway cluster)")
    parser.add_argument("--bundle-dir", type=Path, help="a bundle, for the search figures")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
    }
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        if os.geteuid() == 0:
            shutil.chown(work, user="postgres")
        report["feed_lag"] = {
            "sqlite_polling": feed_lag(f"sqlite:///{work}/lag.db", args.rate, args.seconds)
        }
        with throwaway_postgres(work) as local_pg:
            server = args.postgres_url or local_pg
            if server is not None:
                lag_url = _fresh_database(server, "bench_lag")
                report["feed_lag"]["postgresql_notify"] = feed_lag(lag_url, args.rate, args.seconds)
            report["cold_start"] = {
                "sqlite": cold_start(f"sqlite:///{work}/cold.db", args.cold_n, args.tail, work)
            }
        if args.bundle_dir is not None:
            report["search_req_per_s_8_clients"] = {
                f"workers_{w}": search_throughput(args.bundle_dir, work, w, 15.0) for w in (1, 2)
            }
    report["machine"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
