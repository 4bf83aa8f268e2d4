"""API keys: who may call the service.

When ``CONVIRT_API_KEYS`` holds keys, every route but ``/health`` and ``/ready`` needs one,
sent as ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``. Keys are compared in
constant time (:func:`hmac.compare_digest`) against every configured key, so the response
time tells an attacker nothing about how much of a guess was right or which key it was
close to. Keys are never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.problems import problem_response, to_problem
from app.errors import ProblemError

# auto_error=False: a missing key must become our own 401 problem, not FastAPI's plain 403.
# Declaring both schemes here is what makes them appear in the OpenAPI document.
_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="One of the keys in CONVIRT_API_KEYS."
)
_bearer = HTTPBearer(
    auto_error=False, description="One of the keys in CONVIRT_API_KEYS, as a bearer token."
)


def encode_keys(keys: Sequence[str]) -> tuple[bytes, ...]:
    """The configured keys (``settings.api_keys``) as bytes, ready for comparison."""
    return tuple(key.encode("utf-8") for key in keys if key)


def key_matches(candidate: str, keys: Sequence[bytes]) -> bool:
    """Whether ``candidate`` equals one of ``keys``, in time independent of which one."""
    given = candidate.encode("utf-8")
    matched = False
    for key in keys:
        # No early exit: every key is compared whatever the outcome of the others.
        matched |= hmac.compare_digest(given, key)
    return matched


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def check_credentials(
    api_key: str | None, authorization: str | None, keys: Sequence[bytes]
) -> ProblemError | None:
    """None when access is granted, else the 401 problem to answer with."""
    if not keys:
        return None
    candidate = api_key or _bearer_token(authorization)
    if candidate and key_matches(candidate, keys):
        return None
    return ProblemError(
        401,
        "invalid_api_key" if candidate else "missing_api_key",
        "send one of the service's API keys as 'X-API-Key: <key>' or 'Authorization: Bearer <key>'",
        headers={"WWW-Authenticate": 'Bearer realm="convirt"'},
    )


class ApiKeyMiddleware:
    """Rejects requests without a valid key before their body is read.

    A dependency alone would run only after FastAPI has parsed (and spooled to disk) a
    multipart upload, so anyone could make the service read large bodies; here the
    headers decide. ``public_paths`` (``/health``, ``/ready``) stay open.
    """

    def __init__(self, app: ASGIApp, keys: Sequence[bytes], public_paths: Sequence[str]) -> None:
        self.app = app
        self.keys = tuple(keys)
        self.public_paths = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.public_paths:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        problem = check_credentials(
            headers.get("x-api-key"), headers.get("authorization"), self.keys
        )
        if problem is None:
            await self.app(scope, receive, send)
            return
        response = problem_response(to_problem(problem, scope["path"]), problem.headers)
        await response(scope, receive, send)


async def require_api_key(
    request: Request,
    api_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Dependency: pass when no keys are configured or a configured key was sent; else 401.

    It repeats :class:`ApiKeyMiddleware`'s check for routes served without it, and its
    two security schemes are what documents the keys in the OpenAPI document.
    """
    keys: tuple[bytes, ...] = request.app.state.api_keys
    authorization = f"Bearer {bearer.credentials}" if bearer is not None else None
    problem = check_credentials(api_key, authorization, keys)
    if problem is not None:
        raise problem
