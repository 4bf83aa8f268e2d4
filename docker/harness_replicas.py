"""The compose harness's checks of the API replicas behind the proxy (docker/harness.sh).

Standard library only; runs on the host. What a replica serves is asked of that replica
alone, on its own loopback address, through ``docker exec`` (docker/harness_watch.py),
never by a container's bridge address; changes go through the proxy.

    python3 docker/harness_replicas.py propagation URL KEY CONTAINER...
    python3 docker/harness_replicas.py failover URL KEY CONTAINER SECONDS KILL_AT_S CLIENTS
    python3 docker/harness_replicas.py catch-up URL KEY CONTAINER IMAGE_ID
    python3 docker/harness_replicas.py pacs URL KEY CONTAINER ORTHANC_URL USER PASSWORD

- ``propagation``: an upload through the proxy is searchable on every replica, and a
  delete gone from every replica, within ``MAX_LAG_S`` of the proxy's answer.
- ``failover``: CLIENTS loops search through the proxy for SECONDS; at KILL_AT_S the
  replica CONTAINER is killed (``docker kill``). Every request is timed, so the failures
  can be compared with the requests that were in flight at the kill: only those may fail,
  and searches must go on succeeding. An image is uploaded during the outage for
  ``catch-up``. Prints the counts.
- ``catch-up``: the restarted replica serves IMAGE_ID (added while it was down), reports
  no feed lag, and forgets IMAGE_ID once it is deleted through the proxy.
- ``pacs``: a radiograph stored in the stack's Orthanc (docker/harness_pacs.py, run in
  CONTAINER, which reaches Orthanc by its service name) becomes searchable through the
  proxy, under its StudyInstanceUID: the follower fetched and ingested it.

Each prints one JSON summary on stdout; a failed check exits 1 with the reason on stderr.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from harness_check import (
    QUERY,
    CheckFailedError,
    Response,
    expect,
    expect_status,
    multipart,
    png_image,
    post_json,
    request,
)

logger = logging.getLogger("harness_replicas")

WATCH_SCRIPT: Final = Path(__file__).with_name("harness_watch.py")
PACS_SCRIPT: Final = Path(__file__).with_name("harness_pacs.py")
#: The follower polls the PACS every 10 s by default; then fetches, embeds and stores.
PACS_TIMEOUT_S: Final = 90.0
#: The feed's promise: a change is searchable everywhere this soon after it commits.
MAX_LAG_S: Final = 2.0
WATCH_TIMEOUT_S: Final = 30.0
REPLICA_URL: Final = "http://127.0.0.1:8000"
PYTHON_IN_IMAGE: Final = "/opt/venv/bin/python"


class Watcher:
    """harness_watch.py running inside one replica; its JSON lines read one at a time."""

    def __init__(self, container: str, *args: str) -> None:
        self.container = container
        self.process = subprocess.Popen(
            ["docker", "exec", "-i", container, PYTHON_IN_IMAGE, "-", *args],
            stdin=WATCH_SCRIPT.open("rb"),
            stdout=subprocess.PIPE,
            text=True,
        )

    def line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        raw = self.process.stdout.readline()
        if not raw:
            self.process.wait(timeout=10)
            raise CheckFailedError(
                f"watcher in {self.container[:12]} ended (status {self.process.returncode})"
            )
        answer: dict[str, Any] = json.loads(raw)
        if "error" in answer:
            raise CheckFailedError(f"replica {self.container[:12]}: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def watch_once(container: str, *args: str) -> dict[str, Any]:
    """Run one watcher in ``container`` to its first answer."""
    with Watcher(container, *args) as watcher:
        return watcher.line()


def upload_png(base: str, key: str, size: int, ref: str) -> int:
    """Upload a new PNG (its bytes depend on ``size``) through ``base``; its image id."""
    body, content_type = multipart(
        [("report_text", "Harness replica check. No acute findings."), ("study_ref", ref)],
        [("files", f"{ref}.png", png_image(size), "image/png")],
    )
    resp = request("POST", f"{base}/images", key=key, body=body, content_type=content_type)
    expect_status(resp, 201, "POST /images through the proxy")
    result = resp.json()["results"][0]
    expect(result["status"] == "created", f"upload {ref}: expected created, got {result}")
    return int(result["id"])


def delete_image(base: str, key: str, image_id: int) -> None:
    resp = request("DELETE", f"{base}/images/{image_id}", key=key)
    expect(resp.status in (200, 204), f"DELETE /images/{image_id}: HTTP {resp.status}")


def _lags(
    watchers: list[Watcher], answered_at: float, image_id: int, what: str
) -> dict[str, float]:
    lags: dict[str, float] = {}
    for watcher in watchers:
        seen = watcher.line()
        expect(seen["id"] == image_id, f"{what}: replica saw image {seen['id']}, not {image_id}")
        # The change committed before the proxy answered; a replica may see it first.
        lag = max(0.0, float(seen["seen_at"]) - answered_at)
        expect(lag <= MAX_LAG_S, f"{what} reached {watcher.container[:12]} after {lag:.2f} s")
        lags[watcher.container[:12]] = round(lag, 3)
    return lags


def propagation(base: str, key: str, containers: list[str]) -> dict[str, Any]:
    """An upload and a delete through the proxy, seen by each replica within MAX_LAG_S."""
    timeout = str(WATCH_TIMEOUT_S)
    with ExitStack() as stack:
        watchers = [
            stack.enter_context(Watcher(c, "added", REPLICA_URL, key, timeout)) for c in containers
        ]
        for watcher in watchers:
            watcher.line()  # {"ready": true}: its baseline is taken
        image_id = upload_png(base, key, 224, "harness-replicas")
        added = _lags(watchers, time.time(), image_id, "the upload")
    with ExitStack() as stack:
        watchers = [
            stack.enter_context(Watcher(c, "gone", REPLICA_URL, key, str(image_id), timeout))
            for c in containers
        ]
        for watcher in watchers:
            watcher.line()
        delete_image(base, key, image_id)
        deleted = _lags(watchers, time.time(), image_id, "the delete")
    return {"replicas": len(containers), "add_lag_s": added, "delete_lag_s": deleted}


@dataclass(frozen=True)
class Attempt:
    started: float
    ended: float
    status: int  # 0: no HTTP answer at all


def _search_loop(base: str, key: str, until: float, out: list[Attempt]) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            resp: Response | None = post_json(
                f"{base}/search/text", {"query": QUERY, "k": 5}, key=key
            )
        except OSError:
            resp = None
        out.append(Attempt(started, time.monotonic(), resp.status if resp else 0))


def failover(
    base: str, key: str, container: str, seconds: float, kill_at: float, clients: int
) -> dict[str, Any]:
    """Kill one replica during a search loop through the proxy; count what failed."""
    start = time.monotonic()
    until = start + seconds
    records: list[list[Attempt]] = [[] for _ in range(clients)]
    threads = [
        threading.Thread(target=_search_loop, args=(base, key, until, out), daemon=True)
        for out in records
    ]
    for thread in threads:
        thread.start()
    time.sleep(kill_at)
    kill_from = time.monotonic()
    subprocess.run(["docker", "kill", container], check=True, capture_output=True)
    kill_to = time.monotonic()
    # While the replica is down, a change for it to catch up with on its restart.
    time.sleep(1.0)
    outage_image = upload_png(base, key, 200, "harness-outage")
    for thread in threads:
        thread.join(timeout=seconds + 60)
    attempts = sorted((a for out in records for a in out), key=lambda a: a.started)
    failed = [a for a in attempts if a.status != 200]
    # In flight at the kill: sent before `docker kill` returned, not answered before it began.
    in_flight = [a for a in attempts if a.started <= kill_to and a.ended >= kill_from]
    stray = [a for a in failed if not (a.started <= kill_to and a.ended >= kill_from)]
    after_kill = [a for a in attempts if a.started > kill_to]
    summary = {
        "requests": len(attempts),
        "failed": len(failed),
        "failed_statuses": sorted({a.status for a in failed}),
        "in_flight_at_kill": len(in_flight),
        "failed_not_in_flight": len(stray),
        "ok_after_kill": sum(a.status == 200 for a in after_kill),
        "requests_after_kill": len(after_kill),
        "slowest_after_kill_s": round(max((a.ended - a.started for a in after_kill), default=0), 3),
        "outage_image_id": outage_image,
    }
    expect(not stray, f"requests failed that were not in flight at the kill: {summary}")
    expect(
        bool(after_kill) and summary["ok_after_kill"] == len(after_kill),
        f"search did not go on after the kill: {summary}",
    )
    return summary


def catch_up(base: str, key: str, container: str, image_id: int) -> dict[str, Any]:
    """The restarted replica has the outage's upload, no lag, and follows its delete."""
    timeout = str(WATCH_TIMEOUT_S)
    watch_once(container, "has", REPLICA_URL, key, str(image_id), timeout)
    state = watch_once(container, "ready", REPLICA_URL, key)
    expect(state.get("feed_lag_changes") == 0, f"restarted replica still lags: {state}")
    with Watcher(container, "gone", REPLICA_URL, key, str(image_id), timeout) as gone:
        gone.line()
        delete_image(base, key, image_id)
        lag = _lags([gone], time.time(), image_id, "the delete after the restart")
    return {"images": state.get("images"), "delete_lag_s": lag}


def pacs(
    base: str, key: str, container: str, orthanc: str, user: str, password: str
) -> dict[str, Any]:
    """A study stored in Orthanc is followed into the service and found by its UID."""
    sent = subprocess.run(
        ["docker", "exec", "-i", container, PYTHON_IN_IMAGE, "-", orthanc, user, password],
        stdin=PACS_SCRIPT.open("rb"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    expect(sent.returncode == 0, f"storing in Orthanc failed: {sent.stderr[-2000:]}")
    study_uid = json.loads(sent.stdout.strip().splitlines()[-1])["study_instance_uid"]
    stored_at = time.monotonic()
    deadline = stored_at + PACS_TIMEOUT_S
    while True:
        resp = post_json(f"{base}/search/text", {"query": QUERY, "k": 1000}, key=key)
        expect_status(resp, 200, "POST /search/text")
        hits = [h for h in resp.json()["hits"] if h.get("study_instance_uid") == study_uid]
        if hits:
            break
        expect(
            time.monotonic() < deadline,
            f"study {study_uid} not searchable after {PACS_TIMEOUT_S:.0f} s",
        )
        time.sleep(1.0)
    return {
        "study_instance_uid": study_uid,
        "image_id": hits[0]["image_id"],
        "searchable_after_s": round(time.monotonic() - stored_at, 1),
    }


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[harness_replicas] %(message)s")
    try:
        if len(argv) >= 4 and argv[0] == "propagation":
            summary = propagation(argv[1].rstrip("/"), argv[2], argv[3:])
        elif len(argv) == 7 and argv[0] == "failover":
            summary = failover(
                argv[1].rstrip("/"), argv[2], argv[3], float(argv[4]), float(argv[5]), int(argv[6])
            )
        elif len(argv) == 7 and argv[0] == "pacs":
            summary = pacs(argv[1].rstrip("/"), *argv[2:])
        elif len(argv) == 5 and argv[0] == "catch-up":
            summary = catch_up(argv[1].rstrip("/"), argv[2], argv[3], int(argv[4]))
        else:
            logger.error(__doc__.split("\n\n")[2] if __doc__ else "bad arguments")
            return 2
    except CheckFailedError as exc:
        logger.error("FAILED: %s", exc)
        return 1
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
