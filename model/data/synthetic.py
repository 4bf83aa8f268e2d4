"""Synthetic chest radiographs paired with reports whose right answers are known.

Real radiographs with reports cannot be shipped, yet the demo, the trainer's smoke and
quality tests and the evaluation's end-to-end test need image/report pairs whose labels
are certain. This module draws frontal chest-radiograph-like grayscale images (MONOCHROME2:
air dark, bone and soft tissue bright) of a thorax with lungs, mediastinum, heart,
diaphragm, ribs, clavicles, spine and lung vessel markings, varies the anatomy per patient
and the acquisition per study, renders the eight CheXpert 8x200 categories visibly, and
writes a report from the findings.

Conventions:

- ``side`` is always the *patient's* side. As on any frontal film the patient's right is on
  the viewer's left, so a right effusion darkens nothing and brightens the image's left base.
- Labels (:attr:`SyntheticStudy.labels`) cover the 14 CheXpert observations. An observation
  is 1.0 exactly when the report asserts it, and 0.0 otherwise: a synthetic study is fully
  known, so "absent" and "explicitly negated" are the same truth here and no value is -1 or
  unknown. "No Finding" is 1.0 exactly when no finding is rendered, and then it is the only
  1.0. Besides its own observation a finding may assert a parent the report names: a
  pneumonia described as an opacity sets "Lung Opacity", one described as consolidation sets
  "Consolidation"; an atelectasis or edema sentence that says "opacity" sets "Lung Opacity".
- The report mentions every rendered finding in FINDINGS and in IMPRESSION and never
  negates one; some absent findings are negated ("No pleural effusion or pneumothorax.").

Determinism: everything a study contains comes from the generator handed to
:func:`render_study` (or, in :func:`generate_corpus` and :func:`write_chexpert_tree`, from
seeds derived from the corpus seed and the study's index or path), so the same seed gives
byte-identical images and reports, and the first 100 studies of a 200-study corpus are the
100 studies of a 100-study corpus. Noise, texture and anatomy are drawn from generators that
do not depend on the findings, so rendering one seed with and without a finding changes only
the pixels the finding touches.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from model.errors import ModelError
from model.labels import CHEXPERT_LABELS

logger = logging.getLogger(__name__)

# float32 at run time; typed loosely because numpy widens scalar arithmetic in its stubs.
FloatArray = npt.NDArray[np.floating[Any]]
BoolArray = npt.NDArray[np.bool_]
Point = tuple[float, float]

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
#: Split names, as :mod:`model.data.manifest` spells them.
SPLIT_NAMES: Final[tuple[str, str, str]] = ("train", "validate", "test")
#: Bumped whenever a change alters the pixels or reports produced for a seed.
GENERATOR_VERSION: Final = 2

# Where each finding may be, per label: (sides, locations). "" means not applicable.
_ALLOWED: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "Atelectasis": (("right", "left", "bilateral"), ("",)),
    "Cardiomegaly": (("",), ("",)),
    "Edema": (("bilateral",), ("",)),
    "Fracture": (
        ("right", "left"),
        # Ribs numbered so that a run of three (severe) stays within the eleven drawn.
        tuple(f"posterior rib {n}" for n in range(3, 10))
        + tuple(f"lateral rib {n}" for n in range(4, 10))
        + ("clavicle",),
    ),
    "Pleural Effusion": (("right", "left", "bilateral"), ("",)),
    "Pneumonia": (("right", "left", "bilateral"), ("upper", "middle", "lower")),
    "Pneumothorax": (("right", "left"), ("apical", "lateral", "basilar")),
}

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

_LUNG_DARKNESS: Final = 0.44  # attenuation removed by a full-thickness lung


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
        if self.label not in _ALLOWED:
            raise SyntheticDataError(
                f"unknown finding {self.label!r}; expected one of {', '.join(FINDING_LABELS)}",
                code="unknown_finding",
            )
        sides, locations = _ALLOWED[self.label]
        if self.side not in sides:
            raise SyntheticDataError(
                f"{self.label}: side {self.side!r} not in {sides}", code="invalid_finding"
            )
        if self.location not in locations:
            raise SyntheticDataError(
                f"{self.label}: location {self.location!r} not in {locations}",
                code="invalid_finding",
            )
        if self.severity not in SEVERITIES:
            raise SyntheticDataError(
                f"{self.label}: severity {self.severity!r} not in {SEVERITIES}",
                code="invalid_finding",
            )


@dataclass(frozen=True)
class Anatomy:
    """One patient's body, in a patient frame where the image is the unit square.

    Lengths are fractions of the image side; ``cx`` is the midline, ``half_width`` the inner
    thoracic half-width at the costophrenic angles, ``apex_y``/``base_y`` the heights of the
    lung apices and of the right costophrenic angle. Studies of one patient share it.
    """

    cx: float
    half_width: float
    apex_y: float
    base_y: float
    left_base_drop: float
    dome_height: float
    cardiothoracic_ratio: float
    heart_right_fraction: float
    heart_height: float
    mediastinum_half_width: float
    aortic_knob: float
    rib_y0: float
    rib_spacing: float
    soft_tissue: float
    shoulder: float
    gastric_bubble: float
    breast: float
    vessel_seed: int


@dataclass(frozen=True)
class _Acquisition:
    view_position: str
    shift_x: float
    shift_y: float
    rotation: float  # radians
    scale: float
    inspiration: float  # added to the diaphragm height; positive = deeper breath
    gamma: float
    window_low: float
    window_high: float
    noise: float
    blur_px: float
    heel: float


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where the anatomy and the findings landed, in pixels (x to the right, y down).

    ``thorax_width`` is the inner thoracic diameter at the costophrenic angles and
    ``heart_width`` the widest transverse diameter of the cardiac silhouette (at
    ``heart_row``), so ``cardiothoracic_ratio`` is the rendered CTR. Points are keyed by the
    patient's side. ``masks`` holds boolean (H, W) arrays: "lungs", "heart", and one per
    rendered finding label marking where it changed the image.
    """

    cardiothoracic_ratio: float
    heart_width: float
    thorax_width: float
    heart_row: float
    midline_x: float
    costophrenic_angles: dict[str, Point]
    diaphragm_domes: dict[str, Point]
    hila: dict[str, Point]
    fracture_points: tuple[Point, ...]
    masks: dict[str, BoolArray]


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
class _Plan:
    """Everything about a study except its pixels (cheap to recompute)."""

    anatomy: Anatomy
    acquisition: _Acquisition
    findings: tuple[Finding, ...]
    report: str
    labels: dict[str, float]
    shape_seed: int
    texture_seed: int
    noise_seed: int


# --------------------------------------------------------------------------- sampling


def _seed_of(*keys: int | str) -> list[int]:
    """Entropy for a SeedSequence from ints and strings (strings hashed, never Python's hash)."""
    out: list[int] = []
    for key in keys:
        if isinstance(key, str):
            digest = hashlib.sha256(key.encode("utf-8")).digest()
            out.append(int.from_bytes(digest[:8], "little"))
        else:
            out.append(int(key) & 0xFFFFFFFFFFFFFFFF)
    return out


def _derived_rng(*keys: int | str) -> np.random.Generator:
    return np.random.default_rng(_seed_of(*keys))


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy."""
    u = rng.uniform
    apex = u(0.10, 0.15)
    base = u(0.76, 0.82)
    return Anatomy(
        cx=float(0.5 + np.clip(rng.normal(0.0, 0.008), -0.02, 0.02)),
        half_width=u(0.33, 0.385),
        apex_y=apex,
        base_y=base,
        left_base_drop=u(0.0, 0.025),
        dome_height=u(0.05, 0.085),
        cardiothoracic_ratio=u(0.38, 0.47),
        heart_right_fraction=u(0.28, 0.37),
        heart_height=u(0.13, 0.17),
        mediastinum_half_width=u(0.042, 0.06),
        aortic_knob=u(0.012, 0.03),
        rib_y0=apex - u(0.0, 0.025),
        rib_spacing=(base - apex) / 10.0 * u(0.93, 1.05),
        soft_tissue=u(0.06, 0.11),
        shoulder=u(0.04, 0.12),
        gastric_bubble=u(0.0, 1.0) if u() < 0.6 else 0.0,
        breast=u(0.03, 0.08) if u() < 0.4 else 0.0,
        vessel_seed=int(rng.integers(0, 2**62)),
    )


def _sample_acquisition(rng: np.random.Generator, view_position: str | None) -> _Acquisition:
    u = rng.uniform
    view = view_position if view_position is not None else ("PA" if u() < 0.5 else "AP")
    ap = view.upper() == "AP"
    return _Acquisition(
        view_position=view,
        shift_x=u(-0.025, 0.025),
        shift_y=u(-0.02, 0.03),
        rotation=math.radians(float(np.clip(rng.normal(0.0, 2.0), -5.0, 5.0))),
        scale=u(0.93, 1.03) * (1.03 if ap else 1.0),
        inspiration=u(-0.06, -0.015) if ap else u(-0.015, 0.02),
        gamma=u(0.8, 1.25),
        window_low=u(-0.03, 0.03),
        window_high=u(0.8, 0.9),
        noise=u(0.01, 0.022) if ap else u(0.006, 0.016),
        blur_px=u(0.4, 0.9),
        heel=u(-0.06, 0.06),
    )


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


def _resolve_findings(findings: Sequence[str | Finding] | None, seed: int) -> tuple[Finding, ...]:
    """Findings in :data:`FINDING_LABELS` order; details drawn per label so they do not
    depend on which other findings are present."""
    if findings is None:
        labels: list[str | Finding] = list(_choose_labels(_derived_rng(seed, "choose")))
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
        elif item in _ALLOWED:
            finding = _sample_details(item, _derived_rng(seed, "details", item))
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


# --------------------------------------------------------------------------- reports


_SIDE_WORD: Final[dict[str, str]] = {"right": "right", "left": "left", "bilateral": "bilateral"}
_SIZE_WORD: Final[dict[str, tuple[str, ...]]] = {
    "mild": ("small", "small", "trace"),
    "moderate": ("moderate", "moderate-sized"),
    "severe": ("large", "large"),
}
_DEGREE_WORD: Final[dict[str, tuple[str, ...]]] = {
    "mild": ("mild", "mild"),
    "moderate": ("moderate", "moderate"),
    "severe": ("severe", "marked"),
}
_DEGREE_ADVERB: Final[dict[str, tuple[str, ...]]] = {
    "mild": ("mildly",),
    "moderate": ("moderately",),
    "severe": ("markedly", "severely"),
}


@dataclass(frozen=True)
class _Sentence:
    text: str
    asserts: frozenset[str]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _zone_phrase(side: str, zone: str, rng: np.random.Generator) -> str:
    lobes = {
        ("right", "upper"): ("right upper lobe", "right upper zone", "right upper lung"),
        ("right", "middle"): ("right middle lobe", "right mid lung", "right mid lung zone"),
        ("right", "lower"): ("right lower lobe", "right lung base", "right base"),
        ("left", "upper"): ("left upper lobe", "left upper zone", "left upper lung"),
        ("left", "middle"): ("lingula", "left mid lung", "left mid lung zone"),
        ("left", "lower"): ("left lower lobe", "left lung base", "left base"),
        ("bilateral", "upper"): ("both upper lobes", "bilateral upper lungs"),
        ("bilateral", "middle"): ("both mid lungs", "bilateral mid lung zones"),
        ("bilateral", "lower"): ("both lower lobes", "both lung bases", "bilateral lung bases"),
    }
    return _pick(rng, lobes[(side, zone)])


def _finding_sentences(f: Finding, rng: np.random.Generator) -> tuple[_Sentence, _Sentence]:
    """(FINDINGS sentence, IMPRESSION sentence) for one finding."""
    degree = _pick(rng, _DEGREE_WORD[f.severity])
    size = _pick(rng, _SIZE_WORD[f.severity])
    side = _SIDE_WORD.get(f.side, "")
    own = frozenset({f.label})
    choices: list[tuple[str, set[str]]]  # (sentence, labels it asserts beyond its own)
    if f.label == "Cardiomegaly":
        adverb = _pick(rng, _DEGREE_ADVERB[f.severity])
        body = _pick(
            rng,
            (
                f"The cardiac silhouette is {adverb} enlarged.",
                f"The heart is {adverb} enlarged.",
                f"There is {degree} cardiomegaly.",
                f"The heart shadow is {adverb} enlarged, in keeping with cardiomegaly.",
                f"{_cap(degree)} enlargement of the cardiac silhouette.",
            ),
        )
        imp = _pick(rng, (f"{_cap(degree)} cardiomegaly.", "Cardiomegaly.", "Cardiac enlargement."))
        return _Sentence(body, own), _Sentence(imp, own)
    if f.label == "Pleural Effusion":
        both = f.side == "bilateral"
        noun = "pleural effusions" if both else "pleural effusion"
        angle = "both costophrenic angles" if both else f"the {side} costophrenic angle"
        options = [
            f"There {'are' if both else 'is'} {'' if both else 'a '}{size} {side} {noun}.",
            f"{_cap(size)} {side} {noun}.",
            f"Blunting of {angle}, consistent with {'' if both else 'a '}{size} {noun}.",
        ]
        if f.severity != "mild":
            options.append(
                f"Meniscus-shaped opacity at the {side} {'bases' if both else 'base'}"
                f" representing {'' if both else 'a '}{size} {noun}."
            )
        if f.severity == "severe":
            base = "both lower hemithoraces" if both else f"the {side} lower hemithorax"
            options.append(f"{_cap(size)} {side} {noun} opacifying {base}.")
        body = _pick(rng, options)
        labels = own | ({"Lung Opacity"} if "opacity" in body else set())
        imp = _pick(rng, (f"{_cap(size)} {side} {noun}.", f"{_cap(side)} {noun}."))
        return _Sentence(body, frozenset(labels)), _Sentence(imp, own)
    if f.label == "Pneumothorax":
        where = f.location
        body = _pick(
            rng,
            (
                f"There is a {size} {side} {where} pneumothorax.",
                f"{_cap(size)} {side} {where} pneumothorax.",
                f"A {side} {where} pleural line is seen with no lung markings beyond it,"
                f" consistent with a {size} pneumothorax.",
                f"{_cap(side)} {where} pleural air is present, a {size} pneumothorax.",
            ),
        )
        imp = _pick(
            rng, (f"{_cap(size)} {side} pneumothorax.", f"{_cap(side)} {where} pneumothorax.")
        )
        return _Sentence(body, own), _Sentence(imp, own)
    if f.label == "Pneumonia":
        zone = _zone_phrase(f.side, f.location, rng)
        patchy = _pick(rng, ("patchy", "ill-defined", "fluffy", "focal", "hazy"))
        air = " with air bronchograms" if f.severity == "severe" else ""
        choices = [
            (
                f"{_cap(patchy)} opacity in the {zone}{air}, concerning for pneumonia.",
                {"Lung Opacity"},
            ),
            (
                f"{_cap(patchy)} airspace opacity in the {zone}{air} likely represents pneumonia.",
                {"Lung Opacity"},
            ),
            (f"Consolidation in the {zone}{air}, consistent with pneumonia.", {"Consolidation"}),
            (
                f"There is {degree} airspace consolidation in the {zone}{air},"
                " compatible with pneumonia.",
                {"Consolidation"},
            ),
        ]
        text, extra = choices[int(rng.integers(len(choices)))]
        imp = _pick(
            rng,
            (
                f"{_cap(zone)} pneumonia.",
                f"Findings consistent with pneumonia in the {zone}.",
                f"Pneumonia in the {zone}.",
            ),
        )
        return _Sentence(text, own | extra), _Sentence(imp, own)
    if f.label == "Edema":
        if f.severity == "mild":
            choices = [
                ("Mild interstitial pulmonary edema with perihilar haziness.", set()),
                (
                    "Perihilar haziness and septal lines consistent with mild interstitial edema.",
                    set(),
                ),
                ("Mild pulmonary vascular congestion and interstitial edema.", set()),
            ]
        elif f.severity == "moderate":
            choices = [
                ("Moderate pulmonary edema with bilateral perihilar opacities.", {"Lung Opacity"}),
                ("Bilateral perihilar haziness consistent with moderate pulmonary edema.", set()),
                ("Moderate interstitial and early alveolar edema.", set()),
            ]
        else:
            choices = [
                (
                    "Severe alveolar pulmonary edema with bilateral perihilar airspace opacities"
                    " in a bat-wing distribution.",
                    {"Lung Opacity"},
                ),
                (
                    "Marked bilateral perihilar airspace opacities consistent with severe"
                    " pulmonary edema.",
                    {"Lung Opacity"},
                ),
                ("Severe pulmonary edema.", set()),
            ]
        text, extra = choices[int(rng.integers(len(choices)))]
        imp = _pick(
            rng,
            (f"{_cap(degree)} pulmonary edema.", "Pulmonary edema.", f"{_cap(degree)} edema."),
        )
        return _Sentence(text, own | extra), _Sentence(imp, own)
    if f.label == "Atelectasis":
        both = f.side == "bilateral"
        base = "both lung bases" if both else f"the {side} lung base"
        where = "bibasilar" if both else f"{side} basilar"
        if f.severity == "mild":
            choices = [
                (
                    f"{_cap(_pick(rng, ('plate-like', 'linear', 'subsegmental', 'discoid')))}"
                    f" atelectasis at {base}.",
                    set(),
                ),
                (f"Linear opacity at {base}, likely atelectasis.", {"Lung Opacity"}),
                (f"{_cap(where)} atelectasis.", set()),
            ]
        elif f.severity == "moderate":
            dome = "both hemidiaphragms" if both else f"the {side} hemidiaphragm"
            choices = [
                (
                    f"Plate-like atelectasis at {base} with elevation of {dome}"
                    " indicating volume loss.",
                    set(),
                ),
                (
                    f"Basilar opacity and volume loss at {base}, likely due to atelectasis.",
                    {"Lung Opacity"},
                ),
                (f"{_cap(where)} atelectasis with volume loss.", set()),
            ]
        else:
            lobe = "both lower lobes" if both else f"the {side} lower lobe"
            choices = [
                (f"Atelectasis of {lobe} with volume loss.", set()),
                (
                    f"Dense triangular opacity at {base} with volume loss, compatible with"
                    f" lobar atelectasis of {lobe}.",
                    {"Lung Opacity"},
                ),
            ]
        text, extra = choices[int(rng.integers(len(choices)))]
        imp = _pick(rng, (f"{_cap(where)} atelectasis.", f"Atelectasis at {base}."))
        return _Sentence(text, own | extra), _Sentence(imp, own)
    # Fracture
    disp = {
        "mild": ("nondisplaced", "acute nondisplaced"),
        "moderate": ("minimally displaced", "mildly displaced"),
        "severe": ("displaced", "angulated displaced"),
    }[f.severity]
    d = _pick(rng, disp)
    if f.location != "clavicle" and f.severity == "severe":
        # Severe rib trauma breaks a run of three adjacent ribs (as _draw_bones renders it).
        part, _, number = f.location.split()
        n = int(number)
        span = f"{_ordinal(n)} through {_ordinal(n + 2)}"
        body = _pick(
            rng,
            (
                f"There are {d} fractures of the {side} {span} {part} ribs.",
                f"{_cap(d)} fractures of the {side} {span} {part} ribs.",
                f"Cortical step-off of the {side} {span} {part} ribs, compatible with"
                f" {d} fractures.",
            ),
        )
        imp = _pick(
            rng,
            (f"Multiple {side} rib fractures.", f"{_cap(d)} fractures of the {side} {span} ribs."),
        )
        return _Sentence(body, own), _Sentence(imp, own)
    if f.location == "clavicle":
        bone = f"{side} clavicle"
        bone_imp = bone
    else:
        part, _, number = f.location.split()
        bone = f"{side} {_ordinal(int(number))} {part} rib"
        bone_imp = f"{side} {_ordinal(int(number))} rib"
    options_f = [
        f"There is {_article(d)} {d} fracture of the {bone}.",
        f"{_cap(d)} fracture of the {bone}.",
        f"{_cap(_article(d))} {d} fracture involves the {bone}.",
    ]
    if f.severity != "mild":
        options_f.append(
            f"Cortical step-off of the {bone}, compatible with {_article(d)} {d} fracture."
        )
    else:
        options_f.append(
            f"A lucent line crosses the {bone}, compatible with {_article(d)} {d} fracture."
        )
    body = _pick(rng, options_f)
    imp = _pick(rng, (f"{_cap(d)} {bone_imp} fracture.", f"Fracture of the {bone_imp}."))
    return _Sentence(body, own), _Sentence(imp, own)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


_LUNG_FINDINGS: Final = frozenset(
    {"Pneumonia", "Edema", "Atelectasis", "Pleural Effusion", "Pneumothorax"}
)


def _write_report(
    findings: Sequence[Finding], rng: np.random.Generator
) -> tuple[str, dict[str, float]]:
    """The report text and the CheXpert labels it asserts (see the module docstring)."""
    present = {f.label for f in findings}
    body: list[_Sentence] = []
    impression: list[_Sentence] = []
    pairs = {f.label: _finding_sentences(f, rng) for f in findings}

    if "Cardiomegaly" in pairs:
        body.append(pairs["Cardiomegaly"][0])
    else:
        body.append(
            _Sentence(
                _pick(
                    rng,
                    (
                        "The heart size is normal.",
                        "Heart size is within normal limits.",
                        "The cardiac silhouette is normal in size.",
                        "Normal cardiac size.",
                    ),
                ),
                frozenset(),
            )
        )
    body.append(
        _Sentence(
            _pick(
                rng,
                (
                    "The mediastinal contours are normal.",
                    "Mediastinal and hilar contours are unremarkable.",
                    "The mediastinum is not widened.",
                ),
            ),
            frozenset(),
        )
    )
    for label in ("Edema", "Pneumonia", "Atelectasis", "Pleural Effusion", "Pneumothorax"):
        if label in pairs:
            body.append(pairs[label][0])
    if not present & _LUNG_FINDINGS:
        body.append(
            _Sentence(
                _pick(
                    rng,
                    (
                        "The lungs are clear.",
                        "Lungs are clear bilaterally.",
                        "The lungs are well expanded and clear.",
                    ),
                ),
                frozenset(),
            )
        )
    negations = _negations(present, rng)
    body.extend(_Sentence(text, frozenset()) for text in negations)
    if "Fracture" in pairs:
        body.append(pairs["Fracture"][0])

    for f in findings:
        impression.append(pairs[f.label][1])
    if not findings:
        impression.append(
            _Sentence(
                _pick(
                    rng,
                    (
                        "No acute cardiopulmonary process.",
                        "No acute cardiopulmonary abnormality.",
                        "Normal chest radiograph.",
                        "No radiographic evidence of acute disease.",
                    ),
                ),
                frozenset(),
            )
        )
    # Most reports list the primary problem first; shuffling a little varies the order.
    if len(impression) > 1 and rng.uniform() < 0.3:
        order = rng.permutation(len(impression))
        impression = [impression[int(i)] for i in order]

    labels = dict.fromkeys(CHEXPERT_LABELS, 0.0)
    for sentence in body + impression:
        for name in sentence.asserts:
            labels[name] = 1.0
    if not findings:
        labels[NO_FINDING] = 1.0
    text = (
        "FINDINGS: "
        + " ".join(s.text for s in body)
        + "\n\nIMPRESSION: "
        + " ".join(s.text for s in impression)
    )
    return text, labels


def _negations(present: set[str], rng: np.random.Generator) -> list[str]:
    """Negative statements about some absent findings; never about a present one."""
    out: list[str] = []
    effusion, ptx = "Pleural Effusion" in present, "Pneumothorax" in present
    if not effusion and not ptx:
        if rng.uniform() < 0.85:
            out.append(
                _pick(
                    rng,
                    (
                        "No pleural effusion or pneumothorax.",
                        "There is no pleural effusion or pneumothorax.",
                        "No effusion or pneumothorax is seen.",
                    ),
                )
            )
    elif not effusion:
        if rng.uniform() < 0.7:
            out.append(_pick(rng, ("No pleural effusion.", "There is no pleural effusion.")))
    elif not ptx and rng.uniform() < 0.7:
        out.append(_pick(rng, ("No pneumothorax.", "There is no pneumothorax.")))
    if "Pneumonia" not in present and rng.uniform() < 0.6:
        out.append(
            _pick(
                rng,
                (
                    "No focal consolidation.",
                    "There is no focal consolidation to suggest pneumonia.",
                    "No evidence of pneumonia.",
                ),
            )
        )
    if "Edema" not in present and rng.uniform() < 0.4:
        out.append(_pick(rng, ("No pulmonary edema.", "No evidence of pulmonary edema.")))
    if "Fracture" not in present and rng.uniform() < 0.45:
        out.append(
            _pick(
                rng,
                (
                    "No acute osseous abnormality.",
                    "No displaced rib fracture is seen.",
                    "No acute fracture.",
                ),
            )
        )
    return out


# --------------------------------------------------------------------------- painting


@lru_cache(maxsize=8)
def _unit_grid(size: int) -> tuple[FloatArray, FloatArray]:
    """Pixel-centre coordinates of a (size, size) image in the unit square: (H, W) each."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = np.meshgrid(axis, axis)
    u.setflags(write=False)
    v.setflags(write=False)
    return u, v


def _ramp(x: FloatArray, width: float) -> FloatArray:
    """Soft step 0→1 over ``width`` around x = 0, for anti-aliased edges; same shape as x."""
    return np.clip(x * np.float32(1.0 / width) + np.float32(0.5), 0.0, 1.0)


def _soften(arr: FloatArray, passes: int) -> FloatArray:
    """``passes`` separable [1, 2, 1] / 4 smoothings (each adds 0.5 px² of variance)."""
    out = np.array(arr, dtype=np.float32)
    tmp = np.empty_like(out)
    for _ in range(passes):
        # In place, to spare allocations: tmp holds the neighbours' sum, out the result.
        np.add(out[:-2], out[2:], out=tmp[1:-1])
        tmp[1:-1] *= 0.5
        tmp[1:-1] += out[1:-1]
        out[1:-1] = tmp[1:-1]
        out[1:-1] *= 0.5
        np.add(out[:, :-2], out[:, 2:], out=tmp[:, 1:-1])
        tmp[:, 1:-1] *= 0.5
        tmp[:, 1:-1] += out[:, 1:-1]
        out[:, 1:-1] = tmp[:, 1:-1]
        out[:, 1:-1] *= 0.5
    return out


def _blur(arr: FloatArray, sigma: float) -> FloatArray:
    """Approximate Gaussian blur of an (H, W) float array; sigma in pixels."""
    if sigma < 0.35:
        return arr
    passes = round(2.0 * sigma * sigma)
    if passes <= 6:
        return _soften(arr, max(1, passes))
    # Wide blurs: average down, smooth, and come back up (cheap, and smooth enough).
    factor = max(2, int(sigma / 1.2))
    h, w = arr.shape
    small = Image.fromarray(arr).reduce(factor)
    small_arr = _soften(np.asarray(small, dtype=np.float32), 2)
    back = Image.fromarray(small_arr).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(back, dtype=np.float32)


def _layer_to_float(layer: Image.Image, sigma: float) -> FloatArray:
    """A drawn 8-bit layer as (H, W) floats in [0, 1], blurred by ``sigma`` pixels."""
    return _blur(np.asarray(layer, dtype=np.float32) * np.float32(1.0 / 255.0), sigma)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> FloatArray:
    """Band-limited noise of roughly unit spread: (size, size)."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


class _Frame:
    """Maps the patient frame (unit square, anatomy coordinates) to pixels and back."""

    def __init__(self, acq: _Acquisition, size: int) -> None:
        self.size = size
        self.c = math.cos(acq.rotation)
        self.s = math.sin(acq.rotation)
        self.scale = acq.scale
        self.sx = acq.shift_x
        self.sy = acq.shift_y
        self.ap = acq.view_position.upper() == "AP"
        u, v = _unit_grid(size)
        du = u - np.float32(0.5 + self.sx)
        dv = v - np.float32(0.5 + self.sy)
        inv = np.float32(1.0 / self.scale)
        c, s = np.float32(self.c), np.float32(self.s)
        self.X: FloatArray = 0.5 + (c * du + s * dv) * inv  # (H, W) patient x
        self.Y: FloatArray = 0.5 + (c * dv - s * du) * inv  # (H, W) patient y
        self.px_len = 1.0 / (size * self.scale)  # one pixel in patient units

    def to_px(self, x: float, y: float) -> Point:
        dx, dy = x - 0.5, y - 0.5
        u = 0.5 + self.sx + self.scale * (self.c * dx - self.s * dy)
        v = 0.5 + self.sy + self.scale * (self.s * dx + self.c * dy)
        return (u * self.size - 0.5, v * self.size - 0.5)

    def px(
        self, xs: npt.ArrayLike, ys: npt.ArrayLike
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Patient coordinates to pixel coordinates, elementwise: any shape in, same out."""
        dx = np.asarray(xs, dtype=np.float64) - 0.5
        dy = np.asarray(ys, dtype=np.float64) - 0.5
        u = (0.5 + self.sx + self.scale * (self.c * dx - self.s * dy)) * self.size - 0.5
        v = (0.5 + self.sy + self.scale * (self.s * dx + self.c * dy)) * self.size - 0.5
        return u, v

    def pts(self, xs: npt.ArrayLike, ys: npt.ArrayLike) -> list[Point]:
        """Patient points (N,) + (N,) -> N pixel points, as PIL wants them."""
        u, v = self.px(xs, ys)
        return list(zip(u.tolist(), v.tolist(), strict=True))

    def width(self, w: float) -> int:
        return max(1, round(w * self.size * self.scale))

    def window(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        """The pixel rectangle (rows, cols) that holds a patient-frame box."""
        corners = self.pts([x0, x1, x0, x1], [y0, y0, y1, y1])
        xs = [p[0] for p in corners]
        ys = [p[1] for p in corners]
        c0 = max(0, math.floor(min(xs)) - 2)
        c1 = min(self.size, math.ceil(max(xs)) + 3)
        r0 = max(0, math.floor(min(ys)) - 2)
        r1 = min(self.size, math.ceil(max(ys)) + 3)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


_SIGN: Final[dict[str, float]] = {"right": -1.0, "left": 1.0}


def _sides_of(side: str) -> tuple[str, ...]:
    return ("right", "left") if side == "bilateral" else (side,)


def _paint(plan: _Plan, size: int) -> tuple[npt.NDArray[np.uint8], Geometry]:
    """Render a plan into a uint8 (size, size) image and the geometry of what was drawn.

    Works in attenuation (bright = dense, as displayed in MONOCHROME2): soft tissue adds,
    air in the lungs subtracts, bones add; findings are layered on, then exposure, film
    response and noise turn attenuation into pixels.
    """
    anat, acq = plan.anatomy, plan.acquisition
    fr = _Frame(acq, size)
    X, Y = fr.X, fr.Y
    edge = fr.px_len * 1.2
    tex_rng = _derived_rng(plan.texture_seed)
    noise_rng = _derived_rng(plan.noise_seed)
    by_label = {f.label: f for f in plan.findings}

    def shape_rng(label: str) -> np.random.Generator:
        return _derived_rng(plan.shape_seed, label)

    tw = anat.half_width
    ctr = anat.cardiothoracic_ratio
    heart_height = anat.heart_height
    shift = 0.0  # mediastinal shift toward a collapsed lobe, in patient x
    elevation = {"right": 0.0, "left": 0.0}
    if "Cardiomegaly" in by_label:
        low, high = {"mild": (0.53, 0.57), "moderate": (0.58, 0.63), "severe": (0.64, 0.71)}[
            by_label["Cardiomegaly"].severity
        ]
        ctr = float(shape_rng("Cardiomegaly").uniform(low, high))
        heart_height *= 1.0 + 0.8 * (ctr - anat.cardiothoracic_ratio)
    atelectasis = by_label.get("Atelectasis")
    if atelectasis is not None and atelectasis.severity != "mild":
        r = shape_rng("Atelectasis volume")
        lift = (
            r.uniform(0.035, 0.055) if atelectasis.severity == "moderate" else r.uniform(0.05, 0.07)
        )
        for side in _sides_of(atelectasis.side):
            elevation[side] = float(lift)
        if atelectasis.severity == "severe" and atelectasis.side != "bilateral":
            shift = _SIGN[atelectasis.side] * float(r.uniform(0.012, 0.022))
    base = {
        "right": anat.base_y + acq.inspiration - elevation["right"],
        "left": anat.base_y + acq.inspiration + anat.left_base_drop - elevation["left"],
    }
    apex = anat.apex_y
    mcx = anat.cx + shift
    med_w = anat.mediastinum_half_width
    carina_y = apex + 0.33 * (anat.base_y - apex)

    # Heart: an ellipse with different extents to either side, sitting on the diaphragm.
    heart_w = ctr * 2.0 * tw
    w_right = heart_w * anat.heart_right_fraction
    w_left = heart_w - w_right
    # Widest just above the domes, so that both cardiophrenic angles show against lung.
    heart_cy = min(base.values()) - anat.dome_height - 0.035
    # Computed inside its bounding box only: most of the image is far from the heart.
    hwin = fr.window(
        mcx - w_right - 0.01,
        mcx + w_left + 0.01,
        heart_cy - heart_height - 0.01,
        heart_cy + heart_height + 0.01,
    )
    Xh, Yh = X[hwin], Y[hwin]
    semi = np.where(mcx > Xh, np.float32(w_right), np.float32(w_left))
    rh = ((Xh - mcx) / semi) ** 2 + ((Yh - heart_cy) * np.float32(1.0 / heart_height)) ** 2
    heart = np.zeros_like(X)
    heart[hwin] = _ramp((1.0 - rh) * np.float32(min(w_right, w_left) * 0.5), edge)

    # Body: chest wall and soft tissue, widening into the shoulders; thicker in the middle.
    shoulder_w = anat.shoulder * np.clip((0.22 - Y) * np.float32(1 / 0.22), 0.0, 1.0) ** 2
    body_hw = tw + anat.soft_tissue + shoulder_w
    ax = np.abs(X - anat.cx)
    body = _ramp(body_hw - ax, 2.0 * edge)
    thick = np.sqrt(np.clip(1.0 - (ax / body_hw) ** 2, 0.0, 1.0))
    atten = body * (0.12 + 0.48 * thick)  # (H, W)

    lungs: dict[str, FloatArray] = {}
    tissue: dict[str, FloatArray] = {}  # where lung parenchyma (and its markings) is
    air: dict[str, FloatArray] = {}
    masks: dict[str, BoolArray] = {}
    hila_patient: dict[str, Point] = {}
    ptx = by_label.get("Pneumothorax")
    ptx_space: FloatArray | None = None
    pleural_line: FloatArray | None = None
    for side in ("right", "left"):
        sgn = _SIGN[side]
        # Each lung is computed inside its bounding box only; zero outside.
        win = fr.window(
            mcx + sgn * (med_w - 0.02), mcx + sgn * 1.15 * tw, apex - 0.03, base[side] + 0.03
        )
        a = sgn * (X[win] - mcx)  # distance from the midline toward this side
        lung_w, core = _lung_shape(a, Y[win], anat, side, base[side], med_w, edge)
        depth = 0.45 + 0.55 * np.sqrt(core)
        lungs[side], tissue[side], air[side] = (np.zeros_like(X) for _ in range(3))
        lungs[side][win] = lung_w
        hila_patient[side] = (
            mcx + sgn * (med_w + 0.035),
            apex + (0.47 if side == "right" else 0.43) * (base[side] - apex),
        )
        if ptx is not None and ptx.side == side:
            collapsed = _collapsed_lung(a, Y[win], anat, side, base[side], med_w, ptx, fr)
            collapsed = collapsed * lung_w
            ptx_space, pleural_line = np.zeros_like(X), np.zeros_like(X)
            ptx_space[win] = np.clip(lung_w - collapsed, 0.0, 1.0)
            pleural_line[win] = 4.0 * collapsed * (1.0 - collapsed) * lung_w
            tissue[side][win] = collapsed
            # The collapsed lung holds less air, so it is a little denser.
            k = {"mild": 0.1, "moderate": 0.18, "severe": 0.3}[ptx.severity]
            air[side][win] = lung_w * depth * (1.0 - k * collapsed)
            masks["Pneumothorax"] = ptx_space > 0.5
        else:
            tissue[side][win] = lung_w
            air[side][win] = lung_w * depth
    behind_heart = 1.0 - 0.92 * heart
    lung_air = (air["right"] + air["left"]) * behind_heart
    lung_any = np.clip(lungs["right"] + lungs["left"], 0.0, 1.0)
    tissue_any = np.clip(tissue["right"] + tissue["left"], 0.0, 1.0) * behind_heart
    # Heart, mediastinum and upper abdomen are one water-dense mass: no edge between them.
    atten = atten + 0.08 * body * thick * thick * (1.0 - lung_any * (1.0 - heart))
    atten = atten - _LUNG_DARKNESS * lung_air
    if ptx_space is not None and pleural_line is not None:
        atten = atten - 0.05 * ptx_space + 0.12 * np.clip(pleural_line, 0.0, 1.0)

    if anat.breast > 0:
        for side in ("right", "left"):
            bx = mcx + _SIGN[side] * 0.62 * tw
            by = base[side] - 0.07
            d = ((X - bx) * np.float32(1 / 0.19)) ** 2 + ((Y - by) * np.float32(1 / 0.13)) ** 2
            atten = atten + anat.breast * _ramp(1.0 - d, 0.6) * body
    if anat.gastric_bubble > 0:
        gx = mcx + 0.5 * tw
        gy = base["left"] - anat.dome_height + 0.06
        gw = 0.04 + 0.03 * anat.gastric_bubble
        d = ((X - gx) * np.float32(1 / gw)) ** 2 + ((Y - gy) * np.float32(1 / 0.026)) ** 2
        atten = atten - 0.1 * _ramp(1.0 - d, 0.4) * (1.0 - lung_any)

    # Spine: vertebral bodies and disc spaces, seen through the mediastinum.
    spine_band = _ramp(0.028 - np.abs(X - mcx), 2.0 * edge)
    phase = (Y - apex) * np.float32(2 * math.pi / anat.rib_spacing)
    discs = 0.75 + 0.25 * np.clip(2.5 * np.cos(phase) + 1.5, 0.0, 1.0)
    atten = atten + 0.05 * spine_band * discs * body

    airway = _draw_airways(fr, mcx, carina_y)
    atten = atten - 0.14 * airway * body
    edema = by_label.get("Edema")
    vessels = _draw_vessels(anat, fr, hila_patient, edema, base)
    # Lung texture down to a few pixels: the fine markings whose absence shows a pneumothorax.
    parenchyma = 0.4 * _smooth_noise(tex_rng, size, max(4, size // 10)) + 0.6 * _smooth_noise(
        tex_rng, size, max(8, size // 3)
    )
    markings = tissue_any * (0.11 * vessels + 0.06 * parenchyma)

    # Opacities fill air spaces: they brighten a lung up to, not beyond, soft tissue.
    opacity: FloatArray | None = None
    if "Pleural Effusion" in by_label:
        fluid = _effusion(
            by_label["Pleural Effusion"],
            shape_rng("Pleural Effusion"),
            X,
            Y,
            anat,
            base,
            mcx,
            lungs,
        )
        opacity = fluid
        masks["Pleural Effusion"] = fluid > 0.5
    if "Pneumonia" in by_label:
        f = by_label["Pneumonia"]
        pn = _pneumonia(f, shape_rng("Pneumonia"), fr, anat, base, mcx)
        pn = pn * np.clip(sum(lungs[side] for side in _sides_of(f.side)), 0.0, 1.0)
        opacity = pn if opacity is None else np.maximum(opacity, pn)
        masks["Pneumonia"] = pn > 0.25
    if edema is not None:
        haze = _edema(edema, shape_rng("Edema"), X, Y, hila_patient, lungs, size)
        opacity = haze if opacity is None else np.maximum(opacity, haze)
        masks["Edema"] = haze > 0.25
    if atelectasis is not None:
        band = _atelectasis(atelectasis, shape_rng("Atelectasis"), fr, anat, base, mcx)
        # Behind the heart a collapsed lobe shows as added density rather than lost air.
        atten = atten + 0.05 * band * heart
        band = band * lung_any
        opacity = band if opacity is None else np.maximum(opacity, band)
        masks["Atelectasis"] = band > 0.3
    clear = lung_any
    if opacity is None:
        atten = atten + markings
    else:
        # Fluid and exudate hide the vessels and the bones behind them.
        atten = atten + opacity * (_LUNG_DARKNESS * lung_air + 0.03 * lung_any)
        atten = atten + markings * (1.0 - 0.8 * opacity)
        clear = lung_any * (1.0 - 0.8 * opacity)

    # Bones: seen best against aerated lung, faintly through fluid and soft tissue.
    fracture = by_label.get("Fracture")
    back, front, collar, fracture_points = _draw_bones(anat, fr, mcx, fracture, shape_rng)
    atten = atten + (0.06 + 0.09 * clear) * back + (0.02 + 0.035 * clear) * front
    atten = atten + 0.18 * collar

    # Exposure, film response, unsharpness and quantum noise.
    img = (atten - np.float32(acq.window_low)) * np.float32(
        1.0 / (acq.window_high - acq.window_low)
    )
    img = np.clip(img, 0.0, 1.0) ** np.float32(acq.gamma)
    img = img * (1.0 + np.float32(acq.heel) * (Y - 0.5))
    img = _blur(img, acq.blur_px * size / 256.0)
    img = img + noise_rng.standard_normal(img.shape, dtype=np.float32) * np.float32(acq.noise)
    out = np.clip(img * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)  # (H, W)

    masks["lungs"] = lung_any > 0.5
    masks["heart"] = heart > 0.5
    if "Cardiomegaly" in by_label:
        masks["Cardiomegaly"] = masks["heart"]
    if fracture_points:
        masks["Fracture"] = _disc_mask(size, fracture_points, 0.035 * size * fr.scale)
    px_per_unit = size * fr.scale
    centre = fr.to_px(mcx, heart_cy)
    geometry = Geometry(
        cardiothoracic_ratio=heart_w / (2.0 * tw),
        heart_width=heart_w * px_per_unit,
        thorax_width=2.0 * tw * px_per_unit,
        heart_row=centre[1],
        midline_x=centre[0],
        costophrenic_angles={s: fr.to_px(mcx + _SIGN[s] * tw, base[s]) for s in _SIGN},
        diaphragm_domes={
            s: fr.to_px(mcx + _SIGN[s] * 0.45 * tw, base[s] - anat.dome_height) for s in _SIGN
        },
        hila={s: fr.to_px(*hila_patient[s]) for s in _SIGN},
        fracture_points=fracture_points,
        masks=masks,
    )
    return out, geometry


def _lung_shape(
    a: FloatArray,
    Y: FloatArray,
    anat: Anatomy,
    side: str,
    base: float,
    med_w: float,
    edge: float,
) -> tuple[FloatArray, FloatArray]:
    """Soft lung mask and its 'core' (0 at the edge, 1 in the middle); (H, W) each.

    ``a`` is the distance from the midline toward this lung's side. The lung is a
    superellipse (exponent 2.5) cut by the diaphragm below and the mediastinum medially.
    """
    tw = anat.half_width
    apex = anat.apex_y
    height = base - apex
    yc, ry = apex + 0.78 * height, 0.8 * height
    # Narrower toward the apex, widest at the costophrenic angles.
    t = np.clip((Y - np.float32(apex)) * np.float32(1.0 / height), 0.0, 1.2)
    widen = 0.76 + 0.24 * t
    ra = np.float32(0.5 * tw) * widen
    qa = np.abs(a - np.float32(0.52 * tw) * widen) / ra
    qy = np.abs((Y - np.float32(yc)) * np.float32(1.0 / ry))
    r = qa * qa * np.sqrt(qa) + qy * qy * np.sqrt(qy)
    core = np.clip(1.0 - r, 0.0, 1.0)
    env = _ramp((1.0 - r) * ra * np.float32(1.0 / 2.5), edge)
    # Diaphragm: a dome peaking at 0.45 of the half-width, lowest at the costophrenic angle.
    a_d = 0.45 * tw
    f = (a - np.float32(a_d)) * np.float32(1.0 / (1.05 * tw - a_d))
    curve = f * f * np.where(f > 0, np.float32(1.0), np.float32(0.8))
    dia = base - anat.dome_height * np.clip(1.0 - curve, 0.0, 1.0)
    below = _ramp(dia - Y, edge)
    # Mediastinum, with the aortic knob bulging into the left upper lung.
    med = med_w + 0.012 * np.clip((Y - apex) * np.float32(1.0 / height), 0.0, 1.0)
    if side == "left":
        knob_y = apex + 0.27 * height
        med = med + anat.aortic_knob * np.exp(-(((Y - knob_y) * np.float32(1 / 0.035)) ** 2))
    outside = _ramp(a - med, edge)
    return env * below * outside, core


def _collapsed_lung(
    a: FloatArray,
    Y: FloatArray,
    anat: Anatomy,
    side: str,
    base: float,
    med_w: float,
    f: Finding,
    fr: _Frame,
) -> FloatArray:
    """A lung pulled away from the chest wall: the same shape in stretched coordinates."""
    k = {"mild": 0.14, "moderate": 0.25, "severe": 0.42}[f.severity]
    height = base - anat.apex_y
    a_m = med_w + 0.03
    if f.location == "apical":
        y_anchor, ky, ka = base, 1.0 - k, 1.0 - 0.35 * k
    elif f.location == "lateral":
        y_anchor, ky, ka = anat.apex_y + 0.5 * height, 1.0 - 0.35 * k, 1.0 - k
    else:  # basilar: the lung rises off the diaphragm
        y_anchor, ky, ka = anat.apex_y, 1.0 - 0.8 * k, 1.0 - 0.4 * k
    a2 = a_m + (a - np.float32(a_m)) * np.float32(1.0 / ka)
    y2 = y_anchor + (Y - np.float32(y_anchor)) * np.float32(1.0 / ky)
    # A sharp edge: the visceral pleura is a thin line, not a gradient.
    lung, _ = _lung_shape(a2, y2, anat, side, base, med_w, fr.px_len * 0.8)
    return lung


def _effusion(
    f: Finding,
    r: np.random.Generator,
    X: FloatArray,
    Y: FloatArray,
    anat: Anatomy,
    base: Mapping[str, float],
    mcx: float,
    lungs: Mapping[str, FloatArray],
) -> FloatArray:
    """Dependent fluid with a meniscus climbing the lateral chest wall: (H, W) in [0, 1]."""
    tw = anat.half_width
    levels = {"mild": (0.1, 0.15), "moderate": (0.22, 0.3), "severe": (0.42, 0.55)}
    fluid = np.zeros_like(X)
    for side in _sides_of(f.side):
        a = _SIGN[side] * (X - mcx)
        frac = float(r.uniform(*levels[f.severity]))
        height = base[side] - anat.apex_y
        rise = float(r.uniform(0.07, 0.12)) * (0.5 + frac)
        lat = np.clip((a - 0.15 * tw) * np.float32(1.0 / (0.85 * tw)), 0.0, 1.0)
        top = base[side] - frac * height - rise * lat * lat * lat
        grad = 0.03 + 0.06 * frac
        fluid = fluid + np.clip((Y - top) * np.float32(1.0 / grad), 0.0, 1.0) * lungs[side]
    return np.clip(fluid, 0.0, 1.0) * np.float32(0.97)


def _edema(
    f: Finding,
    r: np.random.Generator,
    X: FloatArray,
    Y: FloatArray,
    hila: Mapping[str, Point],
    lungs: Mapping[str, FloatArray],
    size: int,
) -> FloatArray:
    """Bilateral perihilar ("bat wing") haze fading toward the periphery: (H, W) in [0, 1]."""
    level = SEVERITIES.index(f.severity)
    amp = (0.4, 0.6, 0.8)[level]
    haze = np.zeros_like(X)
    for side in ("right", "left"):
        hx, hy = hila[side]
        sa = float(r.uniform(0.13, 0.17)) * (1.0 + 0.25 * level)
        sy = float(r.uniform(0.1, 0.13)) * (1.0 + 0.2 * level)
        g = np.exp(-(((X - hx) * np.float32(1 / sa)) ** 2) - ((Y - hy) * np.float32(1 / sy)) ** 2)
        haze = haze + g * lungs[side]
    if f.severity == "severe":
        # Alveolar edema is blotchy rather than a smooth veil.
        haze = haze * np.clip(0.75 + 0.5 * _smooth_noise(r, size, max(6, size // 12)), 0.0, 1.0)
    return np.clip(haze * amp, 0.0, 1.0)


@lru_cache(maxsize=1)
def _rib_params() -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Parameters along a rib's posterior (14,) and anterior (10,) course, and their curves."""
    tau = np.linspace(0.0, 1.0, 14)
    tau2 = np.linspace(0.0, 1.0, 10)
    return tau, tau**2.2, tau2, tau2**1.2


_N_RIBS: Final = 11


def _rib_paths(
    anat: Anatomy, mcx: float, side: str
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Posterior (11, 14) and anterior (11, 10) centre lines of one side's ribs, x and y in
    patient coordinates, one row per rib from the first down."""
    sgn = _SIGN[side]
    tw = anat.half_width
    index = np.arange(_N_RIBS, dtype=np.float64)[:, None]  # (11, 1)
    y0 = anat.rib_y0 + index * anat.rib_spacing
    # The first rib is short and tightly curved.
    reach = np.where(index == 0, 0.62, 1.0)
    tau, tau_curve, tau2, tau2_curve = _rib_params()
    post_a = 0.025 + tau * reach * (1.06 * tw - 0.025)  # (11, 14)
    post_y = y0 - 0.04 * tau + (0.11 + 0.004 * index) * reach * tau_curve
    lat_a, lat_y = post_a[:, -1:], post_y[:, -1:]
    ant_a = lat_a - tau2 * (lat_a - 0.3 * tw)  # (11, 10)
    ant_y = lat_y + 0.012 + 0.11 * tau2_curve
    return mcx + sgn * post_a, post_y, mcx + sgn * ant_a, ant_y


def _clavicle_path(anat: Anatomy, mcx: float, side: str, ap: bool) -> tuple[FloatArray, FloatArray]:
    sgn = _SIGN[side]
    y0 = anat.apex_y + (0.035 if ap else 0.07)
    tau = np.linspace(0.0, 1.0, 12, dtype=np.float32)
    xs = mcx + sgn * (0.03 + 0.3 * tau)
    ys = y0 - 0.05 * tau + 0.012 * np.sin(2 * math.pi * tau)
    return xs, ys


def _fracture_site(f: Finding, r: np.random.Generator) -> tuple[int, float]:
    """(rib index, or -1 for the clavicle; position along the bone in [0, 1])."""
    if f.location == "clavicle":
        return -1, float(r.uniform(0.35, 0.65))
    part, _, number = f.location.split()
    # Along the posterior course; a "lateral" break sits where the rib turns forward.
    pos = float(r.uniform(0.4, 0.7)) if part == "posterior" else float(r.uniform(0.8, 0.88))
    return int(number) - 1, pos


def _split_at(
    pts: Sequence[Point], pos: float, gap: float
) -> tuple[list[Point], list[Point], Point, Point]:
    """Cut a polyline at fraction ``pos`` of its length, ``gap`` pixels apart.

    Returns the two parts, the break point and the unit normal of the bone there.
    """
    arr = np.asarray(pts, dtype=np.float64)
    seg = np.hypot(*np.diff(arr, axis=0).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    cut = pos * float(cum[-1])

    def at(s: float) -> Point:
        i = int(np.clip(np.searchsorted(cum, s) - 1, 0, len(seg) - 1))
        t = (s - cum[i]) / max(float(seg[i]), 1e-9)
        p = arr[i] + t * (arr[i + 1] - arr[i])
        return (float(p[0]), float(p[1]))

    first = [(float(x), float(y)) for (x, y), c in zip(arr, cum, strict=True) if c < cut - gap / 2]
    second = [(float(x), float(y)) for (x, y), c in zip(arr, cum, strict=True) if c > cut + gap / 2]
    i = int(np.clip(np.searchsorted(cum, cut) - 1, 0, len(seg) - 1))
    tangent = (arr[i + 1] - arr[i]) / max(float(seg[i]), 1e-9)
    normal = (float(-tangent[1]), float(tangent[0]))
    return [*first, at(cut - gap / 2)], [at(cut + gap / 2), *second], at(cut), normal


def _draw_bone(
    draw: ImageDraw.ImageDraw, pts: Sequence[Point], width: int, fill: int, core: int
) -> None:
    """A tubular bone: bright cortex on both edges, a less dense medulla between."""
    if len(pts) < 2:
        return
    draw.line(list(pts), fill=fill, width=width)
    if width >= 4:
        draw.line(list(pts), fill=core, width=width - 2)


def _break_bone(
    pts: Sequence[Point], pos: float, gap: float, step: float, angle: float
) -> tuple[list[Point], list[Point], Point]:
    """Split a bone at ``pos``; the far fragment is angulated by ``angle`` radians about the
    break and shifted ``step`` pixels across the bone. Returns both parts and the break."""
    first, second, point, normal = _split_at(pts, pos, gap)
    c, s = math.cos(angle), math.sin(angle)
    moved = []
    for x, y in second:
        dx, dy = x - point[0], y - point[1]
        moved.append(
            (
                point[0] + c * dx - s * dy + normal[0] * step,
                point[1] + s * dx + c * dy + normal[1] * step,
            )
        )
    return first, moved, point


def _draw_bones(
    anat: Anatomy,
    fr: _Frame,
    mcx: float,
    fracture: Finding | None,
    shape_rng: Callable[[str], np.random.Generator],
) -> tuple[FloatArray, FloatArray, FloatArray, tuple[Point, ...]]:
    """Posterior ribs, the fainter anterior ribs and the clavicles (each (H, W) in [0, 1]),
    and the fracture's break point in pixels (empty without a fracture)."""
    size = fr.size
    back = Image.new("L", (size, size), 0)
    front = Image.new("L", (size, size), 0)
    collar = Image.new("L", (size, size), 0)
    db, df, dc = ImageDraw.Draw(back), ImageDraw.Draw(front), ImageDraw.Draw(collar)
    w_post = fr.width(0.021)
    w_ant = fr.width(0.015)
    w_cl = fr.width(0.03)
    breaks: dict[tuple[str, int], float] = {}  # (side, rib index or -1) -> position along it
    step = angle = 0.0
    if fracture is not None:
        r = shape_rng("Fracture")
        index, pos = _fracture_site(fracture, r)
        breaks[(fracture.side, index)] = pos
        if index >= 0 and fracture.severity == "severe":
            for k in (1, 2):
                breaks[(fracture.side, index + k)] = pos + float(r.uniform(-0.04, 0.04))
        level = SEVERITIES.index(fracture.severity)
        step = (0.0, 1.3, 2.0)[level] * w_post * float(r.choice((-1.0, 1.0)))
        angle = math.radians((0.0, 8.0, 18.0)[level]) * float(r.choice((-1.0, 1.0)))
    gap = max(2.0, 0.018 * size * fr.scale)
    broken: list[Point] = []
    for side in ("right", "left"):
        pa, py, aa, ay = _rib_paths(anat, mcx, side)
        post_u, post_v = fr.px(pa, py)
        ant_u, ant_v = fr.px(aa, ay)
        for i in range(_N_RIBS):
            post = list(zip(post_u[i].tolist(), post_v[i].tolist(), strict=True))
            ant = list(zip(ant_u[i].tolist(), ant_v[i].tolist(), strict=True))
            w = w_post if i else max(1, w_post - 1)
            if (side, i) in breaks:
                first, second, point = _break_bone(post, breaks[(side, i)], gap, step, angle)
                _draw_bone(db, first, w, 255, 185)
                _draw_bone(db, second, w, 255, 185)
                broken.append(point)
            else:
                _draw_bone(db, post, w, 255, 185)
            _draw_bone(df, ant, w_ant, 220, 170)
        clavicle = fr.pts(*_clavicle_path(anat, mcx, side, fr.ap))
        if (side, -1) in breaks:
            first, second, point = _break_bone(clavicle, breaks[(side, -1)], gap, 1.5 * step, angle)
            _draw_bone(dc, first, w_cl, 255, 200)
            _draw_bone(dc, second, w_cl, 255, 200)
            broken.append(point)
        else:
            _draw_bone(dc, clavicle, w_cl, 255, 200)
    # No blur of their own: the film's unsharpness, applied to the whole image, is enough.
    return (
        _layer_to_float(back, 0.0),
        _layer_to_float(front, 0.0),
        _layer_to_float(collar, 0.0),
        tuple(broken),
    )


def _disc_mask(size: int, points: Sequence[Point], radius: float) -> BoolArray:
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), dtype=bool)
    for x, y in points:
        mask |= (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
    return mask


def _draw_airways(fr: _Frame, mcx: float, carina_y: float) -> FloatArray:
    """Trachea and main bronchi as an (H, W) layer in [0, 1]."""
    size = fr.size
    layer = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(layer)
    d.line(fr.pts([mcx, mcx], [-0.05, carina_y]), fill=255, width=fr.width(0.03))
    d.line(fr.pts([mcx, mcx - 0.06], [carina_y, carina_y + 0.055]), fill=210, width=fr.width(0.02))
    d.line(fr.pts([mcx, mcx + 0.075], [carina_y, carina_y + 0.07]), fill=200, width=fr.width(0.018))
    return _layer_to_float(layer, 1.2 * size / 256.0)


def _draw_vessels(
    anat: Anatomy,
    fr: _Frame,
    hila: Mapping[str, Point],
    edema: Finding | None,
    base: Mapping[str, float],
) -> FloatArray:
    """Branching pulmonary vessels from each hilum: (H, W) in [0, 1].

    The branching is the patient's (seeded by the anatomy), so two studies of one patient
    show the same vessel pattern. Edema blurs the vessels and adds septal (Kerley B) lines.
    """
    size = fr.size
    layer = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(layer)
    rng = _derived_rng(anat.vessel_seed)
    tw = anat.half_width
    levels = 5
    # Several hundred segments: drawn in one vectorised pass rather than one PIL call each.
    segments: list[tuple[npt.NDArray[np.float64], ...]] = []
    for side in ("right", "left"):
        sgn = _SIGN[side]
        hx, hy = hila[side]
        d.ellipse(_bbox(fr, hx + sgn * 0.01, hy, 0.02, 0.04), fill=130)
        n = int(rng.integers(7, 10))
        spread = np.linspace(-1.0, 1.0, n)
        x0 = hx + sgn * rng.uniform(0.0, 0.015, n)
        y0 = hy + 0.05 * spread + rng.normal(0.0, 0.008, n)
        ang = 1.3 * spread + rng.normal(0.0, 0.12, n)
        length = 0.06 * rng.uniform(0.85, 1.2, n)
        width = np.full(n, 0.009)
        for level in range(levels):
            x1 = x0 + sgn * np.cos(ang) * length
            y1 = y0 + np.sin(ang) * length
            segments.append((x0, y0, x1, y1, width, np.full(len(x0), (220 - 30 * level) / 255)))
            if level == levels - 1:
                break
            m = len(x1)
            # Each vessel continues with a bend and gives off a thinner side branch (most do).
            turn = rng.choice((-1.0, 1.0), m) * rng.uniform(0.35, 0.7, m)
            keep = rng.uniform(size=m) < 0.6
            x0 = np.concatenate([x1, x1[keep]])
            y0 = np.concatenate([y1, y1[keep]])
            ang = np.concatenate([ang + rng.normal(0.0, 0.25, m), (ang + turn)[keep]])
            length = np.concatenate(
                [length * rng.uniform(0.75, 0.9, m), (length * rng.uniform(0.55, 0.75, m))[keep]]
            )
            width = np.concatenate([width * 0.8, (width * 0.6)[keep]])
    sigma = 0.0
    if edema is not None:
        # Interstitial fluid makes the vessel outlines indistinct.
        sigma = 0.45 * size / 256.0 * (2.0 + SEVERITIES.index(edema.severity))
        if edema.severity != "severe":
            for side in ("right", "left"):
                sgn = _SIGN[side]
                for j in range(int(rng.integers(4, 8))):
                    y = base[side] - 0.035 - 0.018 * j - float(rng.uniform(0.0, 0.01))
                    x_out = anat.cx + sgn * tw
                    x_in = x_out - sgn * float(rng.uniform(0.025, 0.045))
                    d.line(fr.pts([x_out, x_in], [y, y]), fill=200, width=fr.width(0.004))
    x0s, y0s, x1s, y1s, widths, values = (
        np.concatenate(parts) for parts in zip(*segments, strict=True)
    )
    u0, v0 = fr.px(x0s, y0s)
    u1, v1 = fr.px(x1s, y1s)
    tree = _splat_segments(size, u0, v0, u1, v1, widths * size * fr.scale, values)
    vessels = np.maximum(np.asarray(layer, dtype=np.float32) * np.float32(1 / 255), tree)
    return _blur(vessels, sigma)


def _splat_segments(
    size: int,
    x0: npt.NDArray[np.float64],
    y0: npt.NDArray[np.float64],
    x1: npt.NDArray[np.float64],
    y1: npt.NDArray[np.float64],
    width: npt.NDArray[np.float64],
    value: npt.NDArray[np.float64],
) -> FloatArray:
    """Rasterise N line segments (pixel coordinates and widths, (N,) each) into a
    (size, size) layer, keeping the largest value where segments cross."""
    dx, dy = x1 - x0, y1 - y0
    length = np.maximum(np.hypot(dx, dy), 1e-6)
    steps = np.ceil(length / 0.5).astype(np.int64) + 1  # samples every half pixel
    seg = np.repeat(np.arange(len(x0)), steps)
    first = np.repeat(np.cumsum(steps) - steps, steps)
    t = (np.arange(seg.size) - first) / np.maximum(steps[seg] - 1, 1)
    px = x0[seg] + t * dx[seg]
    py = y0[seg] + t * dy[seg]
    nx, ny = (-dy / length)[seg], (dx / length)[seg]
    half = (width[seg] - 1.0) / 2.0
    out = np.zeros((size, size), dtype=np.float32)
    for offset in (0.0, -0.5, 0.5, -1.0, 1.0):
        keep = half >= abs(offset) - 1e-9
        ix = np.rint(px[keep] + offset * nx[keep]).astype(np.int64)
        iy = np.rint(py[keep] + offset * ny[keep]).astype(np.int64)
        inside = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
        np.maximum.at(out, (iy[inside], ix[inside]), value[seg][keep][inside].astype(np.float32))
    return out


def _bbox(
    fr: _Frame, x: float, y: float, rx: float, ry: float
) -> tuple[float, float, float, float]:
    px, py = fr.to_px(x, y)
    sx, sy = rx * fr.size * fr.scale, ry * fr.size * fr.scale
    return (px - sx, py - sy, px + sx, py + sy)


def _pneumonia(
    f: Finding,
    r: np.random.Generator,
    fr: _Frame,
    anat: Anatomy,
    base: Mapping[str, float],
    mcx: float,
) -> FloatArray:
    """Patchy, ill-defined airspace opacity in the finding's zone(s): (H, W) in [0, 1]."""
    size = fr.size
    # Drawn at a quarter resolution: the opacity has no sharp edges to lose.
    small = max(16, size // 4)
    k = small / size
    layer = Image.new("L", (small, small), 0)
    d = ImageDraw.Draw(layer)
    tw = anat.half_width
    level = SEVERITIES.index(f.severity)
    spread = (0.045, 0.065, 0.085)[level]
    density = (0.55, 0.72, 0.88)[level]
    t_zone = {"upper": 0.25, "middle": 0.52, "lower": 0.8}[f.location]
    centres: list[Point] = []
    for side in _sides_of(f.side):
        sgn = _SIGN[side]
        height = base[side] - anat.apex_y
        ca = float(r.uniform(0.45, 0.65)) * tw
        cy = anat.apex_y + (t_zone + float(r.uniform(-0.05, 0.05))) * height
        centres.append((mcx + sgn * ca, cy))
        for _ in range(int(r.integers(6, 11))):
            bx = mcx + sgn * ca + float(r.normal(0.0, spread))
            by = cy + float(r.normal(0.0, spread * 0.8))
            rad = float(r.uniform(0.025, 0.05)) * (0.8 + 0.3 * level)
            x0, y0, x1, y1 = _bbox(fr, bx, by, rad, rad * float(r.uniform(0.7, 1.2)))
            d.ellipse((x0 * k, y0 * k, x1 * k, y1 * k), fill=255)
    coarse = _soften(np.asarray(layer, dtype=np.float32) * np.float32(1 / 255), 4)
    op = np.asarray(
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32
    )
    patchy = np.clip(0.85 + 0.25 * _smooth_noise(r, size, max(6, size // 12)), 0.55, 1.0)
    op = np.clip(op * 1.3, 0.0, 1.0) * patchy * np.float32(density)
    if f.severity == "severe":
        # Air bronchograms: dark branching tubes inside the consolidation.
        br = Image.new("L", (size, size), 0)
        db = ImageDraw.Draw(br)
        for x, y in centres:
            for _ in range(3):
                ang = float(r.uniform(0, 2 * math.pi))
                length = float(r.uniform(0.03, 0.06))
                db.line(
                    fr.pts([x, x + math.cos(ang) * length], [y, y + math.sin(ang) * length]),
                    fill=255,
                    width=fr.width(0.005),
                )
        op = op * (1.0 - 0.35 * _layer_to_float(br, 0.5 * size / 256.0))
    return op


def _atelectasis(
    f: Finding,
    r: np.random.Generator,
    fr: _Frame,
    anat: Anatomy,
    base: Mapping[str, float],
    mcx: float,
) -> FloatArray:
    """Plate-like bands at the base and, when severe, a lower-lobe collapse wedge against
    the mediastinum: (H, W) in [0, 1]."""
    size = fr.size
    layer = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(layer)
    tw = anat.half_width
    for side in _sides_of(f.side):
        sgn = _SIGN[side]
        height = base[side] - anat.apex_y
        n_bands = 1 if f.severity == "mild" and r.uniform() < 0.5 else 2
        for _ in range(n_bands):
            y = anat.apex_y + float(r.uniform(0.7, 0.86)) * height
            a0 = float(r.uniform(0.25, 0.4)) * tw
            a1 = a0 + float(r.uniform(0.3, 0.5)) * tw
            tilt = float(r.uniform(-0.02, 0.03))
            d.line(
                fr.pts([mcx + sgn * a0, mcx + sgn * a1], [y, y + tilt]),
                fill=255,
                width=fr.width(float(r.uniform(0.01, 0.016))),
            )
        if f.severity == "severe":
            top = anat.apex_y + 0.5 * height
            xs = [mcx + sgn * 0.05, mcx + sgn * 0.35 * tw, mcx + sgn * 0.05]
            ys = [top, base[side] - 0.02, base[side] + 0.02]
            d.polygon(fr.pts(xs, ys), fill=235)
    return np.clip(_layer_to_float(layer, 1.2 * size / 256.0), 0.0, 1.0) * np.float32(0.85)


def _plan_study(
    rng: np.random.Generator,
    findings: Sequence[str | Finding] | None,
    anatomy: Anatomy | None,
    view_position: str | None,
) -> _Plan:
    # Every consumer gets its own stream, drawn up front, so that adding a finding does
    # not move the anatomy, the acquisition, the texture or the noise.
    seeds = [int(s) for s in rng.integers(0, 2**63 - 1, size=6)]
    anat = anatomy if anatomy is not None else sample_anatomy(_derived_rng(seeds[0]))
    acq = _sample_acquisition(_derived_rng(seeds[1]), view_position)
    resolved = _resolve_findings(findings, seeds[2])
    report, labels = _write_report(resolved, _derived_rng(seeds[5]))
    return _Plan(
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
    _check_size(size)
    plan = _plan_study(rng, findings, anatomy, view_position)
    image, geometry = _paint(plan, size)
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


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 64 or size > 4096:
        raise SyntheticDataError(
            f"image size must be an integer in [64, 4096], got {size!r}", code="invalid_argument"
        )


# --------------------------------------------------------------------------- corpora

MANIFEST_NAME: Final = "manifest.csv"
_STAMP_NAME: Final = "synthetic.json"
#: How many studies a patient has in a corpus, and how likely each count is.
_STUDIES_PER_PATIENT: Final[tuple[tuple[int, ...], tuple[float, ...]]] = (
    (1, 2, 3, 4),
    (0.6, 0.25, 0.1, 0.05),
)


@dataclass(frozen=True)
class _Entry:
    index: int
    patient_id: str
    study_id: str
    split: str
    anatomy: Anatomy


def _corpus_entries(n: int, seed: int, splits: Sequence[float]) -> list[_Entry]:
    """The first ``n`` studies of the corpus for ``seed``, patient by patient.

    Everything about patient j comes from (seed, j) and about study i from (seed, i), so a
    longer corpus extends a shorter one. The split is the patient's, never the study's.
    """
    bounds = np.cumsum(np.asarray(splits, dtype=np.float64))
    entries: list[_Entry] = []
    patient = 0
    while len(entries) < n:
        rng = _derived_rng(seed, "patient", patient)
        count = int(rng.choice(_STUDIES_PER_PATIENT[0], p=_STUDIES_PER_PATIENT[1]))
        draw = float(rng.uniform())
        split = SPLIT_NAMES[min(int(np.searchsorted(bounds, draw, side="right")), 2)]
        anatomy = sample_anatomy(rng)
        for _ in range(count):
            if len(entries) == n:
                break
            index = len(entries)
            entries.append(_Entry(index, f"p{patient:05d}", f"s{index:06d}", split, anatomy))
        patient += 1
    return entries


def generate_corpus(
    out_dir: str | os.PathLike[str],
    n: int,
    *,
    seed: int = 0,
    size: int = 256,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    progress: bool = True,
) -> Path:
    """Write ``n`` synthetic studies as ``out_dir/images/*.png`` plus ``out_dir/manifest.csv``.

    Patients have one to four studies; ``splits`` (train, validate, test fractions) is
    applied per patient, so a patient's studies share a split. Images that already exist
    are reused rather than redrawn, which makes a re-run with the same arguments cheap; a
    folder made with another seed or size is refused (``corpus_mismatch``). Returns the
    manifest's path (format: :mod:`model.data.manifest`).
    """
    from tqdm import tqdm

    from model.data.manifest import PairedRecord, write_manifest

    _check_size(size)
    if not isinstance(n, int) or n < 0:
        raise SyntheticDataError(
            f"n must be a non-negative integer, got {n!r}", code="invalid_argument"
        )
    fractions = [float(x) for x in splits]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise SyntheticDataError(
            f"splits must be three non-negative fractions summing to 1, got {splits!r}",
            code="invalid_argument",
        )
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    _claim_folder(out, seed, size)
    records: list[PairedRecord] = []
    rendered = 0
    # disable=None: a bar on a terminal, silence in logs and CI.
    with tqdm(
        total=n, disable=None if progress else True, desc="synthetic studies", unit="study"
    ) as bar:
        for entry in _corpus_entries(n, seed, fractions):
            plan = _plan_study(_derived_rng(seed, "study", entry.index), None, entry.anatomy, None)
            path = images / f"{entry.study_id}.png"
            if not path.exists():
                image, _ = _paint(plan, size)
                # Level 1: the film grain does not compress anyway, and it is 2x faster.
                _save_atomic(Image.fromarray(image), path, format="PNG", compress_level=1)
                rendered += 1
            records.append(
                PairedRecord(
                    image_path=path.resolve(),
                    report=plan.report,
                    labels={name: value for name, value in plan.labels.items()},
                    patient_id=entry.patient_id,
                    study_id=entry.study_id,
                    split=entry.split,
                    view_position=plan.acquisition.view_position,
                )
            )
            bar.update(1)
    manifest = write_manifest(records, out / MANIFEST_NAME)
    logger.info(
        "synthetic corpus: %d studies (%d rendered, %d reused) in %s",
        n,
        rendered,
        n - rendered,
        out,
    )
    return manifest


def _claim_folder(out: Path, seed: int, size: int) -> None:
    """Record what made the folder's images, or refuse one made otherwise."""
    stamp_path = out / _STAMP_NAME
    wanted = {"generator": __name__, "version": GENERATOR_VERSION, "seed": seed, "size": size}
    if stamp_path.exists():
        try:
            found = json.loads(stamp_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SyntheticDataError(
                f"{stamp_path}: unreadable ({exc}); remove the folder or choose another",
                code="corpus_mismatch",
            ) from None
        if found != wanted:
            raise SyntheticDataError(
                f"{out} holds a synthetic corpus made with {found}, not {wanted};"
                " choose another folder or delete it",
                code="corpus_mismatch",
            )
        return
    if any((out / "images").iterdir()):
        raise SyntheticDataError(
            f"{out}/images already holds files that this generator did not record;"
            " choose another folder",
            code="corpus_mismatch",
        )
    stamp_path.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")


def _save_atomic(image: Image.Image, path: Path, **params: object) -> None:
    """Save via a temporary file and a rename, so a file that exists is a whole file."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, **params)  # type: ignore[arg-type]
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


_PATIENT_RE: Final = re.compile(r"patient\d+")
_STUDY_RE: Final = re.compile(r"(patient\d+)/(study\d+)")


def chexpert_study(
    path: str,
    labels: Mapping[str, float | None],
    *,
    seed: int = 0,
    size: int = 320,
    view_position: str | None = None,
) -> SyntheticStudy:
    """The synthetic study that stands in for one CheXpert image.

    Renders every finding whose label is 1.0 (uncertain -1.0 and blank are not rendered);
    a row with none renders a normal chest. The patient's anatomy is seeded by the
    ``patientNNNNN`` part of ``path`` and the study by the whole path, so every study of a
    patient shares one body and the result does not depend on the CSV's row order.
    """
    match = _PATIENT_RE.search(path)
    patient_id = match.group(0) if match else path
    study_match = _STUDY_RE.search(path)
    study_id = f"{study_match.group(1)}_{study_match.group(2)}" if study_match else path
    findings = [label for label in FINDING_LABELS if labels.get(label) == 1.0]
    return render_study(
        _derived_rng(seed, "chexpert-study", path),
        findings,
        size=size,
        anatomy=sample_anatomy(_derived_rng(seed, "chexpert-patient", patient_id)),
        view_position=view_position,
        patient_id=patient_id,
        study_id=study_id,
    )


@dataclass(frozen=True)
class _ChexpertRow:
    path: str
    labels: dict[str, float | None]
    view_position: str | None


def _read_chexpert_csv(csv_path: Path) -> list[_ChexpertRow]:
    """Rows of a CheXpert-format CSV: label columns (candidate.csv, train.csv) or the
    ``Variable,Path`` shape of the 8x200 image query file."""
    rows: list[_ChexpertRow] = []
    try:
        handle = csv_path.open("r", encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise SyntheticDataError(
            f"{csv_path}: cannot read ({exc.strerror})", code="invalid_chexpert_csv"
        ) from None
    with handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        label_columns = [name for name in CHEXPERT_LABELS if name in header]
        if "Path" not in header or not (label_columns or "Variable" in header):
            raise SyntheticDataError(
                f"{csv_path}: expected a 'Path' column and CheXpert label columns or a"
                f" 'Variable' column, got {header}",
                code="invalid_chexpert_csv",
            )
        for row in reader:
            where = f"{csv_path}: line {reader.line_num}"
            path = (row.get("Path") or "").strip()
            if not path:
                raise SyntheticDataError(f"{where}: empty Path", code="invalid_chexpert_csv")
            labels: dict[str, float | None] = {}
            if label_columns:
                for name in label_columns:
                    labels[name] = _label_cell(row.get(name), where, name)
            else:
                variable = (row.get("Variable") or "").strip()
                if variable not in CHEXPERT_LABELS:
                    raise SyntheticDataError(
                        f"{where}: Variable {variable!r} is not a CheXpert observation",
                        code="invalid_chexpert_csv",
                    )
                labels[variable] = 1.0
            view = (row.get("AP/PA") or "").strip() or None
            rows.append(_ChexpertRow(path, labels, view))
    return rows


def _label_cell(raw: str | None, where: str, name: str) -> float | None:
    text = (raw or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in (1.0, 0.0, -1.0):
        raise SyntheticDataError(
            f"{where}: column {name!r} must be 1.0, 0.0, -1.0 or empty, got {raw!r}",
            code="invalid_chexpert_csv",
        )
    return value


def write_chexpert_tree(
    root: str | os.PathLike[str],
    csv_paths: Sequence[str | os.PathLike[str]],
    *,
    seed: int = 0,
    size: int = 320,
    progress: bool = False,
) -> int:
    """Render a JPEG at ``root/<Path>`` for every row of the given CheXpert-format CSVs.

    The image shows the findings the row labels 1.0 (see :func:`chexpert_study`), so the
    CheXpert 8x200 protocol files (``candidate.csv``, ``query.csv``) can be evaluated end
    to end against synthetic images. Files that already exist are skipped; a path listed
    twice is rendered once. Returns how many files were written.
    """
    from tqdm import tqdm

    _check_size(size)
    base = Path(root).resolve()
    rows = [row for csv_path in csv_paths for row in _read_chexpert_csv(Path(csv_path))]
    written = 0
    seen: set[str] = set()
    for row in tqdm(rows, disable=None if progress else True, desc="CheXpert tree", unit="image"):
        if row.path in seen:
            continue
        seen.add(row.path)
        dest = (base / row.path).resolve()
        if base not in dest.parents:
            raise SyntheticDataError(
                f"CheXpert path {row.path!r} points outside {base}", code="invalid_chexpert_csv"
            )
        if dest.exists():
            continue
        study = chexpert_study(
            row.path, row.labels, seed=seed, size=size, view_position=row.view_position
        )
        dest.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic(Image.fromarray(study.image), dest, format="JPEG", quality=92)
        written += 1
    logger.info(
        "CheXpert tree: %d images written, %d already present under %s",
        written,
        len(seen) - written,
        base,
    )
    return written
