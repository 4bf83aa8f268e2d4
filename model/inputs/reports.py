"""Radiology report text: sections, the report body, sentences and ConVIRT's sentence sampling.

ConVIRT feeds the text tower one sentence drawn uniformly from the report's findings and
impression. Real reports make that harder than ``text.split(".")``: MIMIC-CXR reports are
hard-wrapped with headers on their own lines and ``___`` where a name or date was removed;
IU X-ray (Open-i) reports use ``XXXX`` for the same purpose, number their impressions
("1. No acute disease. 2. Stable cardiomegaly.") and measure lesions in "5.2 cm".

:func:`parse_iu_report_xml` reads one Open-i ``ecgen-radiology`` XML report.
"""

from __future__ import annotations

import random
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from model.errors import ModelError


class ReportError(ModelError):
    """A report file that cannot be parsed."""

    code = "invalid_report"


#: Header spellings (upper case, single spaces) and the canonical section each belongs to.
SECTION_ALIASES: Final[dict[str, str]] = {
    "FINDINGS": "FINDINGS",
    "FINDING": "FINDINGS",
    "IMPRESSION": "IMPRESSION",
    "IMPRESSIONS": "IMPRESSION",
    "IMPRESSION(S)": "IMPRESSION",
    "CONCLUSION": "IMPRESSION",
    "CONCLUSIONS": "IMPRESSION",
    "SUMMARY": "IMPRESSION",
    "FINDINGS AND IMPRESSION": "IMPRESSION",
    "FINDINGS AND IMPRESSIONS": "IMPRESSION",
    "FINDINGS/IMPRESSION": "IMPRESSION",
    "FINDINGS / IMPRESSION": "IMPRESSION",
    "COMPARISON": "COMPARISON",
    "COMPARISONS": "COMPARISON",
    "INDICATION": "INDICATION",
    "INDICATIONS": "INDICATION",
    "CLINICAL INDICATION": "INDICATION",
    "HISTORY": "INDICATION",
    "CLINICAL HISTORY": "INDICATION",
    "CLINICAL INFORMATION": "INDICATION",
    "REASON FOR EXAM": "INDICATION",
    "REASON FOR EXAMINATION": "INDICATION",
    "REASON FOR STUDY": "INDICATION",
    "TECHNIQUE": "TECHNIQUE",
    "EXAMINATION": "EXAMINATION",
    "EXAM": "EXAMINATION",
    "NOTIFICATION": "NOTIFICATION",
    "RECOMMENDATION": "RECOMMENDATION",
    "RECOMMENDATIONS": "RECOMMENDATION",
    "RECOMMENDATION(S)": "RECOMMENDATION",
    "WET READ": "WET READ",
}
#: Key of the text that comes before the first header (banner lines such as FINAL REPORT removed).
PREAMBLE: Final = "PREAMBLE"

# Longest spelling first so that "FINDINGS AND IMPRESSION:" is not read as "FINDINGS".
_HEADER_NAMES = sorted(SECTION_ALIASES, key=len, reverse=True)
# The look-behind lets the engine give up at once inside words, which is most positions.
_HEADER_RE = re.compile(
    r"(?<![A-Za-z])(?=["
    + "".join(sorted({c for name in _HEADER_NAMES for c in (name[0], name[0].lower())}))
    + r"])(?P<name>"
    + "|".join(re.escape(name).replace(r"\ ", r"\s+") for name in _HEADER_NAMES)
    + r")[ \t]*:",
    re.IGNORECASE,
)
# Lines that only announce the document, e.g. MIMIC's centred "FINAL REPORT".
_BANNER_RE = re.compile(r"^[ \t]*(?:FINAL\s+REPORT|PRELIMINARY\s+REPORT|ADDENDUM)[ \t]*:?[ \t]*$")
_BANNER_MULTILINE_RE = re.compile(_BANNER_RE.pattern, re.IGNORECASE | re.MULTILINE)


def parse_sections(text: str) -> dict[str, str]:
    """Split a free-text report into its sections, keyed by canonical upper-case name.

    A header is one of :data:`SECTION_ALIASES` (any case) followed by ``:``, either at the
    start of a line or inline after the end of a sentence; an upper-case header is also
    recognised in the middle of a line. Text before the first header is kept under
    ``"PREAMBLE"`` when any is left once banner lines such as "FINAL REPORT" are removed.
    A section that appears twice (e.g. "FINDINGS AND IMPRESSION" and "IMPRESSION") has its
    parts joined by a blank line; a part that repeats an earlier one verbatim is dropped.
    Section texts are stripped, line by line; their line breaks are kept. A header with
    nothing after it gives an empty string.
    """
    text = _BANNER_MULTILINE_RE.sub("", text)
    headers = [m for m in _HEADER_RE.finditer(text) if _is_header(text, m)]
    parts: dict[str, list[str]] = {}

    def add(name: str, body: str) -> None:
        # Drop the indentation of hard-wrapped lines; blank lines still separate paragraphs.
        body = "\n".join(line.strip() for line in body.strip().splitlines())
        if name == PREAMBLE and not body:
            return
        seen = parts.setdefault(name, [])
        # Some exports repeat a whole section verbatim; once is enough.
        if body and body not in seen:
            seen.append(body)

    add(PREAMBLE, text[: headers[0].start()] if headers else text)
    ends = [m.start() for m in headers[1:]] + [len(text)] if headers else []
    for header, end in zip(headers, ends, strict=True):
        name = SECTION_ALIASES[" ".join(header.group("name").upper().split())]
        add(name, text[header.end() : end])
    return {name: "\n\n".join(bodies) for name, bodies in parts.items()}


def _is_header(text: str, match: re.Match[str]) -> bool:
    line_start = text.rfind("\n", 0, match.start()) + 1
    if not text[line_start : match.start()].strip():
        return True
    # Only the last few characters matter below; slicing keeps long reports linear.
    before = text[max(line_start, match.start() - 40) : match.start()]
    # Inline: after the end of a sentence ("... normal. IMPRESSION: ...").
    if re.search(r"[.!?;:][\"')\]]*\s+$", before):
        return True
    # An upper-case header in running text is a header; "history:" mid-sentence is prose.
    name = match.group("name")
    return name.isupper() and before[-1:].isspace()


def report_body(text: str) -> str:
    """FINDINGS then IMPRESSION (joined by a blank line) when either is present, else all text.

    The whole-text fallback drops banner lines ("FINAL REPORT") and the header labels
    themselves, keeping the sections' contents in their order.
    """
    sections = parse_sections(text)
    parts = [sections[name] for name in ("FINDINGS", "IMPRESSION") if sections.get(name)]
    if parts:
        return "\n\n".join(parts)
    return "\n\n".join(body for body in sections.values() if body)


# Abbreviations whose period never ends a sentence in a report.
_ALWAYS_ABBREVIATIONS: Final[frozenset[str]] = frozenset(
    {
        "e.g",
        "i.e",
        "eg",
        "dr",
        "drs",
        "mr",
        "mrs",
        "ms",
        "prof",
        "vs",
        "approx",
        "appx",
        "st",
        "fig",
        "cf",
        "incl",
        "resp",
        "esp",
        "ca",
        "viz",
    }
)
# Abbreviations that may also close a sentence ("measures 5 cm. No effusion."): the period
# ends the sentence unless the next word starts in lower case.
_SOMETIMES_ABBREVIATIONS: Final[frozenset[str]] = frozenset(
    {"cm", "mm", "etc", "a.m", "p.m", "am", "pm", "min", "hr", "hrs", "sec", "mo", "yr", "yrs"}
)
# A run of sentence-final punctuation followed by closing quotes/brackets and then a space,
# or a period with the space forgotten between two words ("bilaterally.There"), which
# a decimal ("5.2") or an abbreviation ("e.g.", "Dr.Smith") cannot match.
_END_RE = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)|(?:(?<=[a-z]{2})|(?<=XXXX))\.(?=[A-Z][a-z])")
_ENUMERATOR_RE = re.compile(r"^\(?(\d{1,2})[.)](?=\s)")
_INLINE_ENUMERATOR_RE = re.compile(r"(?:^|(?<=\s))\(?(\d{1,2})[.)](?=\s)")
_ALNUM_RE = re.compile(r"[A-Za-z0-9]")


def split_sentences(text: str) -> list[str]:
    """Split report text into sentences with single spaces and no list numbers.

    Line breaks inside a paragraph are wrapping, not boundaries; a blank line or a line
    that starts a numbered item is a boundary. Periods of abbreviations ("Dr.", "e.g.",
    "vs.", "approx."), of decimals ("5.2 cm") and of list numbers ("1.") do not end a
    sentence; "cm."/"mm."/"etc." do when a capitalised word follows. De-identification
    tokens (IU's "XXXX", MIMIC's "___") are kept as written. Fragments without a letter
    or digit are dropped.
    """
    sentences: list[str] = []
    for paragraph in re.split(r"\n[ \t]*(?:\n|(?=\(?\d{1,2}[.)]\s))", text):
        flat = " ".join(paragraph.split())
        for chunk in _split_paragraph(flat):
            sentences.extend(_split_unpunctuated_items(chunk))
    cleaned = [_ENUMERATOR_RE.sub("", s).strip() for s in sentences]
    return [s for s in cleaned if _ALNUM_RE.search(s)]


def _split_paragraph(flat: str) -> list[str]:
    pieces: list[str] = []
    start = 0
    for end in _END_RE.finditer(flat):
        word = flat[start : end.start()].rsplit(" ", 1)[-1]
        if not _ends_sentence(word, flat[start : end.start()], flat[end.end() :]):
            continue
        pieces.append(flat[start : end.end()].strip())
        start = end.end()
    pieces.append(flat[start:].strip())
    return [p for p in pieces if p]


def _ends_sentence(word: str, sentence_so_far: str, rest: str) -> bool:
    token = word.lstrip("([\"'").lower()
    following = rest.lstrip()
    next_char = following[:1]
    if not next_char:
        return True
    if token in _ALWAYS_ABBREVIATIONS:
        return False
    if token in _SOMETIMES_ABBREVIATIONS:
        return not next_char.islower()
    if token == "no":
        # "tube no. 3" is a number; "there is no. " never happens, so split otherwise.
        return not (next_char.isdigit() or next_char == "#")
    if token.isdigit() and len(token) <= 2:
        # The number of a list item: "1. No acute disease", or "2." right after an item
        # whose period was left out ("1. No acute disease 2. Stable cardiomegaly").
        earlier = _INLINE_ENUMERATOR_RE.findall(sentence_so_far[: -len(word)])
        if sentence_so_far.strip() == word or (
            earlier
            and [int(n) for n in earlier] == list(range(int(earlier[0]), int(token)))
            and next_char.isupper()
        ):
            return False
    # Initialisms written with periods ("a.p.", "u.s.") end a sentence only before a capital.
    if "." in token and not token.endswith("."):
        return next_char.isupper() or next_char.isdigit()
    return True


def _split_unpunctuated_items(chunk: str) -> list[str]:
    """Split "1. No acute process 2. Stable cardiomegaly" where item 1's period is missing."""
    first = _ENUMERATOR_RE.match(chunk)
    if first is None:
        return [chunk]
    expected = int(first.group(1)) + 1
    pieces: list[str] = []
    rest = chunk
    while True:
        item = re.search(rf"\s\(?{expected}[.)]\s+(?=[A-Z])", rest)
        if item is None:
            pieces.append(rest)
            return pieces
        pieces.append(rest[: item.start()].strip())
        rest = rest[item.start() :].strip()
        expected += 1


def sample_sentence(report: str, rng: random.Random) -> str:
    """One sentence drawn uniformly from the report body (ConVIRT's text augmentation).

    Falls back to the whitespace-normalised body when it has no sentence. Deterministic
    for a given ``rng`` state.
    """
    body = report_body(report)
    sentences = split_sentences(body)
    if not sentences:
        return " ".join(body.split())
    return sentences[rng.randrange(len(sentences))]


@dataclass(frozen=True)
class IUReport:
    """One Open-i / IU X-ray report (``ecgen-radiology/<report_id>.xml``).

    ``uid`` ("CXR1") identifies the report and its patient (IU has one study per patient);
    ``image_ids`` are the ``parentImage`` ids ("CXR1_1_IM-0001-3001"), the image files'
    stems; ``mesh_major`` are the MeSH major terms as written ("Cardiomegaly/mild").
    Empty sections are None.
    """

    uid: str
    report_id: str
    findings: str | None
    impression: str | None
    indication: str | None
    comparison: str | None
    mesh_major: list[str] = field(default_factory=list)
    mesh_automatic: list[str] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The report as headed free text, readable by :func:`parse_sections`."""
        parts = [
            (name, value)
            for name, value in (
                ("INDICATION", self.indication),
                ("COMPARISON", self.comparison),
                ("FINDINGS", self.findings),
                ("IMPRESSION", self.impression),
            )
            if value
        ]
        return "\n".join(f"{name}: {value}" for name, value in parts)


def parse_iu_report_xml(data: bytes | str | Path) -> IUReport:
    """Parse one Open-i ``ecgen-radiology`` XML report.

    ``data`` is the XML as bytes, as text (a ``str`` starting with ``<``), or a path
    (``Path``, or any other ``str``). Documents with a DTD are refused: the real reports
    have none, and refusing them rules out entity-expansion and external-entity attacks.
    """
    source = "<xml>"
    if isinstance(data, Path) or (isinstance(data, str) and not data.lstrip().startswith("<")):
        source = str(data)
        try:
            raw = Path(data).read_bytes()
        except OSError as exc:
            raise ReportError(f"{source}: cannot read report ({exc.strerror})") from None
    else:
        raw = data.encode("utf-8") if isinstance(data, str) else data
    if re.search(rb"<!(?:DOCTYPE|ENTITY)", raw, re.IGNORECASE):
        raise ReportError(f"{source}: XML with a DTD or entities is refused")
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise ReportError(f"{source}: not well-formed XML ({exc})") from None
    if root.tag != "eCitation":
        raise ReportError(f"{source}: expected an <eCitation> report, got <{root.tag}>")

    uid = _attribute(root, "uId")
    if not uid:
        raise ReportError(f"{source}: no <uId id=...>")
    abstract: dict[str, str | None] = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").strip().upper()
        value = " ".join("".join(node.itertext()).split()) or None
        abstract[label] = value
    return IUReport(
        uid=uid,
        report_id=_attribute(root, "IUXRId") or uid.removeprefix("CXR"),
        findings=abstract.get("FINDINGS"),
        impression=abstract.get("IMPRESSION"),
        indication=abstract.get("INDICATION"),
        comparison=abstract.get("COMPARISON"),
        mesh_major=_texts(root, "MeSH/major"),
        mesh_automatic=_texts(root, "MeSH/automatic"),
        image_ids=[
            image_id
            for node in root.findall("parentImage")
            if (image_id := (node.get("id") or "").strip())
        ],
    )


def _attribute(root: ET.Element, tag: str) -> str:
    node = root.find(tag)
    return (node.get("id") or "").strip() if node is not None else ""


def _texts(root: ET.Element, path: str) -> list[str]:
    return [text for node in root.findall(path) if (text := (node.text or "").strip())]
