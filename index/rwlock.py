"""A readers–writer lock that prefers writers.

Searches take the read side and run together (FAISS releases the GIL while it searches,
so they really do run in parallel); ``add``/``remove`` take the write side and run alone.
Writers are preferred: once a writer waits, new readers queue behind it, so a steady
stream of searches cannot starve an update. The lock is not re-entrant: a thread that
holds the read side must not ask for it again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ReadWriteLock:
    """Many readers or one writer, never both."""

    def __init__(self) -> None:
        # Entering the bare lock is cheaper than entering the Condition (no Python frame),
        # and searches pass through here twice each.
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        with self._mutex:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._mutex:
            self._readers -= 1
            # Only writers wait for the reader count to drop; skip the wake-up otherwise.
            if self._readers == 0 and self._writers_waiting:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._mutex:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._mutex:
            self._writer = False
            self._cond.notify_all()

    @contextmanager
    def read(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def write(self) -> Iterator[None]:
        self.acquire_write()
        try:
            yield
        finally:
            self.release_write()
