"""Benchmark of ``index.VectorIndex`` on clustered 512-d unit vectors; prints JSON.

For each size (``--sizes``, default 10k, 100k, 1M) it measures, per index kind:

- build: wall time of ``VectorIndex.rebuild`` (training included) and resident memory per
  vector (RSS growth over the build) next to the on-disk bytes per vector;
- save and load time (sha256 checks included);
- single-query (one thread) and batch-of-100 (all threads) latency of the wrapper next to
  bare FAISS searching the same FAISS index with the same parameters (``overhead`` =
  wrapper median / bare median; goal ≤ 1.1);
- for the ANN kinds (HNSW32, IVF-Flat, IVF-SQ8, and IVF-PQ64 up to ``--pq-max-n``), a
  sweep of ``ef_search`` / ``nprobe`` with recall@10 against exact search (the Flat index,
  the oracle) and speed-up over exact; ``chosen`` is the cheapest setting with
  recall@10 ≥ 0.95 (goal at 1M: ≥ 5× faster than exact).

Data: a Gaussian mixture of ``--clusters`` clusters with Zipf-like weights in a
``--latent``-d space, mapped linearly to 512-d, plus isotropic noise, L2-normalised —
embeddings with low intrinsic dimension and uneven topic sizes, not uniform noise.
Queries are fresh draws from the same mixture.

Run:  .venv/bin/python tests/benchmarks/bench_index.py --sizes 10000,100000 --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from index import VectorIndex

logger = logging.getLogger("bench_index")

K = 10
RECALL_GOAL = 0.95
BATCH = 100
ADD_BATCH = 10_000
SINGLE_QUERY_THREADS = 1


@dataclass(frozen=True)
class Mixture:
    """A fixed clustered distribution; ``sample`` draws unit vectors from it."""

    centers: npt.NDArray[np.float32]  # (C, L)
    spreads: npt.NDArray[np.float32]  # (C,)
    weights: npt.NDArray[np.float64]  # (C,)
    mapping: npt.NDArray[np.float32]  # (L, D)
    noise: float

    @classmethod
    def create(cls, clusters: int, latent: int, dim: int, noise: float, seed: int) -> Mixture:
        rng = np.random.default_rng(seed)
        weights = 1.0 / np.arange(1, clusters + 1) ** 0.7
        return cls(
            centers=rng.standard_normal((clusters, latent)).astype(np.float32),
            spreads=rng.uniform(0.3, 0.7, clusters).astype(np.float32),
            weights=weights / weights.sum(),
            mapping=(rng.standard_normal((latent, dim)) / math.sqrt(latent)).astype(np.float32),
            noise=noise,
        )

    def sample(self, n: int, seed: int, chunk: int = 100_000) -> npt.NDArray[np.float32]:
        rng = np.random.default_rng(seed)
        dim = self.mapping.shape[1]
        out = np.empty((n, dim), dtype=np.float32)  # (N, D)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            cluster = rng.choice(self.centers.shape[0], size=m, p=self.weights)  # (m,)
            z = self.centers[cluster] + self.spreads[cluster, None] * rng.standard_normal(
                (m, self.centers.shape[1]), dtype=np.float32
            )  # (m, L)
            x = z @ self.mapping  # (m, D)
            x += self.noise * rng.standard_normal((m, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[start : start + m] = x
        return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def batches(
    ids: npt.NDArray[np.int64], x: npt.NDArray[np.float32]
) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
    for start in range(0, ids.size, ADD_BATCH):
        yield ids[start : start + ADD_BATCH], x[start : start + ADD_BATCH]


def recall_at_k(found: npt.NDArray[np.int64], truth: npt.NDArray[np.int64]) -> float:
    hits = sum(np.intersect1d(f, t).size for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def paired_latency(
    wrapper: Callable[[npt.NDArray[np.float32]], object],
    bare: Callable[[npt.NDArray[np.float32]], object],
    queries: list[npt.NDArray[np.float32]],
) -> dict[str, float]:
    """Median/p95 milliseconds of wrapper and bare on the same inputs, interleaved."""
    for q in queries[:3]:  # warm caches and lazily built tables
        wrapper(q)
        bare(q)
    w_times: list[float] = []
    b_times: list[float] = []
    for i, q in enumerate(queries):
        # Alternate which goes first so neither side always runs on a warmer cache.
        order = ((wrapper, w_times), (bare, b_times))
        for fn, times in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn(q)
            times.append(time.perf_counter() - t0)
    w_med, b_med = statistics.median(w_times), statistics.median(b_times)
    return {
        "wrapper_ms": round(w_med * 1e3, 4),
        "bare_ms": round(b_med * 1e3, 4),
        "wrapper_p95_ms": round(float(np.percentile(w_times, 95)) * 1e3, 4),
        "bare_p95_ms": round(float(np.percentile(b_times, 95)) * 1e3, 4),
        "overhead": round(w_med / b_med, 3),
        "n": len(queries),
    }


def search_fns(
    index: VectorIndex, param: str | None, value: int | None
) -> tuple[Callable[[npt.NDArray[np.float32]], Any], Callable[[npt.NDArray[np.float32]], Any]]:
    fi = index.faiss_index
    kwargs: dict[str, int] = {param: value} if param and value is not None else {}
    # The tightest bare baseline: one parameter object built ahead and reused.
    params: Any = None
    if param == "ef_search":
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = value
    elif param == "nprobe":
        params = faiss.SearchParametersIVF()
        params.nprobe = value

    def wrapped(q: npt.NDArray[np.float32]) -> Any:
        return index.search(q, K, **kwargs)

    def bare(q: npt.NDArray[np.float32]) -> Any:
        if params is None:
            return fi.search(q, K)
        return fi.search(q, K, params=params)

    return wrapped, bare


def measure(
    index: VectorIndex,
    queries: npt.NDArray[np.float32],
    param: str | None,
    value: int | None,
    n_single: int,
    n_batch: int,
) -> dict[str, Any]:
    wrapped, bare = search_fns(index, param, value)
    # A service answers many single queries at once, one thread each; OpenMP teams for a
    # lone query only add barrier waits (severe on shared cores), so single queries run
    # on SINGLE_QUERY_THREADS and batches on FAISS's default.
    default_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(SINGLE_QUERY_THREADS)
    try:
        single = paired_latency(wrapped, bare, [queries[i : i + 1] for i in range(n_single)])
    finally:
        faiss.omp_set_num_threads(default_threads)
    single["threads"] = SINGLE_QUERY_THREADS
    batch_threads = faiss.omp_get_max_threads()
    batch = paired_latency(
        wrapped,
        bare,
        [queries[(i * BATCH) % len(queries) :][:BATCH] for i in range(n_batch)],
    )
    batch["wrapper_ms_per_query"] = round(batch["wrapper_ms"] / BATCH, 4)
    batch["threads"] = batch_threads
    return {"single": single, f"batch{BATCH}": batch}


def build_and_persist(
    factory: str, ids: npt.NDArray[np.int64], x: npt.NDArray[np.float32], workdir: Path
) -> tuple[VectorIndex, dict[str, Any]]:
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    index = VectorIndex.rebuild(
        batches(ids, x),
        factory=factory,
        dim=x.shape[1],
        model_id="bench",
        progress=False,
        total=ids.size,
    )
    build_s = time.perf_counter() - t0
    gc.collect()
    rss1 = rss_bytes()
    target = workdir / factory.replace(",", "_")
    t0 = time.perf_counter()
    manifest = index.save(target)
    save_s = time.perf_counter() - t0
    disk = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    t0 = time.perf_counter()
    loaded = VectorIndex.load(target, expected_model_id="bench", expected_dim=x.shape[1])
    load_s = time.perf_counter() - t0
    assert loaded.ntotal == manifest.count == ids.size
    del loaded
    shutil.rmtree(target)
    gc.collect()
    return index, {
        "factory": factory,
        "build_s": round(build_s, 2),
        "add_vectors_per_s": round(ids.size / build_s),
        "rss_bytes_per_vector": round((rss1 - rss0) / ids.size, 1),
        "disk_bytes_per_vector": round(disk / ids.size, 1),
        "save_s": round(save_s, 2),
        "load_s": round(load_s, 2),
    }


def run_size(
    n: int,
    mixture: Mixture,
    queries: npt.NDArray[np.float32],
    kinds: list[str],
    workdir: Path,
    pq_max_n: int,
    checkpoint: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    logger.info("size %d: generating data", n)
    x = mixture.sample(n, seed=1000 + n)  # (N, D)
    # Sparse, shuffled ids: database ids are neither dense nor in vector order.
    ids = np.random.default_rng(n).permutation(3 * n)[:n].astype(np.int64)
    result: dict[str, Any] = {"n": n}

    logger.info("size %d: Flat (exact)", n)
    flat, stats = build_and_persist("Flat", ids, x, workdir)
    t0 = time.perf_counter()
    _, truth = flat.search(queries, K)  # (Q, K) ground truth
    stats["exact_batch_all_queries_s"] = round(time.perf_counter() - t0, 3)
    # Exact search costs O(N) a query: fewer repetitions as N grows keep each size to
    # minutes (a single query at 1M is ~0.1 s on two idle cores).
    n_single_exact = max(20, min(300, int(1e7 / n)))
    n_batch_exact = max(2, min(30, int(1e6 / n)))
    stats["latency"] = measure(flat, queries, None, None, n_single_exact, n_batch_exact)
    result["flat"] = stats
    checkpoint(result)
    exact_single = stats["latency"]["single"]["wrapper_ms"]
    exact_batch = stats["latency"][f"batch{BATCH}"]["wrapper_ms"]
    del flat
    gc.collect()

    nlist = 2 ** round(math.log2(math.sqrt(n)))
    nprobes = [4, 8, 16, 32, 64, 128]
    specs = {
        "hnsw": ("HNSW32", "ef_search", [16, 32, 64, 128, 256]),
        "ivf_flat": (f"IVF{nlist},Flat", "nprobe", nprobes),
        "ivf_sq8": (f"IVF{nlist},SQ8", "nprobe", nprobes),
        # PQ without polysemous training ("np"): that training costs minutes and only
        # serves Hamming-thresholded search, which the index does not use.
        "ivf_pq": (f"IVF{nlist},PQ64np", "nprobe", nprobes),
    }
    for name in kinds:
        factory, param, values = specs[name]
        if name == "ivf_pq" and n > pq_max_n:
            # FAISS trains 64 sub-quantisers of 256 centroids; on two cores that alone is
            # minutes at this size, so PQ is measured on the smaller sizes only.
            result[name] = {"factory": factory, "skipped": f"n > --pq-max-n {pq_max_n}"}
            continue
        logger.info("size %d: %s", n, factory)
        index, stats = build_and_persist(factory, ids, x, workdir)
        sweep = []
        chosen: dict[str, Any] | None = None
        for value in values:
            found = index.search(queries, K, **{param: value})[1]
            recall = recall_at_k(found, truth)
            lat = measure(index, queries, param, value, 300, 10)
            point = {
                param: value,
                "recall_at_10": round(recall, 4),
                "single_ms": lat["single"]["wrapper_ms"],
                "batch_ms_per_query": lat[f"batch{BATCH}"]["wrapper_ms_per_query"],
                "speedup_single": round(exact_single / lat["single"]["wrapper_ms"], 1),
                "speedup_batch": round(exact_batch / lat[f"batch{BATCH}"]["wrapper_ms"], 1),
                "overhead_single": lat["single"]["overhead"],
                "overhead_batch": lat[f"batch{BATCH}"]["overhead"],
            }
            sweep.append(point)
            logger.info("size %d: %s %s=%d %s", n, factory, param, value, point)
            if chosen is None and recall >= RECALL_GOAL:
                chosen = {**point, "latency": lat}
        stats["sweep"] = sweep
        stats["chosen"] = chosen
        result[name] = stats
        checkpoint(result)
        del index
        gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--kinds", default="hnsw,ivf_flat,ivf_sq8,ivf_pq")
    parser.add_argument("--pq-max-n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    kinds = [k for k in args.kinds.split(",") if k]

    mixture = Mixture.create(args.clusters, args.latent, args.dim, args.noise, seed=0)
    queries = mixture.sample(args.queries, seed=1)  # (Q, D)
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "faiss": faiss.__version__,
            "python": platform.python_version(),
            "load_avg_start": os.getloadavg(),
        },
        "data": {
            "dim": args.dim,
            "clusters": args.clusters,
            "latent_dim": args.latent,
            "noise": args.noise,
            "queries": args.queries,
            "k": K,
        },
        "results": [],
    }
    started = time.perf_counter()

    def checkpoint(partial: dict[str, Any]) -> None:
        # Partial figures survive an interrupted 1M run.
        report["results"] = [r for r in report["results"] if r["n"] != partial["n"]]
        report["results"].append(partial)
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        if args.out is not None:
            args.out.write_text(json.dumps(report, indent=2))

    with tempfile.TemporaryDirectory(prefix="bench_index_") as tmp:
        for n in sizes:
            checkpoint(run_size(n, mixture, queries, kinds, Path(tmp), args.pq_max_n, checkpoint))
    report["machine"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
