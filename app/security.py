"""API keys: who may call the service.

When ``CONVIRT_API_KEYS`` holds keys, every route but ``/health`` and ``/ready`` needs one,
sent as ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``. Keys are compared in
constant time (:func:`hmac.compare_digest`) against every configured key, so the response
time tells an attacker nothing about how much of a guess was right or which key it was
close to. Keys are never logged.

Two more guards run before any route (:class:`RequestGuardMiddleware`):

- ``Host`` must name one of ``CONVIRT_ALLOWED_HOSTS`` (any port), else 400
  ``host_not_allowed``: a page on an attacker's domain that re-points its DNS name at
  127.0.0.1 (DNS rebinding) sends its own name as ``Host`` and is refused. ``/health`` and
  ``/ready`` are exempt, so probes that address the container by IP keep working.
- An unsafe request (anything but GET, HEAD, OPTIONS) from another origin is refused with
  403 ``cross_origin_forbidden`` unless it carries a valid API key: in anonymous loopback
  mode any web page the user visits could otherwise POST uploads and evaluations to the
  service. Cross-origin is read from ``Sec-Fetch-Site`` when the browser sends it, else
  from ``Origin`` against ``Host``; a request with neither comes from no browser page.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.problems import problem_response, problem_responses, to_problem
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


#: Methods that change nothing; every other method is checked for its origin.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def split_host(value: str) -> tuple[str, str | None]:
    """``Host`` header value → (lower-case name, port or None); IPv6 names keep brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value.partition("]")
        name += "]"
        port = rest[1:] if rest.startswith(":") else None
        return name, port or None
    name, _, port = value.partition(":")
    return name, port or None


def host_allowed(host: str | None, allowed: Sequence[str]) -> bool:
    """Whether a ``Host`` header names one of ``allowed`` (``*`` allows any), any port."""
    if "*" in allowed:
        return True
    if not host:
        return False
    name, port = split_host(host)
    if port is not None and not port.isdigit():
        return False
    return name in allowed


def is_cross_origin(headers: Headers, scheme: str) -> bool:
    """Whether a browser sent this request from a page of another origin."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None:
        # same-site is still another origin (another port or sub-domain): refused too.
        return fetch_site.strip().lower() not in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is None:
        return False
    parts = urlsplit(origin.strip().lower())
    if origin.strip().lower() == "null" or not parts.hostname or parts.scheme not in _DEFAULT_PORTS:
        return True
    origin_port = str(parts.port) if parts.port else _DEFAULT_PORTS[parts.scheme]
    host_name, host_port = split_host(headers.get("host", ""))
    origin_name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return (origin_name, origin_port) != (host_name, host_port or _DEFAULT_PORTS.get(scheme))


class RequestGuardMiddleware:
    """Refuses requests for other host names and unsafe cross-origin requests without a key.

    See the module docstring; both checks look at headers only, before any body is read.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_hosts: Sequence[str],
        keys: Sequence[bytes],
        exempt_paths: Sequence[str],
    ) -> None:
        self.app = app
        self.allowed_hosts = tuple(allowed_hosts)
        self.keys = tuple(keys)
        self.exempt_paths = frozenset(exempt_paths)

    def _problem(self, scope: Scope) -> ProblemError | None:
        headers = Headers(scope=scope)
        if scope["path"] not in self.exempt_paths and not host_allowed(
            headers.get("host"), self.allowed_hosts
        ):
            return ProblemError(
                400,
                "host_not_allowed",
                "the Host header names no host this service answers to (CONVIRT_ALLOWED_HOSTS)",
            )
        if scope["method"] in SAFE_METHODS or not is_cross_origin(
            headers, str(scope.get("scheme", "http"))
        ):
            return None
        keyed = bool(self.keys) and (
            check_credentials(headers.get("x-api-key"), headers.get("authorization"), self.keys)
            is None
        )
        if keyed:
            return None
        return ProblemError(
            403,
            "cross_origin_forbidden",
            "a page of another origin may not change this service without an API key",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self._problem(scope)
        if problem is None:
            await self.app(scope, receive, send)
            return
        response = problem_response(to_problem(problem, scope["path"]), {"Vary": "Origin"})
        await response(scope, receive, send)


#: Headers added to every response that does not set them itself.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    # Browsers must not guess a type: an uploaded file served as image/png stays an image.
    (b"x-content-type-options", b"nosniff"),
)


class SecurityHeadersMiddleware:
    """Adds :data:`SECURITY_HEADERS` to every HTTP response, error responses included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS if n not in present]
                if extra:
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def document_guards(schema: dict[str, Any], exempt_paths: Sequence[str]) -> None:
    """Add the guards' answers to an OpenAPI document, in place.

    Every operation outside ``exempt_paths`` may answer 400 (a Host that is not allowed,
    or a body that cannot be parsed at all), and every unsafe one 403 (another origin
    without a key).
    """
    for path, item in schema.get("paths", {}).items():
        if path in exempt_paths:
            continue
        for method, operation in item.items():
            if not isinstance(operation, dict):
                continue
            statuses = [400] if method.upper() in SAFE_METHODS else [400, 403]
            responses = operation.setdefault("responses", {})
            for status, entry in problem_responses(*statuses).items():
                responses.setdefault(str(status), entry)
