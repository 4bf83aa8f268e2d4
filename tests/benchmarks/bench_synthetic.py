"""Synthetic corpus throughput: studies/s of rendering alone and of full generation.

Run as a script (``python tests/benchmarks/bench_synthetic.py``); it prints one JSON object.
"generate" is :func:`model.data.synthetic.generate_corpus` into an empty temporary folder:
render, PNG write and the manifest, as ``convirt demo-data`` does it. "render" is
:func:`model.data.synthetic.render_study` alone on random findings. Both run on one core (numpy
and Pillow do not thread these operations). Besides wall-clock rates the JSON gives rates
over the process's CPU time, which a busy shared machine disturbs less.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from model.data.synthetic import generate_corpus, render_study  # noqa: E402


def rates(count: int, wall: float, cpu: float) -> dict[str, float | int]:
    return {
        "studies": count,
        "studies_per_s": round(count / wall, 1),
        "studies_per_cpu_s": round(count / cpu, 1),
        "ms_per_study": round(wall / count * 1e3, 2),
    }


def bench_render(n: int, size: int) -> dict[str, float | int]:
    render_study(np.random.default_rng(10_000), None, size=size)  # warm-up: caches, imports
    wall, cpu = time.perf_counter(), time.process_time()
    for seed in range(n):
        render_study(np.random.default_rng(seed), None, size=size)
    return rates(n, time.perf_counter() - wall, time.process_time() - cpu)


def bench_generate(n: int, size: int) -> dict[str, float | int]:
    with tempfile.TemporaryDirectory() as tmp:
        generate_corpus(Path(tmp) / "warm", 2, size=size, progress=False)
        wall, cpu = time.perf_counter(), time.process_time()
        manifest = generate_corpus(Path(tmp) / "corpus", n, size=size, progress=False)
        result = rates(n, time.perf_counter() - wall, time.process_time() - cpu)
        images = list((manifest.parent / "images").iterdir())
        result["mean_png_bytes"] = round(sum(p.stat().st_size for p in images) / len(images))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300, help="studies per measurement")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    args = parser.parse_args(argv)
    report = {
        "benchmark": "synthetic",
        "size": args.size,
        "generate": bench_generate(args.n, args.size),
        "render": bench_render(args.n, args.size),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
