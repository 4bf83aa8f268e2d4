"""What the suite needs from the machine: missing tools skip here, but fail on CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_tool(reason: str) -> NoReturn:
    """Skip a test whose tool (PostgreSQL, Chromium, Docker) is absent; on CI, fail it.

    CI installs every tool in ``.ci/run``, so an absence there is a broken set-up, never a
    reason to pass quietly.
    """
    if on_ci():
        pytest.fail(f"required on CI: {reason}")
    pytest.skip(reason)
