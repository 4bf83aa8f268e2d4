"""Errors raised on purpose by :mod:`app`: the base type and the one that carries an HTTP status.

How they, the ``model`` and ``index`` errors and everything else become
``application/problem+json`` responses is the HTTP side's job: :mod:`app.api.problems`.
"""

from __future__ import annotations

import http
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field


class AppError(Exception):
    """Base class of every error raised on purpose by :mod:`app`.

    ``code`` is a stable snake_case identifier; the message is for people.
    """

    code: str = "app_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ProblemFieldError(BaseModel):
    """One field error of a request that failed validation."""

    loc: list[str | int] = Field(description="where the error is: ('body', 'query'), …")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. 'missing', 'string_too_long'")
    ctx: dict[str, Any] | None = Field(default=None, description="the limits that failed")


class ProblemError(AppError):
    """An error that is meant to reach the client as a problem with this status and code."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str | None = None,
        *,
        title: str | None = None,
        errors: Sequence[ProblemFieldError] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail or code, code=code)
        self.status = status
        self.title = title or status_phrase(status)
        self.detail = detail
        self.errors = list(errors) if errors is not None else None
        self.headers = dict(headers) if headers is not None else None


def status_phrase(status: int) -> str:
    """The reason phrase of an HTTP status (``Error`` for one that has none)."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"
