"""One entry point for the classification protocols, shared by the command and the service.

``convirt evaluate --protocol zero-shot|linear-probe`` and ``POST /evaluations`` both
build a :class:`ClassificationRequest`, call :func:`prepare_classification` (reads and
checks the corpus and the prompt set: seconds, so a bad request fails at once) and then
:func:`run_classification`, so that the two give the same numbers for the same request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from model.evaluation.cache import EmbeddingCache
from model.evaluation.classification_metrics import BOOTSTRAP_RESAMPLES
from model.evaluation.errors import EvaluationError, ProtocolError
from model.evaluation.features import BundleBackbone, FeatureSpace
from model.evaluation.labelled import LabelledRecord, read_labelled
from model.evaluation.linear_probe import (
    DRAWS,
    FRACTIONS,
    IMAGENET_ROW,
    MODEL_ROW,
    RANDOM_ROW,
    LinearProbeOptions,
)
from model.evaluation.runner import ProgressCallback
from model.evaluation.zeroshot import ZeroShotOptions
from model.labels import CHEXPERT_LABELS
from model.prompts import PromptSet, load_prompt_set

if TYPE_CHECKING:
    from model.bundle import EncoderBundle

logger = logging.getLogger(__name__)

ZERO_SHOT_PROTOCOL: Final = "zero-shot"
LINEAR_PROBE_PROTOCOL: Final = "linear-probe"
CLASSIFICATION_PROTOCOLS: Final[tuple[str, ...]] = (ZERO_SHOT_PROTOCOL, LINEAR_PROBE_PROTOCOL)


@dataclass(frozen=True)
class ClassificationRequest:
    """What to run; ``protocol`` decides which fields apply.

    ``prompt_set`` and ``knn_k``, ``bootstrap``: zero-shot. ``fractions``, ``draws``,
    ``task`` and ``baselines``: linear probe. ``findings`` limits the scored findings
    (default: the prompt set's, or the 14 CheXpert observations for the probe).
    """

    protocol: str
    manifest: str
    root: str | None = None
    findings: tuple[str, ...] | None = None
    prompt_set: str | None = None
    knn_k: int = 10
    bootstrap: int = BOOTSTRAP_RESAMPLES
    fractions: tuple[float, ...] = FRACTIONS
    draws: int = DRAWS
    task: str = "auto"
    baselines: bool = True
    seed: int = 0
    batch_size: int = 32

    def params(self) -> dict[str, Any]:
        """The request as recorded with the run (JSON)."""
        out: dict[str, Any] = {
            "manifest": self.manifest,
            "root": self.root,
            "findings": list(self.findings) if self.findings else None,
            "seed": self.seed,
        }
        if self.protocol == ZERO_SHOT_PROTOCOL:
            out.update(prompt_set=self.prompt_set, knn_k=self.knn_k, bootstrap=self.bootstrap)
        else:
            out.update(
                fractions=list(self.fractions),
                draws=self.draws,
                task=self.task,
                baselines=self.baselines,
            )
        return out


@dataclass(frozen=True, eq=False)
class PreparedClassification:
    request: ClassificationRequest
    records: list[LabelledRecord]
    prompt_set: PromptSet | None


@dataclass(frozen=True, eq=False)
class ClassificationOutcome:
    """The run's JSON document and how to write its report files."""

    document: dict[str, Any]
    write: Callable[[Path, dict[str, Any] | None], Path]
    #: row → metric → value: the figures the command prints.
    headline: dict[str, dict[str, float]]


def dataset_name(manifest: str) -> str:
    """What the report's table calls the corpus: the file's stem, with its folder when the
    stem alone says nothing (``corpus/manifest``, ``CheXpert-v1.0-small/valid``)."""
    path = Path(manifest)
    generic = {"manifest", "train", "valid", "validate", "test", "labels"}
    return f"{path.parent.name}/{path.stem}" if path.stem.lower() in generic else path.stem


def prepare_classification(
    request: ClassificationRequest,
    *,
    check: Callable[[Sequence[LabelledRecord]], None] | None = None,
) -> PreparedClassification:
    """Read the corpus and the prompt set and check that every image exists.

    ``check`` sees the records before any image is looked at (a caller's own rules on the
    paths they name).
    """
    if request.protocol not in CLASSIFICATION_PROTOCOLS:
        raise EvaluationError(f"not a classification protocol: {request.protocol}")
    prompt_set = (
        load_prompt_set(request.prompt_set) if request.protocol == ZERO_SHOT_PROTOCOL else None
    )
    records = read_labelled(request.manifest, root=request.root)
    if check is not None:
        check(records)
    for record in records:
        if not Path(record.path).is_file():
            raise ProtocolError(f"{record.where}: no image at {record.path}", code="image_missing")
    if request.findings and prompt_set is not None:
        unknown = sorted(set(request.findings) - set(prompt_set.names))
        if unknown:
            raise ProtocolError(
                f"prompt set {prompt_set.key} has no prompts for {', '.join(unknown)}",
                code="category_absent",
            )
    return PreparedClassification(request=request, records=records, prompt_set=prompt_set)


def _restricted(prompt_set: PromptSet, findings: tuple[str, ...] | None) -> PromptSet:
    if not findings:
        return prompt_set
    from dataclasses import replace

    kept = tuple(f for f in prompt_set.findings if f.name in findings)
    return replace(prompt_set, findings=kept)


def probe_spaces(bundle: EncoderBundle, *, baselines: bool) -> dict[str, FeatureSpace]:
    """The linear probe's rows: the bundle's backbone, then its ImageNet and random starts."""
    from model.evaluation.baseline import InitialBackbone

    def space(encoder: Any) -> FeatureSpace:
        return FeatureSpace(
            cache_key=encoder.feature_id,
            encode=lambda images, size: encoder.image_backbone_features(images, batch_size=size),
            description=encoder.description,
        )

    spaces = {MODEL_ROW: space(BundleBackbone(bundle))}
    if baselines:
        initial = InitialBackbone.from_bundle(bundle)
        if initial.weights == "pretrained":
            spaces[IMAGENET_ROW] = space(initial)
        spaces[RANDOM_ROW] = space(InitialBackbone.from_bundle(bundle, random_init=True))
    return spaces


def run_classification(
    prepared: PreparedClassification,
    bundle: EncoderBundle,
    *,
    cache: EmbeddingCache | None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> ClassificationOutcome:
    """Run the prepared protocol with ``bundle``."""
    from model.evaluation.classification_report import (
        write_linear_probe_report,
        write_zero_shot_report,
    )

    request = prepared.request
    params = {**request.params(), "dataset": dataset_name(request.manifest)}
    if prepared.prompt_set is not None:
        from model.evaluation.zeroshot import PROMPTS, run_zero_shot

        zero = run_zero_shot(
            prepared.records,
            bundle,
            _restricted(prepared.prompt_set, request.findings),
            cache=cache,
            options=ZeroShotOptions(
                knn_k=request.knn_k,
                bootstrap=request.bootstrap,
                seed=request.seed,
                batch_size=request.batch_size,
            ),
            progress=progress,
            cancel=cancel,
            model_name=bundle.name,
            params=params,
        )
        return ClassificationOutcome(
            document=zero.to_dict(),
            write=lambda out, extra: write_zero_shot_report(zero, out, extra=extra),
            headline={row: zero.mean(row) for row in (PROMPTS, *zero.scores)},
        )
    from model.evaluation.linear_probe import run_linear_probe

    probe = run_linear_probe(
        prepared.records,
        probe_spaces(bundle, baselines=request.baselines),
        list(request.findings or CHEXPERT_LABELS),
        model_id=bundle.model_id,
        model_name=bundle.name,
        cache=cache,
        options=LinearProbeOptions(
            fractions=request.fractions,
            draws=request.draws,
            task=request.task,
            seed=request.seed,
            batch_size=request.batch_size,
        ),
        progress=progress,
        cancel=cancel,
        params=params,
    )
    return ClassificationOutcome(
        document=probe.to_dict(),
        write=lambda out, extra: write_linear_probe_report(probe, out, extra=extra),
        headline={row: {f: c.mean for f, c in cells.items()} for row, cells in probe.rows.items()},
    )
