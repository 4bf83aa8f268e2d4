"""Typed errors of the model package.

Every error carries a stable machine-readable ``code`` that the service maps to an
``application/problem+json`` response; the message is for humans.
"""

from __future__ import annotations


class ModelError(Exception):
    """Base class of every error raised on purpose by :mod:`model`."""

    code: str = "model_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)
