"""DICOM node throughput: instances/s received over C-STORE and ingested vs ``convirt ingest``.

Run as a script (``python tests/benchmarks/bench_dicom.py``); it prints one JSON object.

``--instances`` synthetic DX radiographs (``--size`` px square, 12-bit, each different) are
written as DICOM files. Each round, on a fresh database and data directory, the same files
are ingested twice:

- ``convirt ingest``: the code behind the command (:func:`app.commands.ingest.ingest_sources`,
  batch 16), bundle already loaded;
- ``dicom-node``: a :class:`app.services.dicom_node.DicomNode` listens on 127.0.0.1 and a
  pynetdicom SCU in a separate process (as a sender is) sends every file over one
  association; the time runs from the association request to the moment the node has
  committed and indexed every acknowledged instance (its stop drains the ingest thread).

The two alternate over ``--rounds`` so that background load on a shared machine hits both
alike. Reported: instances/s of each (median over rounds) and their ratio (goal: the node
≥ 0.8× ``convirt ingest``), with the load average before and after.

The bundle is ``--bundle`` or, if omitted, one exported like the tests' (pretrained
towers, untrained heads): weights do not change inference cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from app.commands.ingest import discover, ingest_sources  # noqa: E402
from app.services.dicom_node import DicomNode  # noqa: E402
from app.services.runtime import Runtime  # noqa: E402
from app.settings import Settings  # noqa: E402
from model.bundle import EncoderBundle  # noqa: E402
from tests.app.process_support import free_port  # noqa: E402

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
CALLER = "BENCH"


def make_instances(out: Path, n: int, size: int, seed: int) -> list[Path]:
    """``n`` DX DICOM files of smooth random 12-bit pictures, one study."""
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        coarse = rng.random((size // 32, size // 32))
        picture = np.kron(coarse, np.ones((32, 32)))  # (size, size), blocky but not constant
        pixels = (picture * 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(DX_STORAGE)
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = DX_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.Modality = "DX"
        ds.ViewPosition = "PA"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        path = out / f"{i:05d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def settings_for(work: Path, bundle_dir: Path) -> Settings:
    work.mkdir(parents=True)
    return Settings(
        data_dir=work,
        bundle_dir=bundle_dir,
        dicom_port=free_port(),
        dicom_calling_aes=[CALLER],
        log_level="WARNING",
    )


def run_ingest(settings: Settings, bundle: EncoderBundle, files: Path) -> float:
    runtime = Runtime.start(settings, bundle=bundle)
    try:
        start = time.perf_counter()
        counts = ingest_sources(runtime, discover(files), batch_size=16, progress=False)
        runtime.index.save_if_dirty()
        elapsed = time.perf_counter() - start
    finally:
        runtime.close()
    assert counts["failed"] == 0, counts
    return elapsed


# The sender runs in its own interpreter, as a modality or PACS does on its own machine:
# in this one it would compete with the node for the GIL. It imports pynetdicom, says
# "ready", waits for "go", then sends every file over one association.
SCU_SCRIPT = """
import sys
from pynetdicom import AE
host, port, called, caller, syntax, transfer, *paths = sys.argv[1:]
ae = AE(ae_title=caller)
ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 300
ae.add_requested_context(syntax, transfer)
print("ready", flush=True)
sys.stdin.readline()
assoc = ae.associate(host, int(port), ae_title=called)
assert assoc.is_established
failed = sum(int(assoc.send_c_store(path).Status) != 0 for path in paths)
assoc.release()
print(failed, flush=True)
"""


def run_node(settings: Settings, bundle: EncoderBundle, paths: list[Path]) -> float:
    runtime = Runtime.start(settings, bundle=bundle)
    node = DicomNode(runtime)
    sender = None
    try:
        node.start()
        sender = subprocess.Popen(
            [
                sys.executable, "-c", SCU_SCRIPT, "127.0.0.1", str(settings.dicom_port),
                settings.dicom_ae_title, CALLER, DX_STORAGE, str(ExplicitVRLittleEndian),
                *map(str, paths),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert sender.stdin is not None
        assert sender.stdout is not None
        assert sender.stdout.readline().strip() == "ready"
        start = time.perf_counter()
        sender.stdin.write("go\n")
        sender.stdin.flush()
        failed = sender.stdout.readline().strip()
        node.stop()  # returns once every acknowledged instance is committed and indexed
        elapsed = time.perf_counter() - start
        assert failed == "0", f"{failed} instances refused"
    finally:
        if sender is not None:
            sender.kill()
            sender.wait()
        node.stop()
        runtime.close()
    assert node.counts["ingested"] == len(paths), dict(node.counts)
    return elapsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=64)
    parser.add_argument("--size", type=int, default=1024, help="pixels per side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bundle", type=Path, help="encoder bundle (default: a test-like one)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-dicom-") as tmp:
        root = Path(tmp)
        bundle_dir = args.bundle
        if bundle_dir is None:
            from tests.app.service_support import build_bundle

            bundle_dir = build_bundle(root / "built")
        bundle = EncoderBundle.load(bundle_dir, device="cpu")
        files = root / "files"
        files.mkdir()
        paths = make_instances(files, args.instances, args.size, seed=0)
        ingest_s, node_s = [], []
        for r in range(args.rounds):
            ingest_s.append(
                run_ingest(settings_for(root / f"ingest-{r}", bundle_dir), bundle, files)
            )
            node_s.append(run_node(settings_for(root / f"node-{r}", bundle_dir), bundle, paths))
    ingest_rate = args.instances / statistics.median(ingest_s)
    node_rate = args.instances / statistics.median(node_s)
    result = {
        "instances": args.instances,
        "size": args.size,
        "rounds": args.rounds,
        "convirt_ingest_per_s": round(ingest_rate, 2),
        "dicom_node_per_s": round(node_rate, 2),
        "ratio_node_to_ingest": round(node_rate / ingest_rate, 3),
        "goal_ratio": 0.8,
        "ingest_seconds": [round(s, 2) for s in ingest_s],
        "node_seconds": [round(s, 2) for s in node_s],
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "bundle": str(args.bundle) if args.bundle else "test-like (pretrained towers)",
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
