"""The synthetic paired corpus: determinism, report/label agreement, visible findings,
the corpus and CheXpert-tree writers, and the ``convirt demo-data`` command."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from model.data.manifest import read_manifest
from model.data.synthetic import (
    FINDING_LABELS,
    Finding,
    SyntheticDataError,
    SyntheticStudy,
    chexpert_study,
    generate_corpus,
    render_study,
    write_chexpert_tree,
)
from model.labels import CHEXPERT_8X200_CATEGORIES, CHEXPERT_LABELS

# Words by which a reader (or a text encoder) recognises each finding in a report.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis",),
    "Cardiomegaly": ("cardiomegaly", "enlarged", "enlargement"),
    "Edema": ("edema",),
    "Fracture": ("fracture",),
    "Pleural Effusion": ("effusion",),
    "Pneumonia": ("pneumonia",),
    "Pneumothorax": ("pneumothorax", "pleural air", "pleural line"),
}
NEGATION = re.compile(r"^(no|there is no|there are no)\b", re.IGNORECASE)


def study(seed: int, findings: list[str | Finding] | None, size: int = 256) -> SyntheticStudy:
    return render_study(np.random.default_rng(seed), findings, size=size)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=\.)\s+", text) if s.strip()]


def sections(report: str) -> dict[str, str]:
    match = re.fullmatch(r"FINDINGS: (?P<f>.+)\n\nIMPRESSION: (?P<i>.+)", report, re.DOTALL)
    assert match, report
    return {"FINDINGS": match["f"], "IMPRESSION": match["i"]}


def mentions(sentence: str, label: str) -> bool:
    lower = sentence.lower()
    return any(word in lower for word in KEYWORDS[label])


def box_mean(img: np.ndarray, x: float, y: float, half: int) -> float:
    xi, yi = round(x), round(y)
    return float(img[yi - half : yi + half + 1, xi - half : xi + half + 1].astype(float).mean())


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_study() -> None:
    a, b = study(3, None), study(3, None)
    assert a.image.dtype == np.uint8
    assert a.image.shape == (256, 256)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.report, a.labels, a.findings) == (b.report, b.labels, b.findings)


def test_different_seeds_give_different_studies() -> None:
    a, b = study(3, []), study(4, [])
    assert a.image.tobytes() != b.image.tobytes()


def test_size_is_configurable() -> None:
    s = study(1, ["Cardiomegaly"], size=320)
    assert s.image.shape == (320, 320)
    with pytest.raises(SyntheticDataError) as err:
        study(1, [], size=10)
    assert err.value.code == "invalid_argument"


def test_corpus_is_byte_identical_and_extends_as_a_prefix(tmp_path: Path) -> None:
    first = generate_corpus(tmp_path / "a", 6, seed=4, size=64, progress=False)
    again = generate_corpus(tmp_path / "b", 6, seed=4, size=64, progress=False)
    longer = generate_corpus(tmp_path / "c", 12, seed=4, size=64, progress=False)
    assert first.read_bytes() == again.read_bytes()
    rows_first = first.read_text(encoding="utf-8").splitlines()
    rows_longer = longer.read_text(encoding="utf-8").splitlines()
    assert len(read_manifest(longer)) == 12
    # The manifest's rows and the images of the first 6 studies are those of the 6-study corpus.
    records = read_manifest(first)
    assert "\n".join(rows_longer).startswith("\n".join(rows_first))
    for record in records:
        name = record.image_path.name
        assert record.image_path.read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
        assert record.image_path.read_bytes() == (tmp_path / "c" / "images" / name).read_bytes()


def test_other_seed_gives_other_corpus(tmp_path: Path) -> None:
    a = read_manifest(generate_corpus(tmp_path / "a", 4, seed=1, size=64, progress=False))
    b = read_manifest(generate_corpus(tmp_path / "b", 4, seed=2, size=64, progress=False))
    assert [r.report for r in a] != [r.report for r in b]


# --------------------------------------------------------------------------- reports and labels


def test_reports_mention_every_present_finding_and_negate_only_absent_ones() -> None:
    phrasings: dict[str, set[str]] = defaultdict(set)
    for seed in range(150):
        s = study(seed, None, size=64)
        present = {f.label for f in s.findings}
        parts = sections(s.report)
        assert set(s.labels) == set(CHEXPERT_LABELS)
        assert set(s.labels.values()) <= {0.0, 1.0}
        assert s.labels["No Finding"] == (0.0 if present else 1.0)
        for label in FINDING_LABELS:
            assert s.labels[label] == (1.0 if label in present else 0.0), (label, s.report)
        for label in present:
            for name, text in parts.items():
                asserting = [
                    x for x in sentences(text) if mentions(x, label) and not NEGATION.match(x)
                ]
                assert asserting, f"{label} not asserted in {name}: {s.report}"
                phrasings[label].update(asserting)
        for sentence in sentences(s.report.replace("FINDINGS: ", "").replace("IMPRESSION: ", "")):
            for label in FINDING_LABELS:
                if mentions(sentence, label) and label not in present:
                    # An absent finding may only come up to be negated.
                    assert NEGATION.match(sentence), (label, sentence)
                if NEGATION.match(sentence) and label in present:
                    assert not mentions(sentence, label), (label, sentence)
    # Several phrasings per finding, so that text retrieval is not string matching.
    for label in FINDING_LABELS:
        assert len(phrasings[label]) >= 5, (label, phrasings[label])


def test_negations_appear_for_absent_findings() -> None:
    negated: Counter[str] = Counter()
    for seed in range(60):
        s = study(seed, [], size=64)
        for sentence in sentences(s.report):
            if NEGATION.match(sentence):
                negated.update(label for label in FINDING_LABELS if mentions(sentence, label))
    for label in ("Pleural Effusion", "Pneumothorax", "Pneumonia", "Edema", "Fracture"):
        assert negated[label] >= 10, negated


def test_parent_labels_follow_the_wording() -> None:
    seen_opacity = seen_consolidation = False
    for seed in range(60):
        s = study(seed, ["Pneumonia"], size=64)
        body = sections(s.report)["FINDINGS"].lower()
        assert s.labels["Pneumonia"] == 1.0
        assert s.labels["Consolidation"] == (1.0 if "consolidation" in body else 0.0)
        if "consolidation" in body:
            seen_consolidation = True
        if s.labels["Lung Opacity"] == 1.0:
            assert "opacit" in s.report.lower()
            seen_opacity = True
    assert seen_opacity
    assert seen_consolidation


def test_random_findings_cover_all_categories_with_no_finding_exclusive() -> None:
    counts: Counter[str] = Counter()
    multi = 0
    n = 250
    for seed in range(n):
        s = study(seed, None, size=64)
        labels = [f.label for f in s.findings]
        counts.update(labels or ["No Finding"])
        multi += len(labels) > 1
        positives = [name for name, value in s.labels.items() if value == 1.0]
        if not labels:
            assert positives == ["No Finding"]
    for label in CHEXPERT_8X200_CATEGORIES:
        assert counts[label] >= 15, counts
    assert 0.15 * n <= counts["No Finding"] <= 0.35 * n
    assert multi >= 12


def test_explicit_findings_are_rendered_as_given() -> None:
    f = Finding("Pneumothorax", side="left", severity="severe", location="apical")
    s = study(2, [f, "Cardiomegaly"], size=64)
    assert s.findings[1] == f
    assert s.findings[0].label == "Cardiomegaly"
    assert study(2, ["No Finding"], size=64).findings == ()
    assert "left" in sections(s.report)["FINDINGS"]


@pytest.mark.parametrize(
    ("findings", "code"),
    [
        (["Lung Lesion"], "unknown_finding"),
        (["No Finding", "Edema"], "invalid_finding"),
        (["Edema", "Edema"], "invalid_finding"),
    ],
)
def test_bad_findings_are_refused(findings: list[str], code: str) -> None:
    with pytest.raises(SyntheticDataError) as err:
        study(0, list(findings), size=64)
    assert err.value.code == code


def test_bad_finding_details_are_refused() -> None:
    with pytest.raises(SyntheticDataError) as err:
        Finding("Pneumonia", side="right", severity="moderate", location="apical")
    assert err.value.code == "invalid_finding"


# --------------------------------------------------------------------------- the image


def test_image_looks_like_a_frontal_chest_film() -> None:
    s = study(5, [])
    img = s.image.astype(float)
    masks = s.geometry.masks
    # Air outside the body is dark, lungs darker than the heart, heart bright.
    corners = np.concatenate([img[:, :6].ravel(), img[:, -6:].ravel()])
    assert corners.mean() < 30
    assert img[masks["lungs"]].mean() + 60 < img[masks["heart"]].mean()
    # The right lung (patient's right) is on the viewer's left.
    assert s.geometry.costophrenic_angles["right"][0] < s.geometry.midline_x
    assert s.geometry.costophrenic_angles["left"][0] > s.geometry.midline_x


def measured_heart_width(s: SyntheticStudy) -> int:
    """Width of the bright cardiac silhouette at the heart's level, from pixels only."""
    g = s.geometry
    row = round(g.heart_row)
    profile = s.image[row - 2 : row + 3].astype(float).mean(axis=0)
    c = round(g.midline_x)
    high = float(np.median(profile[c - 3 : c + 4]))
    left_part, right_part = profile[:c], profile[c:]
    threshold_left = (high + left_part[left_part > 15].min()) / 2
    threshold_right = (high + right_part[right_part > 15].min()) / 2
    left = c
    while left > 0 and profile[left] >= threshold_left:
        left -= 1
    right = c
    while right < len(profile) - 1 and profile[right] >= threshold_right:
        right += 1
    return right - left


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cardiomegaly_enlarges_the_measured_cardiac_silhouette(seed: int) -> None:
    normal = study(seed, [])
    mild = study(seed, [Finding("Cardiomegaly", severity="mild")])
    severe = study(seed, [Finding("Cardiomegaly", severity="severe")])
    widths = [measured_heart_width(s) for s in (normal, mild, severe)]
    thorax = normal.geometry.thorax_width
    assert widths[0] / thorax < 0.5 < widths[1] / thorax < widths[2] / thorax
    for s, width in zip((normal, mild, severe), widths, strict=True):
        assert abs(width - s.geometry.heart_width) <= 0.06 * s.geometry.heart_width


@pytest.mark.parametrize("side", ["right", "left"])
def test_effusion_fills_the_costophrenic_angle_of_its_side(side: str) -> None:
    normal = study(11, [])
    fluid = study(11, [Finding("Pleural Effusion", side=side, severity="mild")])
    other = "left" if side == "right" else "right"
    size = normal.image.shape[0]

    def angle_mean(s: SyntheticStudy, which: str) -> float:
        x, y = s.geometry.costophrenic_angles[which]
        inward = 1 if x < s.geometry.midline_x else -1
        return box_mean(s.image, x + inward * 0.06 * size, y - 0.03 * size, round(0.025 * size))

    assert angle_mean(fluid, side) > angle_mean(normal, side) + 15
    assert abs(angle_mean(fluid, other) - angle_mean(normal, other)) < 1.0


def texture(img: np.ndarray) -> np.ndarray:
    """Fine horizontal texture: a 3-pixel minus an 11-pixel running mean along each row.

    Along the row, because ribs run roughly horizontally and would otherwise dominate.
    """
    f = img.astype(float)

    def running_mean(k: int) -> np.ndarray:
        padded = np.pad(f, ((0, 0), (k // 2, k // 2)), mode="edge")
        return np.mean([padded[:, j : j + f.shape[1]] for j in range(k)], axis=0)

    return running_mean(3) - running_mean(11)


@pytest.mark.parametrize("location", ["apical", "lateral"])
def test_pneumothorax_removes_lung_markings_beyond_the_pleural_line(location: str) -> None:
    normal = study(7, [])
    ptx = study(7, [Finding("Pneumothorax", side="right", severity="moderate", location=location)])
    space = ptx.geometry.masks["Pneumothorax"]
    # Erode by a few pixels so that the pleural line and the chest wall are not counted.
    inner = space.copy()
    for axis in (0, 1):
        for shift in (-4, 4):
            inner &= np.roll(space, shift, axis=axis)
    assert inner.sum() > 200
    assert texture(ptx.image)[inner].std() < 0.85 * texture(normal.image)[inner].std()
    # No lung beyond the line: that space is darker than the aerated lung it replaced.
    assert ptx.image[inner].mean() < normal.image[inner].mean()
    # The other lung is untouched.
    left = normal.geometry.masks["lungs"] & (np.arange(256)[None, :] > normal.geometry.midline_x)
    assert np.array_equal(ptx.image[left], normal.image[left])


def test_edema_is_bilateral_and_perihilar() -> None:
    normal = study(13, [])
    edema = study(13, [Finding("Edema", side="bilateral", severity="moderate")])
    size = 256
    for side in ("right", "left"):
        hx, hy = normal.geometry.hila[side]
        outward = -1 if side == "right" else 1
        px, py = hx + outward * 0.08 * size, hy
        perihilar = box_mean(edema.image, px, py, 6) - box_mean(normal.image, px, py, 6)
        assert perihilar > 12, side
        # Bat wing: the haze fades toward the periphery.
        cx, cy = normal.geometry.costophrenic_angles[side]
        qx, qy = cx - outward * 0.03 * size, cy - 0.25 * size
        peripheral = box_mean(edema.image, qx, qy, 6) - box_mean(normal.image, qx, qy, 6)
        assert peripheral < perihilar


@pytest.mark.parametrize(("side", "zone"), [("right", "lower"), ("left", "upper")])
def test_pneumonia_raises_density_in_its_zone_only(side: str, zone: str) -> None:
    normal = study(17, [])
    pn = study(17, [Finding("Pneumonia", side=side, severity="moderate", location=zone)])
    region = pn.geometry.masks["Pneumonia"]
    assert region.sum() > 100
    assert pn.image[region].mean() > normal.image[region].mean() + 20
    ys, _ = np.nonzero(region)
    hila_y = normal.geometry.hila[side][1]
    assert (ys.mean() > hila_y) == (zone == "lower")
    other_side = np.arange(256)[None, :] > normal.geometry.midline_x + 20
    if side == "left":
        other_side = np.arange(256)[None, :] < normal.geometry.midline_x - 20
    other = normal.geometry.masks["lungs"] & other_side
    assert np.array_equal(pn.image[other], normal.image[other])


def lung_bottom(s: SyntheticStudy, x: float) -> int:
    """Lowest row of dark lung in column x, scanning up from the bright abdomen."""
    column = s.image[:, round(x) - 1 : round(x) + 2].astype(float).mean(axis=1)
    lung_level = np.percentile(column[s.geometry.masks["lungs"][:, round(x)]], 30)
    threshold = (lung_level + column[-10:].mean()) / 2
    row = len(column) - 1
    while row > 0 and column[row] >= threshold:
        row -= 1
    return row


def test_atelectasis_adds_a_linear_opacity_and_lifts_the_hemidiaphragm() -> None:
    normal = study(19, [])
    atel = study(19, [Finding("Atelectasis", side="right", severity="moderate")])
    band = atel.geometry.masks["Atelectasis"]
    assert band.sum() > 30
    assert atel.image[band].mean() > normal.image[band].mean() + 15
    x = normal.geometry.diaphragm_domes["right"][0]
    assert lung_bottom(atel, x) < lung_bottom(normal, x) - 0.02 * 256


def test_nondisplaced_fracture_is_a_gap_in_the_rib() -> None:
    normal = study(23, [])
    frac = study(
        23, [Finding("Fracture", side="right", severity="mild", location="posterior rib 6")]
    )
    ((x, y),) = frac.geometry.fracture_points
    # The lucent line across the rib: darker at the break than the intact rib was.
    assert box_mean(frac.image, x, y, 1) < box_mean(normal.image, x, y, 1) - 8
    # Nothing else moved.
    outside = ~frac.geometry.masks["Fracture"]
    assert np.array_equal(frac.image[outside], normal.image[outside])


def test_severe_fracture_displaces_three_adjacent_ribs() -> None:
    normal = study(23, [])
    frac = study(
        23, [Finding("Fracture", side="left", severity="severe", location="posterior rib 5")]
    )
    assert "5th through 7th" in frac.report
    points = frac.geometry.fracture_points
    assert len(points) == 3
    assert [p[1] for p in points] == sorted(p[1] for p in points)  # one rib below the other
    diff = np.abs(frac.image.astype(int) - normal.image.astype(int))
    for x, y in points:
        assert x > normal.geometry.midline_x
        assert box_mean(frac.image, x, y, 1) < box_mean(normal.image, x, y, 1) - 8
    # The displaced fragment changes pixels well beyond the break.
    assert (diff[~frac.geometry.masks["Fracture"]] > 10).sum() > 30


# --------------------------------------------------------------------------- corpus files


def test_corpus_has_images_manifest_and_patient_splits(tmp_path: Path) -> None:
    manifest = generate_corpus(tmp_path, 80, seed=9, size=64, progress=False)
    assert manifest == tmp_path / "manifest.csv"
    records = read_manifest(manifest)
    assert len(records) == 80
    splits_of: dict[str, set[str | None]] = defaultdict(set)
    studies_of: Counter[str] = Counter()
    for record in records:
        splits_of[record.patient_id].add(record.split)
        studies_of[record.patient_id] += 1
        with Image.open(record.image_path) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "L", (64, 64))
        assert record.view_position in ("PA", "AP")
        assert set(record.labels) == set(CHEXPERT_LABELS)
        assert record.report.startswith("FINDINGS: ")
    assert all(len(s) == 1 for s in splits_of.values())
    assert max(studies_of.values()) >= 2
    split_counts = Counter(record.split for record in records)
    assert set(split_counts) <= {"train", "validate", "test"}
    assert split_counts["train"] > split_counts["validate"] + split_counts["test"]
    assert len({r.study_id for r in records}) == 80


def test_corpus_rerun_reuses_images_and_refuses_another_seed(tmp_path: Path) -> None:
    manifest = generate_corpus(tmp_path, 5, seed=3, size=64, progress=False)
    text = manifest.read_text(encoding="utf-8")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "images").iterdir()}
    generate_corpus(tmp_path, 5, seed=3, size=64, progress=False)
    assert manifest.read_text(encoding="utf-8") == text
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "images").iterdir()} == stamps
    with pytest.raises(SyntheticDataError) as err:
        generate_corpus(tmp_path, 5, seed=4, size=64, progress=False)
    assert err.value.code == "corpus_mismatch"
    with pytest.raises(SyntheticDataError) as err:
        generate_corpus(tmp_path, 5, seed=3, size=96, progress=False)
    assert err.value.code == "corpus_mismatch"


def test_a_corpus_made_before_the_package_split_is_still_reused(tmp_path: Path) -> None:
    # The stamp a corpus carries names the generator by its import path; corpora already
    # on disk (the demo's) were stamped when the generator was a single module.
    from model.data.synthetic import GENERATOR_VERSION

    (tmp_path / "images").mkdir()
    stamp = {"generator": "model.data.synthetic", "version": GENERATOR_VERSION, "seed": 3}
    (tmp_path / "synthetic.json").write_text(json.dumps({**stamp, "size": 64}), encoding="utf-8")
    generate_corpus(tmp_path, 2, seed=3, size=64, progress=False)
    assert len(list((tmp_path / "images").iterdir())) == 2
    written = json.loads((tmp_path / "synthetic.json").read_text(encoding="utf-8"))
    assert written == {**stamp, "size": 64}


def test_every_finding_of_the_table_is_painted_and_reported() -> None:
    """A row added to the findings table needs a painter and a writer before it renders."""
    from model.data.synthetic.findings import FINDINGS

    assert sorted(kind.label for kind in FINDINGS) == sorted(FINDING_LABELS)
    for kind in FINDINGS:
        finding = Finding(kind.label, kind.sides[0], "moderate", kind.locations[0])
        rendered = study(5, [finding], size=96)
        assert rendered.labels[kind.label] == 1.0
        assert rendered.labels["No Finding"] == 0.0
        assert rendered.geometry.masks[kind.label].any(), kind.label
        findings_text = sections(rendered.report)["FINDINGS"]
        assert any(mentions(s, kind.label) for s in sentences(findings_text)), kind.label


def test_corpus_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(SyntheticDataError):
        generate_corpus(tmp_path, -1, progress=False)
    with pytest.raises(SyntheticDataError):
        generate_corpus(tmp_path, 3, splits=(0.5, 0.1, 0.1), progress=False)


# --------------------------------------------------------------------------- CheXpert tree


def protocol_subset(shared_dir: Path, tmp_path: Path, per_category: int) -> tuple[Path, Path]:
    """Small copies of the official 8x200 candidate and query CSVs: a few rows per category."""
    folder = shared_dir / "protocols" / "chexpert-8x200" / "image-retrieval"
    out: list[Path] = []
    for name, key in (("candidate.csv", None), ("query.csv", "Variable")):
        with (folder / name).open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            fields = list(reader.fieldnames or [])
            taken: Counter[str] = Counter()
            rows = []
            for row in reader:
                category = row[key] if key else next(c for c in CHEXPERT_LABELS if row[c] == "1.0")
                if taken[category] < per_category:
                    taken[category] += 1
                    rows.append(row)
        path = tmp_path / name
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        out.append(path)
    return out[0], out[1]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_chexpert_tree_renders_each_row_with_its_labels(shared_dir: Path, tmp_path: Path) -> None:
    candidate, query = protocol_subset(shared_dir, tmp_path, per_category=2)
    root = tmp_path / "chexpert"
    written = write_chexpert_tree(root, [candidate, query], seed=5, size=64)
    assert written == 16 + 16
    for row in csv_rows(candidate):
        path = root / row["Path"]
        assert path.is_file()
        labels = {name: float(row[name]) for name in CHEXPERT_LABELS}
        expected = chexpert_study(row["Path"], labels, seed=5, size=64, view_position=row["AP/PA"])
        category = next(c for c in CHEXPERT_8X200_CATEGORIES if labels[c] == 1.0)
        assert expected.labels[category] == 1.0
        for other in CHEXPERT_8X200_CATEGORIES:
            assert expected.labels[other] == (1.0 if other == category else 0.0)
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "L", (64, 64))
            pixels = np.asarray(im, dtype=float)
        # What is on disk is that study (up to JPEG loss).
        assert np.abs(pixels - expected.image).mean() < 4
    for row in csv_rows(query):
        assert (root / row["Path"]).is_file()
        s = chexpert_study(row["Path"], {row["Variable"]: 1.0}, seed=5, size=64)
        assert s.labels[row["Variable"]] == 1.0
    # Idempotent: nothing left to write.
    assert write_chexpert_tree(root, [candidate, query], seed=5, size=64) == 0


def test_chexpert_tree_refuses_paths_outside_root_and_bad_csvs(tmp_path: Path) -> None:
    escaping = tmp_path / "escape.csv"
    escaping.write_text("Variable,Path\nEdema,../../outside.jpg\n", encoding="utf-8")
    with pytest.raises(SyntheticDataError) as err:
        write_chexpert_tree(tmp_path / "root", [escaping], size=64)
    assert err.value.code == "invalid_chexpert_csv"
    assert not (tmp_path / "outside.jpg").exists()
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("Image,Label\na.jpg,1\n", encoding="utf-8")
    with pytest.raises(SyntheticDataError):
        write_chexpert_tree(tmp_path / "root", [wrong], size=64)
    bad_value = tmp_path / "bad.csv"
    bad_value.write_text("Path,Edema\na/b.jpg,yes\n", encoding="utf-8")
    with pytest.raises(SyntheticDataError):
        write_chexpert_tree(tmp_path / "root", [bad_value], size=64)


def test_studies_of_one_chexpert_patient_share_anatomy() -> None:
    a = chexpert_study("train/patient00001/study1/view1_frontal.jpg", {}, size=64)
    b = chexpert_study("train/patient00001/study2/view1_frontal.jpg", {}, size=64)
    c = chexpert_study("train/patient00002/study1/view1_frontal.jpg", {}, size=64)
    assert a.patient_id == b.patient_id == "patient00001"
    assert a.study_id == "patient00001_study1"
    ratio = a.geometry.cardiothoracic_ratio
    assert b.geometry.cardiothoracic_ratio == ratio != c.geometry.cardiothoracic_ratio


@pytest.mark.slow
def test_full_chexpert_8x200_tree(shared_dir: Path, tmp_path: Path) -> None:
    folder = shared_dir / "protocols" / "chexpert-8x200" / "image-retrieval"
    csvs = [folder / "candidate.csv", folder / "query.csv"]
    assert write_chexpert_tree(tmp_path, csvs, size=64) == 1680
    paths = [row["Path"] for csv_path in csvs for row in csv_rows(csv_path)]
    assert all((tmp_path / p).is_file() for p in paths)


# --------------------------------------------------------------------------- command line


def test_demo_data_command_end_to_end(shared_dir: Path, tmp_path: Path) -> None:
    candidate, query = protocol_subset(shared_dir, tmp_path, per_category=1)
    out, root = tmp_path / "demo", tmp_path / "chexpert"
    argv = [
        "demo-data", "--out", str(out), "--n", "7", "--seed", "2", "--size", "64",
        "--chexpert-root", str(root), "--chexpert-csv", str(candidate),
        "--chexpert-csv", str(query), "--chexpert-size", "64",
    ]  # fmt: skip
    assert main(argv) == 0
    records = read_manifest(out / "manifest.csv")
    assert len(records) == 7
    assert all(r.image_path.is_file() for r in records)
    for row in csv_rows(candidate) + csv_rows(query):
        assert (root / row["Path"]).is_file()
    before = (out / "manifest.csv").read_bytes()
    assert main(argv) == 0
    assert (out / "manifest.csv").read_bytes() == before
    # Same folder, another seed: refused with a clear exit status rather than mixed.
    assert main(["demo-data", "--out", str(out), "--n", "7", "--seed", "3", "--size", "64"]) == 2


def test_demo_data_command_needs_both_chexpert_options(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo-data", "--out", str(tmp_path), "--n", "1", "--chexpert-root", str(tmp_path)])
    assert exc.value.code == 2
