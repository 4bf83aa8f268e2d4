"""The compose stack, built and run for real: ``docker/harness.sh``.

The harness builds the local base, PostgreSQL, nginx, Orthanc and service images and starts
the stack with two API replicas behind the proxy. Through the proxy it follows a study
stored in Orthanc, uploads and searches; it checks each replica directly for a change made
through the other, kills one replica during a search loop (counting the failed requests)
and restarts it; then it restarts the whole stack with ``down`` + ``up``, checks that the
data survived on the volumes, and tears it all down. It needs a usable Docker daemon
(``docker info``): without one the test is skipped, except on CI (``CI=true``), where that
is a failure. ``.ci/run`` installs and starts Docker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.environment import missing_tool

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "docker" / "harness.sh"
#: The harness bounds each of its own waits; this only catches a hang outside them.
HARNESS_TIMEOUT_S = 40 * 60
#: Time left to the harness, after a timeout, to take its stack down.
CLEANUP_S = 5 * 60


def _docker_unusable_reason() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "docker is not installed (apt-get install docker.io docker-compose debootstrap)"
    try:
        probe = subprocess.run(
            [docker, "info"], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 60 s"
    if probe.returncode != 0:
        return f"`docker info` failed: {probe.stderr.strip()[-300:]}"
    if shutil.which("docker-compose") is None:
        compose = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=60, check=False
        )
        if compose.returncode != 0:
            return "neither docker-compose nor `docker compose` is installed"
    return None


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(HARNESS_TIMEOUT_S + 120)
def test_compose_stack_behind_its_proxy_survives_a_replica_and_a_restart() -> None:
    reason = _docker_unusable_reason()
    if reason is not None:
        missing_tool(f"Docker: {reason}")

    env = {k: v for k, v in os.environ.items() if k != "KEEP_IMAGES"}
    # A project name of its own, so that a developer's harness run cannot collide with it.
    env["HARNESS_PROJECT"] = f"convirt-test-{os.getpid()}"
    harness = subprocess.Popen(
        ["bash", str(HARNESS)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = harness.communicate(timeout=HARNESS_TIMEOUT_S - CLEANUP_S)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the harness tears its stack and images down on the way out.
        harness.terminate()
        stdout, stderr = harness.communicate(timeout=CLEANUP_S)
        pytest.fail(f"the harness did not finish in time; stderr (tail):\n{stderr[-8000:]}")
    result = subprocess.CompletedProcess(harness.args, harness.returncode, stdout, stderr)
    assert result.returncode == 0, (
        f"harness failed with status {result.returncode}\n"
        f"--- stderr (tail) ---\n{result.stderr[-8000:]}\n"
        f"--- stdout (tail) ---\n{result.stdout[-2000:]}"
    )
    lines = result.stdout.strip().splitlines()
    assert lines, f"the harness printed no summary; stderr:\n{result.stderr[-4000:]}"
    summary = json.loads(lines[-1])
    # The timings and image sizes, for whoever reads the test log (pytest -s or -rP).
    print(lines[-1])
    assert summary["harness"] == "ok"
    # The second start reuses the volume's bundle and corpus instead of training again.
    assert summary["second_up_ready_s"] < summary["first_up_ready_s"]
    for name in ("base", "postgres", "proxy", "api"):
        assert summary["image_bytes"][name] > 0
    # Two replicas behind the proxy, each searchable on its own within the feed's 2 s.
    assert summary["replicas"] == 2
    propagation = summary["propagation"]
    for lags in (propagation["add_lag_s"], propagation["delete_lag_s"]):
        assert len(lags) == 2
        assert all(lag <= 2.0 for lag in lags.values())
    # Killing a replica fails at most the requests it was answering; search goes on.
    failover = summary["failover"]
    assert failover["failed_not_in_flight"] == 0
    assert failover["failed"] <= failover["in_flight_at_kill"]
    assert failover["ok_after_kill"] == failover["requests_after_kill"] > 0
    # The Orthanc profile's follower made a study stored in the PACS searchable.
    assert summary["pacs"]["image_id"] > 0
    # A CUDA torch (what a plain `pip install torch` brings) would add several GB.
    assert summary["image_bytes"]["api"] < 2_500_000_000
