"""Report parsing and sentence sampling, on the 3,955 real IU X-ray reports and MIMIC-style text."""

from __future__ import annotations

import random
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from model.errors import ModelError
from model.inputs.reports import (
    IUReport,
    ReportError,
    parse_iu_report_xml,
    parse_sections,
    report_body,
    sample_sentence,
    split_sentences,
)


@pytest.fixture(scope="session")
def iu_xml(shared_dir: Path) -> dict[str, bytes]:
    """The raw XML of every report in the tarball, by member name."""
    archive = shared_dir / "data" / "iu-xray-reports" / "NLMCXR_reports.tgz"
    with tarfile.open(archive) as tar:
        return {
            member.name: tar.extractfile(member).read()  # type: ignore[union-attr]
            for member in tar.getmembers()
            if member.isfile() and member.name.endswith(".xml")
        }


@pytest.fixture(scope="session")
def iu_reports(iu_xml: dict[str, bytes]) -> dict[str, IUReport]:
    return {name: parse_iu_report_xml(data) for name, data in iu_xml.items()}


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_every_real_report_parses(
    iu_xml: dict[str, bytes], iu_reports: dict[str, IUReport]
) -> None:
    assert len(iu_reports) == 3955
    for name, report in iu_reports.items():
        # The file is named after the report's number: ecgen-radiology/1000.xml is CXR1000.
        assert Path(name).stem == report.report_id
        assert report.uid == f"CXR{report.report_id}"
    # Oracle: a non-empty AbstractText element in the raw XML.
    raw_findings = sum(b'<AbstractText Label="FINDINGS"' in x for x in iu_xml.values())
    filled = {
        label: sum(
            re.search(rb'<AbstractText Label="' + label + rb'">\s*[^<\s]', x) is not None
            for x in iu_xml.values()
        )
        for label in (b"FINDINGS", b"IMPRESSION")
    }
    assert raw_findings == 3955
    with_findings = sum(r.findings is not None for r in iu_reports.values())
    with_impression = sum(r.impression is not None for r in iu_reports.values())
    assert with_findings == filled[b"FINDINGS"] == 3425
    assert with_impression == filled[b"IMPRESSION"] == 3921
    empty = [
        name
        for name, x in iu_xml.items()
        if not re.search(rb'Label="(?:FINDINGS|IMPRESSION)">\s*[^<\s]', x)
    ]
    assert [n for n, r in iu_reports.items() if not (r.findings or r.impression)] == empty


def test_image_ids_and_mesh_terms_match_the_xml(
    iu_xml: dict[str, bytes], iu_reports: dict[str, IUReport]
) -> None:
    raw_images = sum(x.count(b"<parentImage id=") for x in iu_xml.values())
    assert sum(len(r.image_ids) for r in iu_reports.values()) == raw_images == 7470
    raw_majors = sum(x.count(b"<major>") for x in iu_xml.values())
    assert sum(len(r.mesh_major) for r in iu_reports.values()) == raw_majors

    first = iu_reports["ecgen-radiology/1.xml"]
    assert first.image_ids == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    assert first.mesh_major == ["normal"]
    assert first.comparison == "None."
    assert first.indication == "Positive TB test"
    assert first.impression == "Normal chest x-XXXX."
    assert first.findings is not None
    assert first.findings.startswith("The cardiac silhouette and mediastinum size")
    assert all(
        re.fullmatch(r"CXR\d+(?:_\d+)?_IM-\d+(?:-\d+)+", i)
        for r in iu_reports.values()
        for i in r.image_ids
    )


def test_report_text_round_trips_through_parse_sections(iu_reports: dict[str, IUReport]) -> None:
    checked = 0
    for report in iu_reports.values():
        if any(
            parse_sections(s or "").keys() - {"PREAMBLE"}
            for s in (report.findings, report.impression)
        ):
            continue  # a section whose own text carries headers, see the next test
        checked += 1
        sections = parse_sections(report.text)
        assert sections.get("FINDINGS") == report.findings
        assert sections.get("IMPRESSION") == report.impression
        if report.findings or report.impression:
            expected = "\n\n".join(s for s in (report.findings, report.impression) if s)
            assert report_body(report.text) == expected
    assert checked == len(iu_reports) - 1


def test_a_real_report_that_repeats_itself_inside_its_impression(
    iu_reports: dict[str, IUReport],
) -> None:
    report = iu_reports["ecgen-radiology/2415.xml"]
    assert report.impression is not None
    assert report.impression.count("IMPRESSION:") == 2
    sections = parse_sections(report.text)
    assert sections["FINDINGS"] == report.findings
    assert sections["IMPRESSION"] == report.impression.split(" IMPRESSION:")[0]
    assert sections["EXAMINATION"].startswith("CHEST 2V FRONTAL/LATERAL")


def test_sentences_of_every_real_report_are_pieces_of_its_body(
    iu_reports: dict[str, IUReport],
) -> None:
    total = 0
    for report in iu_reports.values():
        body = _flat(report_body(report.text))
        sentences = split_sentences(report_body(report.text))
        total += len(sentences)
        position = 0
        for sentence in sentences:
            assert sentence
            assert sentence == sentence.strip()
            # In order and without overlap: the splitter only cuts, it never rewrites.
            found = body.find(sentence, position)
            assert found >= 0, (report.uid, sentence)
            position = found + len(sentence)
        # De-identification tokens all survive the split.
        assert sum(s.count("XXXX") for s in sentences) == body.count("XXXX")
    assert total > 3 * len(iu_reports)


def test_no_split_inside_decimals_or_after_dr_on_real_reports(
    iu_reports: dict[str, IUReport],
) -> None:
    decimals = doctors = 0
    for report in iu_reports.values():
        body = _flat(report_body(report.text))
        sentences = split_sentences(body)
        for number in re.findall(r"\d+\.\d+ ?(?:cm|mm)", body):
            decimals += 1
            assert any(number in s for s in sentences), (report.uid, number)
        for mention in re.findall(r"Dr\. XXXX", body):
            doctors += 1
            assert any(mention in s for s in sentences), report.uid
        assert not any(s.endswith("Dr.") for s in sentences), report.uid
    # The corpus does exercise both cases.
    assert decimals > 50
    assert doctors > 5


def test_numbered_impression_of_a_real_report(iu_reports: dict[str, IUReport]) -> None:
    report = iu_reports["ecgen-radiology/1000.xml"]
    assert split_sentences(report.impression or "") == [
        "Increased opacity in the right upper lobe with XXXX associated atelectasis may "
        "represent focal consolidation or mass lesion with atelectasis.",
        "Recommend chest CT for further evaluation.",
        "XXXX opacity overlying the left 5th rib may represent focal airspace disease.",
    ]


def test_sampled_sentences_belong_to_their_report(iu_reports: dict[str, IUReport]) -> None:
    rng = random.Random(7)
    for report in iu_reports.values():
        text = report.text
        sentence = sample_sentence(text, rng)
        assert sentence or not report_body(text).strip()
        assert sentence in split_sentences(report_body(text)) or sentence == _flat(
            report_body(text)
        )


def test_sampling_is_seeded(iu_reports: dict[str, IUReport]) -> None:
    texts = [r.text for r in iu_reports.values()][:500]
    first = [sample_sentence(t, random.Random(1)) for t in texts]
    again = [sample_sentence(t, random.Random(1)) for t in texts]
    assert first == again

    def draws(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [sample_sentence(t, rng) for t in texts]

    one, two = draws(1), draws(2)
    assert one == draws(1)
    # Different seeds disagree on many multi-sentence reports, not on one by chance.
    multi = [i for i, t in enumerate(texts) if len(split_sentences(report_body(t))) > 1]
    disagree = sum(one[i] != two[i] for i in multi)
    assert disagree > len(multi) // 3


def test_sampling_is_uniform_over_sentences(iu_reports: dict[str, IUReport]) -> None:
    text = iu_reports["ecgen-radiology/1000.xml"].text
    sentences = split_sentences(report_body(text))
    assert len(sentences) == 8
    rng = random.Random(2024)
    draws = 8000
    counts = Counter(sample_sentence(text, rng) for _ in range(draws))
    assert set(counts) == set(sentences)
    expected = draws / len(sentences)
    chi_square = sum((counts[s] - expected) ** 2 / expected for s in sentences)
    # 7 degrees of freedom: the 0.1 % critical value is 24.32.
    assert chi_square < 24.32


MIMIC_STYLE = """\
                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___M with cough and fever, evaluate for pneumonia.

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 The heart is mildly enlarged. A new opacity in the right lower lobe measures
 approximately 5.2 cm, concerning for pneumonia. No pleural effusion
 or pneumothorax.  Dr. ___ was notified at 10:15 on ___ by Dr. ___.

 IMPRESSION:

 1. Right lower lobe pneumonia.
 2. Mild cardiomegaly, unchanged vs. prior study

 RECOMMENDATION(S):  Follow-up radiograph in 6 weeks.
"""


def test_mimic_style_sections() -> None:
    sections = parse_sections(MIMIC_STYLE)
    assert list(sections) == [
        "EXAMINATION",
        "INDICATION",
        "TECHNIQUE",
        "COMPARISON",
        "FINDINGS",
        "IMPRESSION",
        "RECOMMENDATION",
    ]
    assert sections["EXAMINATION"] == "CHEST (PA AND LAT)"
    assert sections["COMPARISON"] == "___"
    assert sections["FINDINGS"].startswith("The heart is mildly enlarged.")
    assert "measures\napproximately" in sections["FINDINGS"]
    assert sections["IMPRESSION"] == (
        "1. Right lower lobe pneumonia.\n2. Mild cardiomegaly, unchanged vs. prior study"
    )
    assert sections["RECOMMENDATION"] == "Follow-up radiograph in 6 weeks."
    assert "FINAL REPORT" not in "".join(sections.values())


def test_mimic_style_body_and_sentences() -> None:
    assert split_sentences(report_body(MIMIC_STYLE)) == [
        "The heart is mildly enlarged.",
        "A new opacity in the right lower lobe measures approximately 5.2 cm, "
        "concerning for pneumonia.",
        "No pleural effusion or pneumothorax.",
        "Dr. ___ was notified at 10:15 on ___ by Dr. ___.",
        "Right lower lobe pneumonia.",
        "Mild cardiomegaly, unchanged vs. prior study",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Findings: Lungs clear. Impression: Normal.",
            {"FINDINGS": "Lungs clear.", "IMPRESSION": "Normal."},
        ),
        ("FINDINGS AND IMPRESSION: No acute process.", {"IMPRESSION": "No acute process."}),
        ("Findings/Impression: Stable.", {"IMPRESSION": "Stable."}),
        ("IMPRESSIONS: A.\nCONCLUSION: B.\nSummary: A.", {"IMPRESSION": "A.\n\nB."}),
        ("Summary: Normal chest.", {"IMPRESSION": "Normal chest."}),
        ("Clinical history: cough.\nReason for exam: fever.", {"INDICATION": "cough.\n\nfever."}),
        ("History: fall. Technique: AP.", {"INDICATION": "fall.", "TECHNIQUE": "AP."}),
        ("NOTIFICATION: Called Dr. ___.", {"NOTIFICATION": "Called Dr. ___."}),
        (
            "Heart normal IMPRESSION: Nothing acute.",
            {"PREAMBLE": "Heart normal", "IMPRESSION": "Nothing acute."},
        ),
        # A lower-case header word in the middle of a sentence is prose, not a header.
        (
            "FINDINGS: Compared with the prior history: stable.",
            {"FINDINGS": "Compared with the prior history: stable."},
        ),
        ("No headers at all.", {"PREAMBLE": "No headers at all."}),
        ("", {}),
    ],
)
def test_section_headers(text: str, expected: dict[str, str]) -> None:
    assert parse_sections(text) == expected


def test_report_body_falls_back_to_the_whole_text_without_banners() -> None:
    assert report_body("FINAL REPORT\nPortable chest. Lines in place.") == (
        "Portable chest. Lines in place."
    )
    assert report_body("INDICATION: Cough.\nTECHNIQUE: PA view.") == "Cough.\n\nPA view."
    assert (
        report_body("FINDINGS: Clear.\nIMPRESSION: Normal.\nINDICATION: x") == "Clear.\n\nNormal."
    )
    assert report_body("IMPRESSION: Normal.") == "Normal."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A 5.2 cm nodule. Heart normal.", ["A 5.2 cm nodule.", "Heart normal."]),
        ("Nodule measures 12 mm. No effusion.", ["Nodule measures 12 mm.", "No effusion."]),
        ("Nodule of 12 mm. in size.", ["Nodule of 12 mm. in size."]),
        ("Seen by Dr. Smith. Stable.", ["Seen by Dr. Smith.", "Stable."]),
        ("Devices, e.g. lines, i.e. tubes. Next.", ["Devices, e.g. lines, i.e. tubes.", "Next."]),
        ("Stable vs. prior. Approx. 3 cm.", ["Stable vs. prior.", "Approx. 3 cm."]),
        ("Admitted to St. Mary. Fine.", ["Admitted to St. Mary.", "Fine."]),
        ("Chest tube no. 2 in place. Ok.", ["Chest tube no. 2 in place.", "Ok."]),
        ("Lines, tubes etc. are seen. Clear.", ["Lines, tubes etc. are seen.", "Clear."]),
        (
            "1. No acute disease. 2. Stable cardiomegaly.",
            ["No acute disease.", "Stable cardiomegaly."],
        ),
        (
            "1. No acute disease 2. Stable cardiomegaly 3. Old rib fracture",
            ["No acute disease", "Stable cardiomegaly", "Old rib fracture"],
        ),
        ("1) Clear lungs.\n2) Normal heart.", ["Clear lungs.", "Normal heart."]),
        ("Fracture of rib 5. Heart normal.", ["Fracture of rib 5.", "Heart normal."]),
        (
            "Normal chest x-XXXX. XXXX XXXX are intact.",
            ["Normal chest x-XXXX.", "XXXX XXXX are intact."],
        ),
        ("Called at ___ to Dr. ___. Ok.", ["Called at ___ to Dr. ___.", "Ok."]),
        ("The lungs are\nclear. No\neffusion.", ["The lungs are clear.", "No effusion."]),
        ("No acute process\n\nRecommend follow-up", ["No acute process", "Recommend follow-up"]),
        ("Is there effusion? No! Fine...", ["Is there effusion?", "No!", "Fine..."]),
        ("(Small effusion.) Stable.", ["(Small effusion.)", "Stable."]),
        ("Clear.  .  ... ; Heart normal.", ["Clear.", "; Heart normal."]),
        ("bilaterally.There is no effusion.", ["bilaterally.", "There is no effusion."]),
        (" . ... ", []),
        ("", []),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_sample_sentence_falls_back_to_the_body() -> None:
    rng = random.Random(0)
    assert sample_sentence("FINDINGS:   \n  ", rng) == ""
    assert sample_sentence("Portable chest", rng) == "Portable chest"


def test_iu_xml_inputs_and_refusals(iu_xml: dict[str, bytes], tmp_path: Path) -> None:
    data = iu_xml["ecgen-radiology/1.xml"]
    path = tmp_path / "1.xml"
    path.write_bytes(data)
    from_bytes = parse_iu_report_xml(data)
    assert parse_iu_report_xml(data.decode("utf-8")) == from_bytes
    assert parse_iu_report_xml(path) == from_bytes
    assert parse_iu_report_xml(str(path)) == from_bytes

    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><eCitation>&lol2;</eCitation>'
    )
    with pytest.raises(ReportError, match="DTD"):
        parse_iu_report_xml(laughs)
    with pytest.raises(ReportError, match="well-formed") as info:
        parse_iu_report_xml(data[:200])
    assert info.value.code == "invalid_report"
    assert isinstance(info.value, ModelError)
    with pytest.raises(ReportError, match="eCitation"):
        parse_iu_report_xml(b"<html/>")
    with pytest.raises(ReportError, match="uId"):
        parse_iu_report_xml(b"<eCitation/>")
    with pytest.raises(ReportError, match="cannot read"):
        parse_iu_report_xml(tmp_path / "missing.xml")
