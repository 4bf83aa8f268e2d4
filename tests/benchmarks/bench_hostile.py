"""Hostile inputs against a running service: memory per request, search latency, 5xx.

Run as a script (``python tests/benchmarks/bench_hostile.py``); it prints one JSON object.

``convirt serve`` runs as a subprocess on a copy of a demo-sized data directory
(``--data``, by default the one ``convirt demo`` builds: its database, images, index and
bundle; it is copied, never written). The server's resident memory is read from
``/proc/<pid>/status`` (VmRSS) every few milliseconds throughout.

The memory-hostile inputs:

- strips: 1 × N and N × 1 PNGs up to the pixel limit (a few kilobytes each), sent to
  ``/search/image`` and ``/images``;
- large, nearly blank PNGs (a few kilobytes each), several per upload: at the largest
  size the pixel budget admits, and beyond it (up to the pixel limit);
- large nearly blank query images to ``/search/image``.

Phases: text-search latency alone (quiet); each hostile request alone, one after the
other, while one client keeps running text searches (RSS growth per request = peak during
it minus the RSS just before); then each kind sent by 4 clients at once, each with bytes
of its own so every upload is really decoded, again beside the text client (peak RSS).
Reported against the goals: growth ≤ 300 MB per hostile request, peak ≤ 1.5 GB with 4 at
once, attack text p99 ≤ 3 × quiet p99, no 5xx. A 503 ``busy`` (the pixel budget or the
image threads stayed taken past ``CONVIRT_DECODE_WAIT_S``) is counted on its own, besides
the other 5xx, since it is the documented answer to overload.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tests.benchmarks.bench_service import free_port, serve_with_env, stop_server  # noqa: E402

#: What `make demo` leaves: its data directory (copied, never written).
DEFAULT_DATA = Path("data")
TEXT_QUERY = "small left pleural effusion with blunting of the costophrenic angle"
MIB = 1024 * 1024
SAMPLE_S = 0.005
GOALS = {"growth_mb": 300, "peak_4_mb": 1536, "p99_ratio": 3.0, "status_5xx": 0}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def _blank(height: int, width: int, seed: int) -> bytes:
    """A nearly blank 8-bit image: a few random dots, so each one has its own bytes."""
    array = np.zeros((height, width), np.uint8)
    rng = np.random.default_rng(seed)
    array[rng.integers(0, height, 16), rng.integers(0, width, 16)] = 255
    return _png(array)


class RssSampler:
    """Samples a process's VmRSS in a thread; keeps the running peak since a reset."""

    def __init__(self, pid: int) -> None:
        self.path = Path(f"/proc/{pid}/status")
        self.peak = 0
        self.current = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> int:
        for line in self.path.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = self.read()
            except (OSError, RuntimeError):
                return
            with self._lock:
                self.current = value
                self.peak = max(self.peak, value)
            time.sleep(SAMPLE_S)

    def start(self) -> None:
        self.current = self.peak = self.read()
        self._thread.start()

    def reset(self) -> int:
        """Start a new peak window; returns the RSS now."""
        with self._lock:
            now = self.read()
            self.current = self.peak = now
        return now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Tally:
    statuses: dict[int, int] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, response: httpx.Response) -> None:
        code = ""
        if response.headers.get("content-type", "").startswith("application/problem+json"):
            code = str(response.json().get("code", ""))
        with self.lock:
            self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
            if code:
                self.codes[code] = self.codes.get(code, 0) + 1

    def count_5xx(self) -> tuple[int, int]:
        """(5xx other than 503 busy, 503 busy)."""
        busy = self.codes.get("busy", 0)
        total = sum(n for status, n in self.statuses.items() if status >= 500)
        return total - busy, busy


def start_server(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "CONVIRT_DATA_DIR": str(data_dir),
        "CONVIRT_LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("CONVIRT_DATABASE_URL", None)
    return serve_with_env(env, port, log_path)


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


class TextClient:
    """One client running text searches back to back, recording each latency."""

    def __init__(self, base: str, tally: Tally) -> None:
        self.base = base
        self.tally = tally
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def search(self, client: httpx.Client) -> None:
        start = time.perf_counter()
        response = client.post(f"{self.base}/search/text", json={"query": TEXT_QUERY, "k": 10})
        self.latencies.append(time.perf_counter() - start)
        self.tally.add(response)

    def run_for(self, count: int) -> list[float]:
        self.latencies = []
        with httpx.Client(timeout=120) as client:
            for _ in range(count):
                self.search(client)
        return self.latencies

    def start(self) -> None:
        self.latencies = []
        self._stop.clear()

        def loop() -> None:
            with httpx.Client(timeout=120) as client:
                while not self._stop.is_set():
                    self.search(client)
                    time.sleep(0.02)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> list[float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.latencies


Request = tuple[str, Callable[[httpx.Client], httpx.Response]]


def hostile_requests(
    base: str, pixel_limit: int, budget: int, files: int, seed: int
) -> list[Request]:
    """The named hostile requests, with bytes of their own per ``seed`` (built up front),
    so that no upload is answered ``existing`` without being decoded."""
    requests: list[Request] = []

    def image_search(name: str, data: bytes) -> None:
        requests.append(
            (
                name,
                lambda c: c.post(
                    f"{base}/search/image", files={"file": ("q.png", data, "image/png")}
                ),
            )
        )

    def image_upload(name: str, blobs: list[bytes]) -> None:
        parts = [("files", (f"f{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
        requests.append((name, lambda c: c.post(f"{base}/images", files=parts)))

    for length in (6_000, 60_000, pixel_limit):
        strip = _png(np.full((1, length), seed % 256, np.uint8))
        image_search(f"search 1x{length}", strip)
        image_upload(f"upload {length}x1", [_png(np.full((length, 1), seed % 256, np.uint8))])
    admitted = math.isqrt(budget)
    beyond = math.isqrt(pixel_limit)
    seed *= 1000
    image_search(f"search {admitted}^2 blank", _blank(admitted, admitted, seed))
    image_upload(
        f"upload {files}x {admitted}^2 blank",
        [_blank(admitted, admitted, seed + 1 + i) for i in range(files)],
    )
    image_upload(
        f"upload {files}x {beyond}^2 blank",
        [_blank(beyond, beyond, seed + 100 + i) for i in range(files)],
    )
    return requests


def one_at_a_time(
    requests: list[Request], sampler: RssSampler, tally: Tally
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with httpx.Client(timeout=600) as client:
        for name, send in requests:
            time.sleep(0.5)  # let the allocator settle between requests
            before = sampler.reset()
            start = time.perf_counter()
            response = send(client)
            seconds = time.perf_counter() - start
            time.sleep(0.05)
            tally.add(response)
            code = response.json().get("code") if response.status_code >= 400 else None
            out[name] = {
                "status": response.status_code,
                "code": code,
                "seconds": round(seconds, 2),
                "rss_growth_mb": round((sampler.peak - before) / MIB, 1),
            }
    return out


def four_at_once(copies: list[list[Request]], sampler: RssSampler, tally: Tally) -> dict[str, Any]:
    """Each kind of hostile request sent by 4 clients at once, with 4 sets of bytes."""
    sampler.reset()
    start = time.perf_counter()

    def send(request: Request) -> int:
        with httpx.Client(timeout=600) as client:
            response = request[1](client)
        tally.add(response)
        return response.status_code

    by_kind: dict[str, list[int]] = {}
    with ThreadPoolExecutor(max_workers=len(copies)) as pool:
        for kind in range(len(copies[0])):
            same_kind = [requests[kind] for requests in copies]
            by_kind[same_kind[0][0]] = list(pool.map(send, same_kind))
    return {
        "clients": len(copies),
        "statuses_by_kind": by_kind,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(sampler.peak / MIB, 1),
    }


def _copy_data(source: Path, target: Path) -> Path:
    """Copy what the service reads of a data directory; the original is never written."""
    for name in ("bundle", "images", "thumbnails", "index", "convirt.db"):
        path = source / name
        if path.is_dir():
            shutil.copytree(path, target / name)
        elif path.is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / name)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data dir to copy")
    parser.add_argument("--quiet-searches", type=int, default=100)
    parser.add_argument("--files", type=int, default=4, help="files per large upload")
    parser.add_argument("--clients", type=int, default=4, help="hostile clients at once")
    args = parser.parse_args(argv)

    from app.settings import Settings

    defaults = Settings(data_dir=Path(tempfile.gettempdir()))
    pixel_limit, budget = defaults.max_image_pixels, defaults.decode_pixel_budget
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        data_dir = _copy_data(args.data, Path(tmp) / "data")
        process, base = start_server(data_dir, Path(tmp) / "serve.log")
        sampler = RssSampler(process.pid)
        sampler.start()
        tally = Tally()
        try:
            text = TextClient(base, tally)
            text.run_for(10)  # warm-up
            idle_rss = sampler.reset()
            quiet = text.run_for(args.quiet_searches)
            seed = int(time.time()) % 100_000
            requests = hostile_requests(base, pixel_limit, budget, args.files, seed)
            copies = [
                hostile_requests(base, pixel_limit, budget, args.files, seed + 1 + n)
                for n in range(args.clients)
            ]
            text.start()
            single = one_at_a_time(requests, sampler, tally)
            attack_single = text.stop()
            text.start()
            concurrent = four_at_once(copies, sampler, tally)
            attack_four = text.stop()
        finally:
            sampler.stop()
            stop_server(process)
    other_5xx, busy = tally.count_5xx()
    quiet_p99 = _p99(quiet)
    attack_p99 = _p99(attack_single + attack_four)
    growth = max(r["rss_growth_mb"] for r in single.values())
    figures = {
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "pixel_limit": pixel_limit,
        "decode_pixel_budget": budget,
        "idle_rss_mb": round(idle_rss / MIB, 1),
        "one_at_a_time": single,
        "max_rss_growth_per_request_mb": growth,
        "four_at_once": concurrent,
        "text_search": {
            "quiet_p50_ms": round(statistics.median(quiet) * 1e3, 1),
            "quiet_p99_ms": round(quiet_p99 * 1e3, 1),
            "attack_p50_ms": round(statistics.median(attack_single + attack_four) * 1e3, 1),
            "attack_p99_ms": round(attack_p99 * 1e3, 1),
            "attack_searches": len(attack_single) + len(attack_four),
            "p99_ratio": round(attack_p99 / quiet_p99, 2),
        },
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "problem_codes": tally.codes,
        "status_5xx": other_5xx,
        "busy_503": busy,
        "goals": GOALS,
        "goals_met": {
            "growth_mb": growth <= GOALS["growth_mb"],
            "peak_4_mb": concurrent["peak_rss_mb"] <= GOALS["peak_4_mb"],
            "p99_ratio": attack_p99 / quiet_p99 <= GOALS["p99_ratio"],
            "status_5xx": other_5xx == 0,
        },
    }
    sys.stdout.write(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
