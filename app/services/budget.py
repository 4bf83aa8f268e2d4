"""A bound on the decoded pixels held in memory at once, across all requests of a process.

A compressed upload is small; decoded, each pixel costs about ten bytes on its way to the
encoder (the float32 picture, its stored levels, the encoder's float copy). Ingest and
image search reserve the pixels an image's header announces *before* decoding it, and
give them back when the image is embedded and stored; a request that would take the
total over the budget waits for others to finish, for a bounded time, and then gets 503
``busy`` with ``Retry-After``. An image larger than the whole budget could never be
served, so it is refused at once (422 ``image_too_large``) instead of waiting forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from app.errors import ProblemError

logger = logging.getLogger(__name__)

#: Seconds a client is told to wait before retrying a request refused as ``busy``.
BUSY_RETRY_AFTER_S: Final = 5


class BusyError(ProblemError):
    """The budget stayed exhausted for longer than the request may wait."""

    def __init__(self, detail: str) -> None:
        super().__init__(503, "busy", detail, headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})


class PixelBudget:
    """Counts reserved pixels against ``total``; thread-safe, first come first served."""

    def __init__(self, total: int, *, wait_s: float) -> None:
        if total < 1:
            raise ValueError(f"pixel budget {total} is not positive")
        self.total = total
        self.wait_s = wait_s
        self._used = 0
        self._turns = threading.Condition()
        # Waiters in arrival order: a big reservation is not starved by a stream of small ones.
        self._queue: deque[object] = deque()

    @property
    def in_use(self) -> int:
        return self._used

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` (≤ ``total``) of the budget for the block.

        Raises:
            BusyError: the pixels did not become free within ``wait_s`` seconds.
            ValueError: more pixels than the whole budget (the caller refuses the image).
        """
        held = self.acquire(pixels)
        try:
            yield
        finally:
            self.release(held)

    def acquire(self, pixels: int) -> int:
        """Take ``pixels`` of the budget until :meth:`release`; returns what to release.

        For holds that outlive a block: an image decoded in one thread and stored by
        another. Raises as :meth:`reserve` does.
        """
        if pixels > self.total:
            raise ValueError(f"{pixels} pixels exceed the whole budget of {self.total}")
        pixels = max(0, pixels)
        deadline = time.monotonic() + self.wait_s
        me = object()
        with self._turns:
            self._queue.append(me)
            try:
                while self._queue[0] is not me or self._used + pixels > self.total:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        logger.warning("pixel budget exhausted for %.1f s", self.wait_s)
                        raise BusyError(
                            f"the service is decoding other images ({self._used} of "
                            f"{self.total} pixels in use); retry shortly"
                        )
                    self._turns.wait(left)
                self._used += pixels
            finally:
                self._queue.remove(me)
                self._turns.notify_all()
        return pixels

    def release(self, pixels: int) -> None:
        """Give back ``pixels`` taken by :meth:`acquire`."""
        with self._turns:
            self._used -= pixels
            self._turns.notify_all()
