"""Decoding throughput: images/s for uncompressed DICOM, JPEG 2000 DICOM and PNG.

Run as a script (``python tests/benchmarks/bench_decode.py``); it prints one JSON object.
Each case is decoded from bytes already in memory (file reading is not timed), once to
warm up, then repeatedly until ``--min-seconds`` have passed; the median per-image time
of the repetitions gives images/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydicom.data import get_testdata_file  # noqa: E402

from model.inputs.decode import decode_image  # noqa: E402

SHARED_PNG = ROOT.parent / "shared" / "data" / "figure1-covid" / "images" / "COVID-00001.png"


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)  # download=False: never fetch
    if not isinstance(path, str):
        raise SystemExit(f"{name} is missing: install pydicom-data")
    return Path(path)


def measure(data: bytes, min_seconds: float, min_runs: int) -> dict[str, float | int]:
    decoded = decode_image(data)  # warm-up: plugin imports, codec initialisation
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - started < min_seconds:
        tick = time.perf_counter()
        decode_image(data)
        times.append(time.perf_counter() - tick)
    median = statistics.median(times)
    return {
        "images_per_s": round(1.0 / median, 2),
        "median_ms": round(median * 1e3, 2),
        "min_ms": round(min(times) * 1e3, 2),
        "runs": len(times),
        "width": decoded.meta.width,
        "height": decoded.meta.height,
        "bytes": len(data),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--min-seconds", type=float, default=5.0, help="time per case")
    parser.add_argument("--min-runs", type=int, default=10, help="repetitions per case")
    args = parser.parse_args(argv)

    cases = {
        "dicom_uncompressed_RG1_UNCR": pydicom_file("RG1_UNCR.dcm"),
        "dicom_jpeg2000_lossless_RG1_J2KR": pydicom_file("RG1_J2KR.dcm"),
        f"png_8bit_{SHARED_PNG.stem}": SHARED_PNG,
    }
    results = {
        name: measure(path.read_bytes(), args.min_seconds, args.min_runs)
        for name, path in cases.items()
    }
    report = {
        "benchmark": "decode_image",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
