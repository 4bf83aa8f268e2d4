"""Runs inside one API replica of the compose harness and watches what that replica serves.

Standard library only. The harness feeds it to the replica's own interpreter, so that it
asks that replica alone on its loopback address, never through the proxy:

    docker exec -i CONTAINER /opt/venv/bin/python - MODE URL KEY [ID] TIMEOUT_S < harness_watch.py

Modes (each prints JSON lines; the last one is the answer):

- ``added``: takes the set of images the replica's text search returns, prints
  ``{"ready": true}``, then waits until a new image shows up in its searches and prints
  ``{"id": …, "seen_at": epoch seconds}``;
- ``gone ID``: waits until ID is in its searches, prints ``{"ready": true}``, then waits
  until it is not and prints ``{"id": ID, "seen_at": …}``;
- ``has ID``: waits until ID is in its searches and prints ``{"id": ID, "seen_at": …}``;
- ``ready``: prints the replica's ``/ready`` body.

A search asks for ``K_ALL`` hits, so it returns every image of a corpus up to that size:
"in the search results" then means "searchable". Exit status 1 on a timeout.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Final

#: The service's default k_max: every image of the harness's small corpus.
K_ALL: Final = 1000
QUERY: Final = "chest radiograph"
POLL_S: Final = 0.05


def say(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def searchable(base: str, key: str) -> set[int]:
    body = json.dumps({"query": QUERY, "k": K_ALL}).encode()
    req = urllib.request.Request(
        f"{base}/search/text",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "X-API-Key": key},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return {int(hit["image_id"]) for hit in json.loads(resp.read())["hits"]}


def wait_for(condition: Any, timeout_s: float, what: str) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return time.time()
        time.sleep(POLL_S)
    say({"error": f"timed out after {timeout_s:.0f} s waiting for {what}"})
    raise SystemExit(1)


def main(argv: list[str]) -> int:
    mode, base, key = argv[0], argv[1].rstrip("/"), argv[2]
    if mode == "ready":
        with urllib.request.urlopen(f"{base}/ready", timeout=30) as resp:
            say(json.loads(resp.read()))
        return 0
    timeout_s = float(argv[-1])
    if mode == "added":
        baseline = searchable(base, key)
        say({"ready": True, "images": len(baseline)})
        found: list[int] = []

        def new_image() -> bool:
            found[:] = sorted(searchable(base, key) - baseline)
            return bool(found)

        seen_at = wait_for(new_image, timeout_s, "a new image")
        say({"id": found[0], "seen_at": seen_at})
        return 0
    image_id = int(argv[3])
    if mode == "gone":
        wait_for(lambda: image_id in searchable(base, key), timeout_s, f"image {image_id}")
        say({"ready": True})
        seen_at = wait_for(
            lambda: image_id not in searchable(base, key), timeout_s, f"{image_id} to go"
        )
    elif mode == "has":
        seen_at = wait_for(lambda: image_id in searchable(base, key), timeout_s, f"{image_id}")
    else:
        say({"error": f"unknown mode {mode!r}"})
        return 2
    say({"id": image_id, "seen_at": seen_at})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
        say({"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)
