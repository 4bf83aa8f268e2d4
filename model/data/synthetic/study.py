"""One study: its plan (anatomy, acquisition, findings, report, seeds) and its rendering.

Every consumer of randomness gets its own stream, drawn up front from the study's
generator, so that adding a finding does not move the anatomy, the acquisition, the
texture or the noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from model.data.synthetic.anatomy import (
    Acquisition,
    Anatomy,
    Geometry,
    sample_acquisition,
    sample_anatomy,
)
from model.data.synthetic.findings import (
    Finding,
    SyntheticDataError,
    derived_rng,
    resolve_findings,
)
from model.data.synthetic.painting import paint
from model.data.synthetic.writing import write_report


@dataclass(frozen=True, eq=False)
class SyntheticStudy:
    """A rendered study: ``image`` is uint8 (H, W), display-ready (MONOCHROME2)."""

    image: npt.NDArray[np.uint8]
    report: str
    labels: dict[str, float]
    findings: tuple[Finding, ...]
    patient_id: str
    study_id: str
    view_position: str
    geometry: Geometry


@dataclass(frozen=True)
class Plan:
    """Everything about a study except its pixels (cheap to recompute)."""

    anatomy: Anatomy
    acquisition: Acquisition
    findings: tuple[Finding, ...]
    report: str
    labels: dict[str, float]
    shape_seed: int
    texture_seed: int
    noise_seed: int


def plan_study(
    rng: np.random.Generator,
    findings: Sequence[str | Finding] | None,
    anatomy: Anatomy | None,
    view_position: str | None,
) -> Plan:
    """A study's plan: six seeds drawn from ``rng`` up front, one per consumer."""
    seeds = [int(s) for s in rng.integers(0, 2**63 - 1, size=6)]
    anat = anatomy if anatomy is not None else sample_anatomy(derived_rng(seeds[0]))
    acq = sample_acquisition(derived_rng(seeds[1]), view_position)
    resolved = resolve_findings(findings, seeds[2])
    report, labels = write_report(resolved, derived_rng(seeds[5]))
    return Plan(
        anatomy=anat,
        acquisition=acq,
        findings=resolved,
        report=report,
        labels=labels,
        shape_seed=seeds[2],
        texture_seed=seeds[3],
        noise_seed=seeds[4],
    )


def render_study(
    rng: np.random.Generator,
    findings: Sequence[str | Finding] | None = None,
    *,
    size: int = 256,
    anatomy: Anatomy | None = None,
    view_position: str | None = None,
    patient_id: str = "synthetic",
    study_id: str = "synthetic",
) -> SyntheticStudy:
    """Render one study: a uint8 (size, size) image, its report and labels.

    ``findings`` None draws a random set (25% normal, otherwise one primary finding with
    plausible companions); an empty sequence or ``["No Finding"]`` renders a normal chest;
    labels (:data:`FINDING_LABELS`) get side, severity and location drawn at random, and
    :class:`Finding` objects are rendered as given. ``anatomy`` fixes the patient (see
    :func:`sample_anatomy`); ``view_position`` ("PA"/"AP") is drawn when None.
    """
    check_size(size)
    plan = plan_study(rng, findings, anatomy, view_position)
    image, geometry = paint(plan, size)
    return SyntheticStudy(
        image=image,
        report=plan.report,
        labels=plan.labels,
        findings=plan.findings,
        patient_id=patient_id,
        study_id=study_id,
        view_position=plan.acquisition.view_position,
        geometry=geometry,
    )


def check_size(size: int) -> None:
    """Refuse an image side outside [64, 4096] pixels."""
    if not isinstance(size, int) or size < 64 or size > 4096:
        raise SyntheticDataError(
            f"image size must be an integer in [64, 4096], got {size!r}", code="invalid_argument"
        )
