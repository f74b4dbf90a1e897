"""Scores of the evaluate stage on literal examples: ROUGE-L, token F1, accuracy, macro-F1."""

from __future__ import annotations

import pytest

from finetune.evaluation.scoring import accuracy, lcs_length, macro_f1, rouge_l, token_f1, words


def test_words_drop_case_punctuation_and_articles() -> None:
    assert words("The bond's yield: 4.5%!") == ["bonds", "yield", "45"]


def test_token_f1_counts_overlapping_words() -> None:
    # 2 common words; precision 2/3, recall 2/4
    assert token_f1("yield rose sharply", "the yield rose by 3") == pytest.approx(
        2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)
    )
    assert token_f1("Yield rose.", "yield ROSE") == 1.0
    assert token_f1("nothing alike", "yield rose") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "yield") == 0.0


def test_rouge_l_rewards_order_where_token_f1_does_not() -> None:
    reference = "rates rise bonds fall"
    assert token_f1("fall bonds rise rates", reference) == 1.0
    assert rouge_l("fall bonds rise rates", reference) == pytest.approx(0.25)  # LCS of one word in four
    assert rouge_l("rates rise then bonds fall", reference) == pytest.approx(2 * 0.8 * 1.0 / 1.8)


def test_lcs_length() -> None:
    assert lcs_length("abcbdab", "bdcaba") == 4
    assert lcs_length([], ["a"]) == 0


def test_accuracy_and_macro_f1() -> None:
    expected = ["pos", "pos", "neg", "neu"]
    predicted = ["pos", "neg", "neg", "pos"]
    assert accuracy(predicted, expected) == 0.5
    # pos: 1 hit, said 2, truth 2 -> 0.5; neg: 1 hit, said 2, truth 1 -> 2/3; neu: 0
    assert macro_f1(predicted, expected, ["pos", "neg", "neu"]) == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert macro_f1(expected, expected, ["pos", "neg", "neu"]) == 1.0
