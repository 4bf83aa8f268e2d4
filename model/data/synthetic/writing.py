"""The report writer: a FINDINGS and an IMPRESSION section from a study's findings.

Each finding has its phrasings in tables of templates (``{size}``, ``{side}``, ... are
filled from the finding; a capitalised key such as ``{Size}`` is the word capitalised),
and a sentence names the CheXpert labels it asserts. The FINDINGS section goes through
the regions of :data:`model.data.synthetic.findings.FINDINGS` in order: heart,
mediastinum, lungs (or "the lungs are clear"), some negated absent findings, bones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from model.data.synthetic.findings import (
    BONES,
    FINDINGS,
    HEART,
    LUNG_REGIONS,
    NO_FINDING,
    SEVERITIES,
    Finding,
)
from model.labels import CHEXPERT_LABELS

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
_ZONES: Final[dict[tuple[str, str], tuple[str, ...]]] = {
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

OPACITY: Final = frozenset({"Lung Opacity"})
CONSOLIDATION: Final = frozenset({"Consolidation"})
NONE: Final[frozenset[str]] = frozenset()

# --------------------------------------------------------------------------- phrasings

_CARDIOMEGALY: Final = (
    "The cardiac silhouette is {adverb} enlarged.",
    "The heart is {adverb} enlarged.",
    "There is {degree} cardiomegaly.",
    "The heart shadow is {adverb} enlarged, in keeping with cardiomegaly.",
    "{Degree} enlargement of the cardiac silhouette.",
)
_CARDIOMEGALY_IMPRESSION: Final = (
    "{Degree} cardiomegaly.",
    "Cardiomegaly.",
    "Cardiac enlargement.",
)

#: (template, the least severity it is used for)
_EFFUSION: Final = (
    ("There {verb} {a}{size} {side} {noun}.", "mild"),
    ("{Size} {side} {noun}.", "mild"),
    ("Blunting of {angle}, consistent with {a}{size} {noun}.", "mild"),
    ("Meniscus-shaped opacity at the {side} {bases} representing {a}{size} {noun}.", "moderate"),
    ("{Size} {side} {noun} opacifying {hemithorax}.", "severe"),
)
_EFFUSION_IMPRESSION: Final = ("{Size} {side} {noun}.", "{Side} {noun}.")

_PNEUMOTHORAX: Final = (
    "There is a {size} {side} {where} pneumothorax.",
    "{Size} {side} {where} pneumothorax.",
    "A {side} {where} pleural line is seen with no lung markings beyond it,"
    " consistent with a {size} pneumothorax.",
    "{Side} {where} pleural air is present, a {size} pneumothorax.",
)
_PNEUMOTHORAX_IMPRESSION: Final = ("{Size} {side} pneumothorax.", "{Side} {where} pneumothorax.")

_PATCHY: Final = ("patchy", "ill-defined", "fluffy", "focal", "hazy")
_PNEUMONIA: Final = (
    ("{Patchy} opacity in the {zone}{air}, concerning for pneumonia.", OPACITY),
    ("{Patchy} airspace opacity in the {zone}{air} likely represents pneumonia.", OPACITY),
    ("Consolidation in the {zone}{air}, consistent with pneumonia.", CONSOLIDATION),
    (
        "There is {degree} airspace consolidation in the {zone}{air}, compatible with pneumonia.",
        CONSOLIDATION,
    ),
)
_PNEUMONIA_IMPRESSION: Final = (
    "{Zone} pneumonia.",
    "Findings consistent with pneumonia in the {zone}.",
    "Pneumonia in the {zone}.",
)

_EDEMA: Final[dict[str, tuple[tuple[str, frozenset[str]], ...]]] = {
    "mild": (
        ("Mild interstitial pulmonary edema with perihilar haziness.", NONE),
        ("Perihilar haziness and septal lines consistent with mild interstitial edema.", NONE),
        ("Mild pulmonary vascular congestion and interstitial edema.", NONE),
    ),
    "moderate": (
        ("Moderate pulmonary edema with bilateral perihilar opacities.", OPACITY),
        ("Bilateral perihilar haziness consistent with moderate pulmonary edema.", NONE),
        ("Moderate interstitial and early alveolar edema.", NONE),
    ),
    "severe": (
        (
            "Severe alveolar pulmonary edema with bilateral perihilar airspace opacities"
            " in a bat-wing distribution.",
            OPACITY,
        ),
        (
            "Marked bilateral perihilar airspace opacities consistent with severe pulmonary edema.",
            OPACITY,
        ),
        ("Severe pulmonary edema.", NONE),
    ),
}
_EDEMA_IMPRESSION: Final = ("{Degree} pulmonary edema.", "Pulmonary edema.", "{Degree} edema.")

_ATELECTASIS_KIND: Final = ("plate-like", "linear", "subsegmental", "discoid")
_ATELECTASIS: Final[dict[str, tuple[tuple[str, frozenset[str]], ...]]] = {
    "mild": (
        ("{Kind} atelectasis at {base}.", NONE),
        ("Linear opacity at {base}, likely atelectasis.", OPACITY),
        ("{Where} atelectasis.", NONE),
    ),
    "moderate": (
        ("Plate-like atelectasis at {base} with elevation of {dome} indicating volume loss.", NONE),
        ("Basilar opacity and volume loss at {base}, likely due to atelectasis.", OPACITY),
        ("{Where} atelectasis with volume loss.", NONE),
    ),
    "severe": (
        ("Atelectasis of {lobe} with volume loss.", NONE),
        (
            "Dense triangular opacity at {base} with volume loss, compatible with"
            " lobar atelectasis of {lobe}.",
            OPACITY,
        ),
    ),
}
_ATELECTASIS_IMPRESSION: Final = ("{Where} atelectasis.", "Atelectasis at {base}.")

_DISPLACEMENT: Final[dict[str, tuple[str, ...]]] = {
    "mild": ("nondisplaced", "acute nondisplaced"),
    "moderate": ("minimally displaced", "mildly displaced"),
    "severe": ("displaced", "angulated displaced"),
}
#: A severe rib fracture breaks a run of three adjacent ribs (as the painter draws it).
_RIB_RUN: Final = (
    "There are {d} fractures of the {side} {span} {part} ribs.",
    "{D} fractures of the {side} {span} {part} ribs.",
    "Cortical step-off of the {side} {span} {part} ribs, compatible with {d} fractures.",
)
_RIB_RUN_IMPRESSION: Final = (
    "Multiple {side} rib fractures.",
    "{D} fractures of the {side} {span} ribs.",
)
_FRACTURE: Final = (
    "There is {a} {d} fracture of the {bone}.",
    "{D} fracture of the {bone}.",
    "{A} {d} fracture involves the {bone}.",
)
_FRACTURE_DISPLACED: Final = "Cortical step-off of the {bone}, compatible with {a} {d} fracture."
_FRACTURE_LUCENT: Final = "A lucent line crosses the {bone}, compatible with {a} {d} fracture."
_FRACTURE_IMPRESSION: Final = ("{D} {bone_imp} fracture.", "Fracture of the {bone_imp}.")

_NORMAL_HEART: Final = (
    "The heart size is normal.",
    "Heart size is within normal limits.",
    "The cardiac silhouette is normal in size.",
    "Normal cardiac size.",
)
_MEDIASTINUM: Final = (
    "The mediastinal contours are normal.",
    "Mediastinal and hilar contours are unremarkable.",
    "The mediastinum is not widened.",
)
_CLEAR_LUNGS: Final = (
    "The lungs are clear.",
    "Lungs are clear bilaterally.",
    "The lungs are well expanded and clear.",
)
_NORMAL_IMPRESSION: Final = (
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality.",
    "Normal chest radiograph.",
    "No radiographic evidence of acute disease.",
)


# --------------------------------------------------------------------------- sentences


@dataclass(frozen=True)
class _Sentence:
    text: str
    asserts: frozenset[str]


#: (FINDINGS text, labels it asserts beyond the finding's own, IMPRESSION text)
_Written = tuple[str, frozenset[str], str]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fill(template: str, words: dict[str, str]) -> str:
    """``template`` with ``{key}`` the word and ``{Key}`` the word capitalised."""
    return template.format(**words, **{_cap(k): _cap(v) for k, v in words.items()})


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _cardiomegaly(f: Finding, words: dict[str, str], rng: np.random.Generator) -> _Written:
    words["adverb"] = _pick(rng, _DEGREE_ADVERB[f.severity])
    body = _fill(_pick(rng, _CARDIOMEGALY), words)
    return body, NONE, _fill(_pick(rng, _CARDIOMEGALY_IMPRESSION), words)


def _effusion(f: Finding, words: dict[str, str], rng: np.random.Generator) -> _Written:
    both = f.side == "bilateral"
    side = words["side"]
    words |= {
        "noun": "pleural effusions" if both else "pleural effusion",
        "verb": "are" if both else "is",
        "a": "" if both else "a ",
        "angle": "both costophrenic angles" if both else f"the {side} costophrenic angle",
        "bases": "bases" if both else "base",
        "hemithorax": "both lower hemithoraces" if both else f"the {side} lower hemithorax",
    }
    level = SEVERITIES.index(f.severity)
    options = [t for t, least in _EFFUSION if SEVERITIES.index(least) <= level]
    body = _fill(_pick(rng, options), words)
    extra = OPACITY if "opacity" in body else NONE
    return body, extra, _fill(_pick(rng, _EFFUSION_IMPRESSION), words)


def _pneumothorax(f: Finding, words: dict[str, str], rng: np.random.Generator) -> _Written:
    words["where"] = f.location
    body = _fill(_pick(rng, _PNEUMOTHORAX), words)
    return body, NONE, _fill(_pick(rng, _PNEUMOTHORAX_IMPRESSION), words)


def _choose(
    rng: np.random.Generator, choices: Sequence[tuple[str, frozenset[str]]]
) -> tuple[str, frozenset[str]]:
    return choices[int(rng.integers(len(choices)))]


def _pneumonia(f: Finding, words: dict[str, str], rng: np.random.Generator) -> _Written:
    words["zone"] = _pick(rng, _ZONES[(f.side, f.location)])
    words["patchy"] = _pick(rng, _PATCHY)
    words["air"] = " with air bronchograms" if f.severity == "severe" else ""
    template, extra = _choose(rng, _PNEUMONIA)
    return _fill(template, words), extra, _fill(_pick(rng, _PNEUMONIA_IMPRESSION), words)


def _edema(f: Finding, words: dict[str, str], rng: np.random.Generator) -> _Written:
    text, extra = _choose(rng, _EDEMA[f.severity])
    return text, extra, _fill(_pick(rng, _EDEMA_IMPRESSION), words)


def _atelectasis(f: Finding, words: dict[str, str], rng: np.random.Generator) -> _Written:
    both = f.side == "bilateral"
    side = words["side"]
    words |= {
        "base": "both lung bases" if both else f"the {side} lung base",
        "where": "bibasilar" if both else f"{side} basilar",
        "dome": "both hemidiaphragms" if both else f"the {side} hemidiaphragm",
        "lobe": "both lower lobes" if both else f"the {side} lower lobe",
    }
    if f.severity == "mild":
        words["kind"] = _pick(rng, _ATELECTASIS_KIND)
    template, extra = _choose(rng, _ATELECTASIS[f.severity])
    return _fill(template, words), extra, _fill(_pick(rng, _ATELECTASIS_IMPRESSION), words)


def _fracture(f: Finding, words: dict[str, str], rng: np.random.Generator) -> _Written:
    d = _pick(rng, _DISPLACEMENT[f.severity])
    words |= {"d": d, "a": _article(d)}
    side = words["side"]
    if f.location == "clavicle":
        words |= {"bone": f"{side} clavicle", "bone_imp": f"{side} clavicle"}
    else:
        part, _, number = f.location.split()
        n = int(number)
        if f.severity == "severe":
            words |= {"part": part, "span": f"{_ordinal(n)} through {_ordinal(n + 2)}"}
            body = _fill(_pick(rng, _RIB_RUN), words)
            return body, NONE, _fill(_pick(rng, _RIB_RUN_IMPRESSION), words)
        words |= {
            "bone": f"{side} {_ordinal(n)} {part} rib",
            "bone_imp": f"{side} {_ordinal(n)} rib",
        }
    last = _FRACTURE_DISPLACED if f.severity != "mild" else _FRACTURE_LUCENT
    body = _fill(_pick(rng, (*_FRACTURE, last)), words)
    return body, NONE, _fill(_pick(rng, _FRACTURE_IMPRESSION), words)


_WRITERS: Final[dict[str, Callable[[Finding, dict[str, str], np.random.Generator], _Written]]] = {
    "Cardiomegaly": _cardiomegaly,
    "Pleural Effusion": _effusion,
    "Pneumothorax": _pneumothorax,
    "Pneumonia": _pneumonia,
    "Edema": _edema,
    "Atelectasis": _atelectasis,
    "Fracture": _fracture,
}


def _finding_sentences(f: Finding, rng: np.random.Generator) -> tuple[_Sentence, _Sentence]:
    """(FINDINGS sentence, IMPRESSION sentence) for one finding."""
    # Every finding draws its degree and size words first, used or not: the draws that
    # follow stay where they are whichever phrasing is picked.
    words = {
        "degree": _pick(rng, _DEGREE_WORD[f.severity]),
        "size": _pick(rng, _SIZE_WORD[f.severity]),
        "side": f.side,
    }
    body, extra, impression = _WRITERS[f.label](f, words, rng)
    own = frozenset({f.label})
    return _Sentence(body, own | extra), _Sentence(impression, own)


# --------------------------------------------------------------------------- the report


def write_report(
    findings: Sequence[Finding], rng: np.random.Generator
) -> tuple[str, dict[str, float]]:
    """The report text and the CheXpert labels it asserts.

    Every finding is named in FINDINGS and in IMPRESSION and never negated; "No Finding"
    is 1.0 exactly when there is no finding.
    """
    pairs = {f.label: _finding_sentences(f, rng) for f in findings}
    body = _findings_section({f.label for f in findings}, pairs, rng)
    impression = [pairs[f.label][1] for f in findings]
    if not findings:
        impression.append(_Sentence(_pick(rng, _NORMAL_IMPRESSION), NONE))
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


def _findings_section(
    present: set[str], pairs: dict[str, tuple[_Sentence, _Sentence]], rng: np.random.Generator
) -> list[_Sentence]:
    """Heart, mediastinum, lungs, negations of some absent findings, bones."""

    def region(regions: frozenset[str]) -> list[_Sentence]:
        return [pairs[k.label][0] for k in FINDINGS if k.region in regions and k.label in pairs]

    body = region(frozenset({HEART})) or [_Sentence(_pick(rng, _NORMAL_HEART), NONE)]
    body.append(_Sentence(_pick(rng, _MEDIASTINUM), NONE))
    body += region(LUNG_REGIONS) or [_Sentence(_pick(rng, _CLEAR_LUNGS), NONE)]
    body += [_Sentence(text, NONE) for text in _negations(present, rng)]
    body += region(frozenset({BONES}))
    return body


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
