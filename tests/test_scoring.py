"""Scores of the evaluate stage on literal examples: ROUGE-L, token F1, accuracy, macro-F1; a label benchmark's
scores on every row and on the clean ones; the base-vs-tuned bars."""

from __future__ import annotations

from dataclasses import replace

import pytest
from examples import SENTIMENT

from finetune.evaluation.answers import Answer, answer_scores
from finetune.evaluation.base_vs_tuned import BAR_COLUMNS, bar_rows
from finetune.evaluation.label_sets import label_metrics
from finetune.evaluation.scoring import accuracy, lcs_length, macro_f1, rouge_l, token_f1, words
from finetune.tokens.chat import split_generated


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


def test_an_answer_cut_short_in_its_reasoning_scores_nothing() -> None:
    """The base distill reasons past max_new_tokens: its reasoning, however close to the reference, is no answer."""
    reference = "Beta measures sensitivity to the market."
    cut = Answer("Okay, the user asks about beta. Beta measures sensitivity to the market", 256, False)
    done = Answer("Beta.\n</think>\n\nBeta measures sensitivity to the market.", 20, True)
    finals = [split_generated(answer.text, opened=True)[1] for answer in (cut, done)]  # chat.think empty_block
    assert finals == ["", reference]
    scores = answer_scores([cut, done], finals, [reference, reference])
    assert scores == {"rouge_l": 0.5, "token_f1": 0.5, "eos_rate": 0.5, "answer_tokens": 138.0}


def test_accuracy_and_macro_f1() -> None:
    expected = ["pos", "pos", "neg", "neu"]
    predicted = ["pos", "neg", "neg", "pos"]
    assert accuracy(predicted, expected) == 0.5
    # pos: 1 hit, said 2, truth 2 -> 0.5; neg: 1 hit, said 2, truth 1 -> 2/3; neu: 0
    assert macro_f1(predicted, expected, ["pos", "neg", "neu"]) == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert macro_f1(expected, expected, ["pos", "neg", "neu"]) == 1.0


def test_the_clean_score_leaves_the_contaminated_rows_out() -> None:
    rows = [
        {"text": "a", "label": "positive", "exact": False, "ngram": False},
        {"text": "b", "label": "negative", "exact": True, "ngram": False},
        {"text": "c", "label": "neutral", "exact": False, "ngram": True},
        {"text": "d", "label": "neutral", "exact": False, "ngram": False},
    ]
    bench = replace(SENTIMENT, rows=rows)
    metrics = label_metrics(bench, {"tuned": ["positive", "negative", "neutral", "positive"]})
    assert metrics["sentiment_rows"] == 4 and metrics["sentiment_contaminated_rows"] == 2
    assert metrics["sentiment_contaminated_share"] == 0.5 and metrics["sentiment_clean_rows"] == 2
    assert metrics["sentiment_tuned_accuracy"] == 0.75  # the memorised rows count here ...
    assert metrics["sentiment_tuned_clean_accuracy"] == 0.5  # ... and not here
    # clean: positive right, neutral called positive: F1 positive 2/3, neutral 0, negative 0
    assert metrics["sentiment_tuned_clean_macro_f1"] == pytest.approx((2 / 3) / 3)
    every_row_seen = label_metrics(replace(bench, rows=rows[1:3]), {"tuned": ["negative", "neutral"]})
    assert every_row_seen["sentiment_clean_rows"] == 0 and "sentiment_tuned_clean_accuracy" not in every_row_seen


def test_bar_rows_put_base_and_tuned_side_by_side_each_measure_in_its_panel() -> None:
    metrics = {"base_loss": 2.0, "tuned_loss": 1.5, "base_perplexity": 7.4, "tuned_perplexity": 4.5}
    metrics |= {"base_rouge_l": 0.1, "tuned_rouge_l": 0.2, "my_set_base_accuracy": 0.4, "my_set_tuned_accuracy": 0.9}
    metrics |= {"my_set_base_clean_accuracy": 0.3, "my_set_tuned_clean_accuracy": 0.6, "tuned_token_f1": 0.5}
    rows = bar_rows(metrics, ["my_set"])
    assert all(list(row) == list(BAR_COLUMNS) for row in rows)
    assert [tuple(row.values()) for row in rows] == [
        ("loss", "loss", "base", 2.0),
        ("loss", "loss", "tuned", 1.5),
        ("perplexity", "perplexity", "base", 7.4),
        ("perplexity", "perplexity", "tuned", 4.5),
        ("score", "rouge_l", "base", 0.1),
        ("score", "rouge_l", "tuned", 0.2),
        ("score", "token_f1", "tuned", 0.5),  # a measure one model lacks: its bar alone
        ("score", "my_set accuracy", "base", 0.4),
        ("score", "my_set accuracy", "tuned", 0.9),
        ("score", "my_set clean accuracy", "base", 0.3),
        ("score", "my_set clean accuracy", "tuned", 0.6),
    ]
