"""Where ``POST /evaluations`` may read: only under the configured evaluation roots.

An evaluation reads files the caller names (protocol files, manifests, and the images
they list). Over HTTP that would let any caller probe the server's file system: a failed
run would say whether ``/root/...`` exists and what kind of file it is. So every path of
a request, and every image path inside the files it names, must resolve (symbolic links
followed) to a place inside one of ``CONVIRT_EVALUATION_ROOTS`` (by default
``{data_dir}/evaluation``). The checks run at submission, before a file is opened, and
their messages never repeat a path that is outside the roots.

``convirt evaluate``, run by an operator on the server itself, is not confined.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from app.errors import ProblemError

#: Longest file-name component most file systems accept, in bytes.
MAX_COMPONENT_BYTES: Final = 255


class InvalidPathError(ProblemError):
    """A path that no file system would accept (control characters, oversized parts)."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(422, "invalid_path", f"the {what} path {why}")


class PathOutsideRootsError(ProblemError):
    """A path that resolves outside every evaluation root."""

    def __init__(self, what: str) -> None:
        super().__init__(
            422,
            "path_outside_roots",
            f"the {what} is not inside an evaluation root (CONVIRT_EVALUATION_ROOTS); "
            "copy or link the files under one",
        )


def check_path_text(raw: str, what: str) -> None:
    """Refuse a path with a control character (NUL included) or a component over 255 bytes.

    Raises:
        InvalidPathError: 422 ``invalid_path``; the message does not repeat the path.
    """
    if any(unicodedata.category(ch) == "Cc" for ch in raw):
        raise InvalidPathError(what, "holds a control character")
    for part in raw.replace("\\", "/").split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            raise InvalidPathError(what, f"has a component over {MAX_COMPONENT_BYTES} bytes")


def is_inside(path: Path, roots: Sequence[Path]) -> bool:
    """Whether ``path`` (already resolved) is one of ``roots`` or below one."""
    return any(path == root or path.is_relative_to(root) for root in roots)


def confine(raw: str | Path, roots: Sequence[Path], what: str) -> Path:
    """``raw`` resolved, if it lies inside ``roots``; a relative path is taken from the first.

    Resolving follows symbolic links (no file is opened), so a link inside a root that
    points elsewhere is refused too.

    Raises:
        InvalidPathError: control characters or an oversized component (422).
        PathOutsideRootsError: the resolved path is outside every root (422).
    """
    text = str(raw)
    check_path_text(text, what)
    if not roots:
        raise PathOutsideRootsError(what)
    path = Path(text).expanduser() if text.startswith("~") else Path(text)
    if not path.is_absolute():
        path = roots[0] / path
    resolved = Path(os.path.realpath(path))
    if not is_inside(resolved, roots):
        raise PathOutsideRootsError(what)
    return resolved


def confine_images(
    items: Iterable[tuple[str, str]], base: Path | None, roots: Sequence[Path]
) -> None:
    """Check the images a protocol names: ``(path, where)`` pairs, relative to ``base``.

    The error names the row (``where``), never the offending path.

    Raises:
        InvalidPathError, PathOutsideRootsError: for the first image that fails.
    """
    for path, where in items:
        candidate = Path(path) if base is None or Path(path).is_absolute() else base / path
        try:
            confine(candidate, roots, "image")
        except ProblemError as exc:
            raise ProblemError(exc.status, exc.code, f"{where}: {exc.detail}") from None


def confine_protocol_dir(raw: str | None, root: Path, roots: Sequence[Path]) -> Path:
    """The CheXpert 8x200 folder (given, or found under ``root``) and its four files, confined.

    Raises:
        InvalidPathError, PathOutsideRootsError: for the folder or a file outside the roots.
    """
    from model.evaluation.protocol import (
        CANDIDATE_FILE,
        IMAGE_DIR,
        QUERY_FILE,
        TEXT_DIR,
        find_protocol_dir,
    )

    folder = confine(raw if raw else find_protocol_dir(root), roots, "protocol folder")
    for sub in (IMAGE_DIR, TEXT_DIR):
        for name in (CANDIDATE_FILE, QUERY_FILE):
            confine(folder / sub / name, roots, f"protocol file {sub}/{name}")
    return folder
