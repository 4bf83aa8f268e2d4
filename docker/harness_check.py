"""HTTP checks of the compose harness (docker/harness.sh) against the running stack.

Standard library only: it runs on the host with whatever ``python3`` is there.

    python3 docker/harness_check.py wait-ready URL TIMEOUT_S
    python3 docker/harness_check.py exercise URL KEY STATE.json   # first start
    python3 docker/harness_check.py verify   URL KEY STATE.json   # after down + up

``exercise`` checks authentication and the refusal of an oversized body, uploads one image
(a PNG drawn here, so its bytes are new to the demo corpus), searches by text and by the
stored image, and writes what a restart must preserve to STATE.json. ``verify`` checks
that the restarted stack still has it: same model, same image count, the upload with its
hash and thumbnail, the same text hits, and a re-upload of the same bytes deduplicated to
the same id. Any failed check exits with status 1 and a one-line reason on stderr.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from pathlib import Path
from typing import Any, Final

logger = logging.getLogger("harness_check")

QUERY: Final = "small right pleural effusion with blunting of the costophrenic angle"
K: Final = 5
REQUEST_TIMEOUT_S: Final = 120.0
UPLOAD_REPORT: Final = "Harness upload. Lungs are clear. No pleural effusion or pneumothorax."
UPLOAD_STUDY_REF: Final = "compose-harness-1"
#: How long a change made through one replica may take to reach another (the feed's lag).
SETTLE_S: Final = 3.0


class CheckFailedError(Exception):
    """A check of the stack failed; the message says which and what was seen."""

    code = "check_failed"


class Response:
    """Status, headers and body of one HTTP exchange (error statuses included)."""

    def __init__(self, status: int, content_type: str, body: bytes) -> None:
        self.status = status
        self.content_type = content_type
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    method: str,
    url: str,
    *,
    key: str | None = None,
    body: bytes | None = None,
    content_type: str | None = None,
) -> Response:
    """One request; 4xx/5xx come back as a Response instead of raising."""
    headers = {"Accept": "application/json"}
    if key is not None:
        headers["X-API-Key"] = key
    if content_type is not None:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            return Response(resp.status, resp.headers.get("Content-Type", ""), resp.read())
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.headers.get("Content-Type", ""), exc.read())


def post_json(url: str, payload: dict[str, Any], *, key: str | None) -> Response:
    return request(
        "POST", url, key=key, body=json.dumps(payload).encode(), content_type="application/json"
    )


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailedError(message)


def expect_status(resp: Response, status: int, what: str) -> None:
    expect(
        resp.status == status,
        f"{what}: expected HTTP {status}, got {resp.status}: {resp.body[:500]!r}",
    )


def png_image(size: int = 256) -> bytes:
    """An 8-bit grayscale PNG, ``size`` × ``size``: a bright field with two dark lung fields.

    Drawn here, so the harness needs no data files and its bytes match no demo image.
    """
    rows = []
    for y in range(size):
        row = bytearray([0])  # PNG filter type 0 (None) for this scanline
        for x in range(size):
            value = 200 - (y * 40) // size
            for cx in (size * 0.32, size * 0.68):
                dx = (x - cx) / (size * 0.16)
                dy = (y - size * 0.5) / (size * 0.32)
                if dx * dx + dy * dy < 1.0:
                    value = 40 + (x * 7 + y * 3) % 23
            row.append(value)
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)  # 8-bit, grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
        + chunk(b"IEND", b"")
    )


def multipart(
    fields: list[tuple[str, str]], files: list[tuple[str, str, bytes, str]]
) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body and its content type; files are (field, name, bytes, type)."""
    boundary = f"harness-{uuid.uuid4().hex}"
    parts: list[bytes] = []
    for name, value in fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for field, filename, data, media_type in files:
        parts.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                f'filename="{filename}"\r\nContent-Type: {media_type}\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def upload(base: str, key: str, data: bytes) -> dict[str, Any]:
    """Upload ``data`` as one PNG with a report; return its result entry."""
    body, content_type = multipart(
        [("report_text", UPLOAD_REPORT), ("study_ref", UPLOAD_STUDY_REF), ("view_position", "PA")],
        [("files", "harness.png", data, "image/png")],
    )
    resp = request("POST", f"{base}/images", key=key, body=body, content_type=content_type)
    expect_status(resp, 201, "POST /images")
    results = resp.json()["results"]
    expect(len(results) == 1, f"POST /images: expected 1 result, got {results}")
    result: dict[str, Any] = results[0]
    return result


def ready(base: str, images: int | None = None) -> dict[str, Any]:
    """``/ready`` once its index holds every stored image (and ``images`` of them, if given).

    Behind the proxy each answer may come from another replica, and a replica applies a
    change made through another one within the feed's lag: so the check is retried for
    ``SETTLE_S`` before it fails.
    """
    deadline = time.monotonic() + SETTLE_S
    while True:
        resp = request("GET", f"{base}/ready")
        expect_status(resp, 200, "GET /ready")
        state: dict[str, Any] = resp.json()
        settled = state["images"] == state["index_vectors"]
        if settled and (images is None or state["images"] == images):
            return state
        if time.monotonic() >= deadline:
            expect(
                settled,
                f"/ready: {state['images']} images but {state['index_vectors']} index vectors",
            )
            expect(False, f"/ready: {state['images']} images, expected {images}")
        time.sleep(0.2)


def text_search(base: str, key: str, model_id: str, expected_hits: int) -> list[int]:
    """Run the harness query; check ranking invariants; return the hit ids in rank order."""
    resp = post_json(f"{base}/search/text", {"query": QUERY, "k": K}, key=key)
    expect_status(resp, 200, "POST /search/text")
    result = resp.json()
    hits = result["hits"]
    expect(result["model_id"] == model_id, f"search model {result['model_id']} != {model_id}")
    expect(len(hits) == expected_hits, f"text search: {len(hits)} hits, expected {expected_hits}")
    expect(
        [h["rank"] for h in hits] == list(range(1, len(hits) + 1)), f"ranks out of order: {hits}"
    )
    scores = [h["score"] for h in hits]
    expect(scores == sorted(scores, reverse=True), f"scores not best first: {scores}")
    expect(all(-1.0001 <= s <= 1.0001 for s in scores), f"scores not cosines: {scores}")
    return [int(h["image_id"]) for h in hits]


def wait_ready(base: str, timeout_s: float) -> None:
    """Poll ``/ready`` until it answers 200, at most ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            resp = request("GET", f"{base}/ready")
            if resp.status == 200:
                return
            last = f"HTTP {resp.status}: {resp.body[:300]!r}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(2.0)
    raise CheckFailedError(f"/ready did not answer 200 within {timeout_s:.0f} s; last: {last}")


def oversized_upload(base: str, key: str) -> None:
    """A body announced larger than any upload limit: refused at once, as a problem document.

    Only the headers and a few bytes are sent: the refusal must come from the
    Content-Length alone (through the proxy, from its client_max_body_size), before the
    body is read.
    """
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    try:
        conn.putrequest("POST", "/images")
        conn.putheader("X-API-Key", key)
        conn.putheader("Content-Type", "multipart/form-data; boundary=x")
        conn.putheader("Content-Length", str(1 << 40))
        conn.endheaders(b"--x\r\n")
        resp = conn.getresponse()
        body = resp.read()
        content_type = resp.getheader("Content-Type", "")
    finally:
        conn.close()
    expect(resp.status == 413, f"a 1 TiB upload: expected HTTP 413, got {resp.status}")
    expect(
        content_type.startswith("application/problem+json"),
        f"413 is not a problem document: {content_type} {body[:200]!r}",
    )
    expect(json.loads(body).get("code") == "payload_too_large", f"413 body: {body[:300]!r}")


def exercise(base: str, key: str, state_path: Path) -> dict[str, Any]:
    """First start: auth, upload, searches; the facts a restart must keep go to ``state_path``."""
    expect_status(request("GET", f"{base}/health"), 200, "GET /health")
    before = ready(base)
    expect(before["images"] > 0, "the demo corpus was not ingested: /ready reports 0 images")

    anonymous = post_json(f"{base}/search/text", {"query": QUERY, "k": K}, key=None)
    expect_status(anonymous, 401, "POST /search/text without a key")
    expect(
        anonymous.content_type.startswith("application/problem+json"),
        f"401 is not a problem document: {anonymous.content_type}",
    )
    expect_status(
        post_json(f"{base}/search/text", {"query": QUERY}, key="x" * 32),
        401,
        "POST /search/text with a wrong key",
    )

    oversized_upload(base, key)

    data = png_image()
    content_hash = hashlib.sha256(data).hexdigest()
    result = upload(base, key, data)
    expect(result["status"] == "created", f"upload: expected created, got {result}")
    expect(result["content_hash"] == content_hash, f"upload hash mismatch: {result}")
    image_id = int(result["id"])

    after = ready(base, images=before["images"] + 1)
    hits = text_search(base, key, after["model_id"], min(K, after["images"]))

    # Every replica answers for the new image once it has applied the upload.
    deadline = time.monotonic() + SETTLE_S
    while True:
        by_image = post_json(f"{base}/search/image", {"image_id": image_id, "k": 3}, key=key)
        if by_image.status == 200 or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    expect_status(by_image, 200, "POST /search/image (stored id)")
    image_hits = [h["image_id"] for h in by_image.json()["hits"]]
    expect(image_id not in image_hits, f"the query image is among its own hits: {image_hits}")
    expect(len(image_hits) == min(3, after["images"] - 1), f"image search hits: {image_hits}")

    state = {
        "model_id": after["model_id"],
        "images": after["images"],
        "image_id": image_id,
        "content_hash": content_hash,
        "text_hits": hits,
    }
    state_path.write_text(json.dumps(state))
    return state


def verify(base: str, key: str, state_path: Path) -> dict[str, Any]:
    """After down + up: the model, the rows, the files and the index came back."""
    state = json.loads(state_path.read_text())
    now = ready(base, images=state["images"])
    expect(now["model_id"] == state["model_id"], f"model changed: {now} vs {state}")

    image_id = state["image_id"]
    resp = request("GET", f"{base}/images/{image_id}", key=key)
    expect_status(resp, 200, f"GET /images/{image_id}")
    image = resp.json()
    expect(image["content_hash"] == state["content_hash"], f"stored hash changed: {image}")
    expect(image["report_text"] == UPLOAD_REPORT, f"stored report changed: {image}")
    thumb = request("GET", base + image["thumbnail_url"], key=key)
    expect_status(thumb, 200, "GET thumbnail")
    expect(thumb.body.startswith(b"\x89PNG"), "the thumbnail is not a PNG")

    hits = text_search(base, key, state["model_id"], len(state["text_hits"]))
    expect(hits == state["text_hits"], f"text hits changed: {hits} vs {state['text_hits']}")

    again = upload(base, key, png_image())
    expect(
        again["status"] == "existing" and int(again["id"]) == image_id,
        f"re-upload after restart: expected existing id {image_id}, got {again}",
    )
    return {"images": now["images"], "model_id": now["model_id"]}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[harness_check] %(message)s")
    usage = "usage: harness_check.py wait-ready URL TIMEOUT_S | exercise|verify URL KEY STATE"
    try:
        if len(argv) == 3 and argv[0] == "wait-ready":
            wait_ready(argv[1].rstrip("/"), float(argv[2]))
            logger.info("ready")
        elif len(argv) == 4 and argv[0] in ("exercise", "verify"):
            action = exercise if argv[0] == "exercise" else verify
            summary = action(argv[1].rstrip("/"), argv[2], Path(argv[3]))
            logger.info("%s passed: %s", argv[0], json.dumps(summary))
        else:
            logger.error(usage)
            return 2
    except CheckFailedError as exc:
        logger.error("FAILED: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
