"""Where the trainer samples its sentences from (``data.text_section``)."""

from __future__ import annotations

import random

import pytest

from model.errors import ModelError
from model.inputs.reports import split_sentences
from model.training.config import load_train_config
from model.training.data import training_text

REPORT = (
    "FINDINGS: The heart size is normal. The mediastinal contours are normal. "
    "Moderate left pleural effusion. No pneumothorax.\n"
    "IMPRESSION: Moderate left pleural effusion."
)


def test_body_keeps_the_whole_report() -> None:
    assert training_text(REPORT, "body") == REPORT


def test_impression_samples_only_impression_sentences() -> None:
    text = training_text(REPORT, "impression")
    assert split_sentences(text) == ["Moderate left pleural effusion."]


def test_impression_falls_back_to_the_report_without_one() -> None:
    report = "The lungs are clear. No effusion."
    assert training_text(report, "impression") == report


def test_sampled_sentences_come_from_the_chosen_section() -> None:
    from model.inputs.reports import sample_sentence

    rng = random.Random(0)
    draws = {sample_sentence(training_text(REPORT, "impression"), rng) for _ in range(20)}
    assert draws == {"Moderate left pleural effusion."}
    body_draws = {sample_sentence(training_text(REPORT, "body"), rng) for _ in range(200)}
    assert len(body_draws) > 2


def test_unknown_section_is_refused_with_the_key_named() -> None:
    with pytest.raises(ModelError, match="text_section"):
        load_train_config("cpu-small", ["data.text_section=history"])


def test_section_override_is_read() -> None:
    config = load_train_config("cpu-small", ["data.text_section=impression"])
    assert config.data.text_section == "impression"
