"""Two CPU processes under torchrun (gloo) compute the single-process loss and gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.data.synthetic import generate_corpus

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(command: list[str], timeout: float) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_match_one_on_the_same_global_batch(tmp_path: Path) -> None:
    manifest = generate_corpus(tmp_path / "corpus", 32, seed=5, size=96, progress=False)
    towers = tmp_path / "towers"
    args = [str(manifest), str(towers)]
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    _run([sys.executable, str(WORKER), str(single), *args, str(tmp_path / "run1")], 300)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(WORKER),
            str(double),
            *args,
            str(tmp_path / "run2"),
        ],
        300,
    )
    one = torch.load(single, weights_only=True)
    two = torch.load(double, weights_only=True)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert (one["local_batch"], two["local_batch"]) == (8, 4)
    assert one["global_batch"] == two["global_batch"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert one["grads"].keys() == two["grads"].keys()
    assert len(one["grads"]) > 10
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Not a comparison of zeros.
    assert sum(float(g.abs().sum()) for g in one["grads"].values()) > 0
