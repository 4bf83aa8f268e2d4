"""Typed errors of the evaluation package."""

from __future__ import annotations

from model.errors import ModelError


class EvaluationError(ModelError):
    """An evaluation that cannot run as asked (bad arguments, scores or settings)."""

    code = "evaluation_error"


class ProtocolError(EvaluationError):
    """Protocol files or images that cannot be evaluated as they are.

    The message names the offending file and, where there is one, its row (the line number
    in the CSV, the header being line 1). ``code`` says which rule failed:
    ``protocol_file_missing``, ``protocol_file_invalid``, ``image_missing``,
    ``category_absent``, ``query_in_candidates``, ``duplicate_candidate``,
    ``not_enough_images``.
    """

    code = "invalid_protocol"
