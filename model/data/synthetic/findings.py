"""The findings the generator renders and reports, and the seeds everything is drawn from.

:data:`FINDINGS` is the one table of the findings: where each may be (sides, locations)
and which region it belongs to. The painter (:mod:`model.data.synthetic.painting`) draws
each region's findings in its own layer; the report writer
(:mod:`model.data.synthetic.writing`) mentions them region by region, in the table's order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from model.errors import ModelError

#: The findings the renderer draws: the CheXpert 8x200 categories other than "No Finding".
FINDING_LABELS: Final[tuple[str, ...]] = (
    "Atelectasis",
    "Cardiomegaly",
    "Edema",
    "Fracture",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
)
NO_FINDING: Final = "No Finding"
SEVERITIES: Final[tuple[str, ...]] = ("mild", "moderate", "severe")

#: Regions of the chest, in the order a report's FINDINGS section goes through them.
HEART: Final = "heart"
AIRSPACE: Final = "airspace"  # fluid or exudate filling the lungs' air spaces (an opacity)
PLEURAL_AIR: Final = "pleural air"  # air between the lung and the chest wall
BONES: Final = "bones"
#: Regions whose findings keep a report from calling the lungs clear.
LUNG_REGIONS: Final = frozenset({AIRSPACE, PLEURAL_AIR})


@dataclass(frozen=True)
class FindingKind:
    """One row of :data:`FINDINGS`.

    ``sides`` and ``locations`` list the values a :class:`Finding` of this label may take
    ("" where not applicable); ``region`` is where it shows (:data:`HEART`,
    :data:`AIRSPACE`, :data:`PLEURAL_AIR` or :data:`BONES`).
    """

    label: str
    region: str
    sides: tuple[str, ...] = ("",)
    locations: tuple[str, ...] = ("",)


_LATERAL: Final = ("right", "left", "bilateral")

#: The findings, in the order a report mentions them (heart, lungs, bones).
FINDINGS: Final[tuple[FindingKind, ...]] = (
    FindingKind("Cardiomegaly", HEART),
    FindingKind("Edema", AIRSPACE, sides=("bilateral",)),
    FindingKind("Pneumonia", AIRSPACE, sides=_LATERAL, locations=("upper", "middle", "lower")),
    FindingKind("Atelectasis", AIRSPACE, sides=_LATERAL),
    FindingKind("Pleural Effusion", AIRSPACE, sides=_LATERAL),
    FindingKind(
        "Pneumothorax",
        PLEURAL_AIR,
        sides=("right", "left"),
        locations=("apical", "lateral", "basilar"),
    ),
    FindingKind(
        "Fracture",
        BONES,
        sides=("right", "left"),
        # Ribs numbered so that a run of three (severe) stays within the eleven drawn.
        locations=tuple(f"posterior rib {n}" for n in range(3, 10))
        + tuple(f"lateral rib {n}" for n in range(4, 10))
        + ("clavicle",),
    ),
)
KINDS: Final[dict[str, FindingKind]] = {kind.label: kind for kind in FINDINGS}

# Co-occurrence: chance that a second finding joins a first (symmetric), over a small base rate.
_SECONDARY_BASE: Final = 0.04
_PAIR_BONUS: Final[dict[frozenset[str], float]] = {
    frozenset({"Cardiomegaly", "Edema"}): 0.30,
    frozenset({"Cardiomegaly", "Pleural Effusion"}): 0.22,
    frozenset({"Edema", "Pleural Effusion"}): 0.28,
    frozenset({"Pneumonia", "Pleural Effusion"}): 0.12,
    frozenset({"Atelectasis", "Pleural Effusion"}): 0.18,
    frozenset({"Fracture", "Pneumothorax"}): 0.18,
}
_P_NORMAL: Final = 0.25


class SyntheticDataError(ModelError):
    """A request the synthetic generator cannot honour (bad finding, argument or CSV)."""

    code = "synthetic_data_error"


@dataclass(frozen=True)
class Finding:
    """One rendered abnormality.

    ``label`` is one of :data:`FINDING_LABELS`; ``side`` is the patient's side ("right",
    "left", "bilateral", or "" where laterality does not apply); ``severity`` is one of
    :data:`SEVERITIES` (an effusion's or pneumothorax's size, a fracture's displacement; a
    severe rib fracture breaks the named rib and the two below it);
    ``location`` is label-specific: a zone ("upper", "middle", "lower") for pneumonia,
    "apical"/"lateral"/"basilar" for pneumothorax, "posterior rib 6"/"lateral rib 7"/
    "clavicle" for fracture, "" otherwise.
    """

    label: str
    side: str = ""
    severity: str = "moderate"
    location: str = ""

    def __post_init__(self) -> None:
        kind = KINDS.get(self.label)
        if kind is None:
            raise SyntheticDataError(
                f"unknown finding {self.label!r}; expected one of {', '.join(FINDING_LABELS)}",
                code="unknown_finding",
            )
        if self.side not in kind.sides:
            raise SyntheticDataError(
                f"{self.label}: side {self.side!r} not in {kind.sides}", code="invalid_finding"
            )
        if self.location not in kind.locations:
            raise SyntheticDataError(
                f"{self.label}: location {self.location!r} not in {kind.locations}",
                code="invalid_finding",
            )
        if self.severity not in SEVERITIES:
            raise SyntheticDataError(
                f"{self.label}: severity {self.severity!r} not in {SEVERITIES}",
                code="invalid_finding",
            )


def sides_of(side: str) -> tuple[str, ...]:
    """The lungs a finding on ``side`` touches: both for "bilateral"."""
    return ("right", "left") if side == "bilateral" else (side,)


# --------------------------------------------------------------------------- seeds


def seed_of(*keys: int | str) -> list[int]:
    """Entropy for a SeedSequence from ints and strings (strings hashed, never Python's hash)."""
    out: list[int] = []
    for key in keys:
        if isinstance(key, str):
            digest = hashlib.sha256(key.encode("utf-8")).digest()
            out.append(int.from_bytes(digest[:8], "little"))
        else:
            out.append(int(key) & 0xFFFFFFFFFFFFFFFF)
    return out


def derived_rng(*keys: int | str) -> np.random.Generator:
    """A generator seeded by ``keys`` alone: one independent stream per consumer."""
    return np.random.default_rng(seed_of(*keys))


# --------------------------------------------------------------------------- sampling


def _sample_details(label: str, rng: np.random.Generator) -> Finding:
    severity = str(rng.choice(SEVERITIES, p=(0.45, 0.35, 0.2)))
    side, location = "", ""
    if label == "Atelectasis":
        side = str(rng.choice(("right", "left", "bilateral"), p=(0.3, 0.35, 0.35)))
    elif label == "Edema":
        side = "bilateral"
    elif label == "Fracture":
        side = str(rng.choice(("right", "left")))
        kind = rng.uniform()
        if kind < 0.55:
            location = f"posterior rib {int(rng.integers(4, 10))}"
        elif kind < 0.85:
            location = f"lateral rib {int(rng.integers(5, 10))}"
        else:
            location = "clavicle"
    elif label == "Pleural Effusion":
        side = str(rng.choice(("right", "left", "bilateral"), p=(0.35, 0.3, 0.35)))
    elif label == "Pneumonia":
        side = str(rng.choice(("right", "left", "bilateral"), p=(0.45, 0.35, 0.2)))
        location = str(rng.choice(("upper", "middle", "lower"), p=(0.25, 0.25, 0.5)))
    elif label == "Pneumothorax":
        side = str(rng.choice(("right", "left")))
        location = str(rng.choice(("apical", "lateral", "basilar"), p=(0.5, 0.35, 0.15)))
    return Finding(label, side=side, severity=severity, location=location)


def _choose_labels(rng: np.random.Generator) -> list[str]:
    if rng.uniform() < _P_NORMAL:
        return []
    primary = str(rng.choice(FINDING_LABELS))
    chosen = {primary}
    draws = rng.uniform(size=len(FINDING_LABELS))
    for label, draw in zip(FINDING_LABELS, draws, strict=True):
        if label == primary:
            continue
        p = _SECONDARY_BASE + _PAIR_BONUS.get(frozenset({primary, label}), 0.0)
        if draw < p:
            chosen.add(label)
    return [label for label in FINDING_LABELS if label in chosen]


def resolve_findings(findings: Sequence[str | Finding] | None, seed: int) -> tuple[Finding, ...]:
    """Findings in :data:`FINDING_LABELS` order; details drawn per label so they do not
    depend on which other findings are present."""
    if findings is None:
        labels: list[str | Finding] = list(_choose_labels(derived_rng(seed, "choose")))
    else:
        labels = list(findings)
    by_label: dict[str, Finding] = {}
    for item in labels:
        if isinstance(item, Finding):
            finding = item
        elif item == NO_FINDING:
            if len(labels) > 1:
                raise SyntheticDataError(
                    "'No Finding' excludes every other finding", code="invalid_finding"
                )
            return ()
        elif item in KINDS:
            finding = _sample_details(item, derived_rng(seed, "details", item))
        else:
            raise SyntheticDataError(
                f"unknown finding {item!r}; expected one of {', '.join(FINDING_LABELS)}"
                f" or {NO_FINDING!r}",
                code="unknown_finding",
            )
        if finding.label in by_label:
            raise SyntheticDataError(
                f"finding {finding.label!r} given twice", code="invalid_finding"
            )
        by_label[finding.label] = finding
    return tuple(by_label[label] for label in FINDING_LABELS if label in by_label)
