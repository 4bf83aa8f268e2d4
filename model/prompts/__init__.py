"""Prompt sets of zero-shot classification: versioned YAML files shipped in this package.

A prompt set names findings, each with a positive and a negative prompt ensemble::

    id: chexpert-14          # what a request names; also the file name (chexpert-14.yaml)
    version: 1               # bumped whenever a phrasing changes
    description: ...
    findings:
      - name: Cardiomegaly
        positive: [There is cardiomegaly., The heart is enlarged.]
        negative: [Heart size is within normal limits., No cardiomegaly.]

:func:`load_prompt_set` reads a shipped set by id (:data:`DEFAULT_PROMPT_SET` when none is
named); :func:`read_prompt_set` reads any file of that shape (the evaluation command takes
one). Malformed or unknown sets raise :class:`PromptSetError` (``unknown_prompt_set`` or
``invalid_prompt_set``).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Final

from model.errors import ModelError

logger = logging.getLogger(__name__)

#: The set used when a request names none: the 14 CheXpert observations.
DEFAULT_PROMPT_SET: Final = "chexpert-14"
#: Longest prompt accepted (characters); the text tower truncates long inputs anyway.
MAX_PROMPT_CHARS: Final = 500
_ID_PATTERN: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_DIR: Final = Path(__file__).resolve().parent


class PromptSetError(ModelError):
    """A prompt set that does not exist or cannot be used as written."""

    code = "invalid_prompt_set"


@dataclass(frozen=True)
class FindingPrompts:
    """One finding's prompt ensembles (each non-empty)."""

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


@dataclass(frozen=True)
class PromptSet:
    """A versioned set of findings with their prompts."""

    id: str
    version: int
    description: str
    findings: tuple[FindingPrompts, ...]

    @property
    def key(self) -> str:
        """``id@version``: what cached prompt embeddings are keyed by (with the model id)."""
        return f"{self.id}@{self.version}"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.findings)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "description": self.description,
            "findings": list(self.names),
        }


def _prompts(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise PromptSetError(f"{where}: expected a non-empty list of prompts")
    prompts = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise PromptSetError(f"{where}: every prompt must be a non-empty string")
        if len(item) > MAX_PROMPT_CHARS:
            raise PromptSetError(f"{where}: a prompt is longer than {MAX_PROMPT_CHARS} characters")
        prompts.append(item.strip())
    return tuple(prompts)


def parse_prompt_set(document: object, where: str) -> PromptSet:
    """Check a loaded YAML document and build its :class:`PromptSet`."""
    if not isinstance(document, dict):
        raise PromptSetError(f"{where}: a prompt set is a mapping with id, version and findings")
    set_id, version = document.get("id"), document.get("version")
    if not isinstance(set_id, str) or not _ID_PATTERN.match(set_id):
        raise PromptSetError(f"{where}: id must be lower-case letters, digits, '.', '_' or '-'")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PromptSetError(f"{where}: version must be a positive integer")
    raw_findings = document.get("findings")
    if not isinstance(raw_findings, list) or not raw_findings:
        raise PromptSetError(f"{where}: findings must be a non-empty list")
    findings: list[FindingPrompts] = []
    for number, item in enumerate(raw_findings, 1):
        here = f"{where} finding {number}"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise PromptSetError(f"{here}: each finding needs a name")
        findings.append(
            FindingPrompts(
                name=item["name"].strip(),
                positive=_prompts(item.get("positive"), f"{here} positive"),
                negative=_prompts(item.get("negative"), f"{here} negative"),
            )
        )
    names = [f.name for f in findings]
    if len(set(names)) != len(names) or not all(names):
        raise PromptSetError(f"{where}: finding names must be non-empty and distinct")
    description = document.get("description", "")
    return PromptSet(
        id=set_id,
        version=version,
        description=str(description) if description is not None else "",
        findings=tuple(findings),
    )


def read_prompt_set(path: str | os.PathLike[str]) -> PromptSet:
    """Read a prompt-set YAML file."""
    import yaml

    source = Path(path)
    try:
        document = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PromptSetError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PromptSetError(f"{source}: not a YAML document: {exc}") from None
    return parse_prompt_set(document, str(source))


def shipped_prompt_sets() -> tuple[str, ...]:
    """Ids of the prompt sets shipped with the package, sorted."""
    return tuple(sorted(path.stem for path in _DIR.glob("*.yaml")))


@cache
def load_prompt_set(set_id: str | None = None) -> PromptSet:
    """A shipped prompt set by id (the default set when ``set_id`` is None).

    Raises :class:`PromptSetError` with code ``unknown_prompt_set`` for an id that is not
    shipped.
    """
    wanted = set_id or DEFAULT_PROMPT_SET
    if wanted not in shipped_prompt_sets():
        raise PromptSetError(
            f"no prompt set {wanted!r}; shipped: {', '.join(shipped_prompt_sets())}",
            code="unknown_prompt_set",
        )
    prompt_set = read_prompt_set(_DIR / f"{wanted}.yaml")
    if prompt_set.id != wanted:
        raise PromptSetError(f"{wanted}.yaml declares id {prompt_set.id!r}")
    return prompt_set
