"""Numeric benchmarks without a model: numbers read as FinQA reads them, the final answer's value extracted after the
reasoning block, scored within the tolerance, reported per model on every item and on the clean ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from finetune.evaluation.answers import Answer
from finetune.evaluation.benchmark_items import Benchmark
from finetune.evaluation.numbers import boxed, correct, extract, numbers, reference
from finetune.evaluation.numeric_sets import (
    numeric_metrics,
    numeric_prompts,
    numeric_samples,
    score_answers,
)
from finetune.tokens.chat import Chat, ChatConfig, split_generated


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Revenue was $1,250,000.50 in total", [1250000.5]),  # thousands separators, a dollar sign
        ("a loss of -3.5, or −2 (Unicode minus), -$4 and $-5", [-3.5, -2.0, -4.0, -5.0]),
        ("margin 12.5% then 7 % then 1.5\\%", [0.125, 0.07, 0.015]),  # percentages as fractions, LaTeX's \% too
        ("Q4 of the 10-K for 2019-2020", [10.0, 2019.0, 2020.0]),  # no number inside a word, no -2020
        ("tiny: 5e-05, .5 and 3.", [5e-05, 0.5, 3.0]),
        ("no digits at all", []),
    ],
)
def test_numbers_are_read_as_finqa_reads_them(text: str, expected: list[float]) -> None:
    assert numbers(text) == pytest.approx(expected)


def test_boxed_values_keep_their_inner_braces_and_an_unclosed_box_is_left_out() -> None:
    assert boxed(r"\boxed{\frac{1}{4}} and \boxed {2} and \boxed{3") == [r"\frac{1}{4}", "2"]


@pytest.mark.parametrize(
    ("answer", "yes_no", "expected"),
    [
        (r"So it is \boxed{12.5\%}, up from 10% a year before.", False, 0.125),  # the box beats a later number
        (r"The ratio is \boxed{\frac{3}{4}}.", False, 0.75),
        (r"Change: \boxed{-\$1,204}", False, -1204.0),
        ("Revenue rose from 100 to 113.6, a growth of 13.6%.", False, 0.136),  # no box: the last number
        ("The change was -16 million.", False, -16.0),
        ("It rose sharply.", False, None),  # no number: an extraction failure
        (r"\boxed{\text{increase}} by 4", False, None),  # a box holding no number
        ("No. Well, yes: 2012 was higher.", True, "yes"),  # a yes/no question: the last yes or no
        ("It is 5.", True, None),
        # LaTeX as the distills write numbers: a sign before \frac, {,} and \, as separators, a power of ten
        (r"\boxed{-\frac{1}{4}}", False, -0.25),
        (r"\boxed{-\dfrac{-3}{4}}", False, 0.75),
        (r"\boxed{5 - \frac{1}{4}}", False, 0.25),  # a minus between operands subtracts: its last number read
        (r"\boxed{\$1{,}234.5}", False, 1234.5),
        (r"\boxed{1\,234}", False, 1234.0),
        (r"\boxed{14.1\,\%}", False, 0.141),
        (r"\boxed{12.5 percent}", False, 0.125),
        (r"\boxed{1.2 \times 10^{3}}", False, 1200.0),
        ("about 3 × 10^−2 of it", False, 0.03),
    ],
)
def test_the_final_answer_value_is_the_last_box_else_the_last_number(answer: str, yes_no: bool, expected) -> None:
    got = extract(answer, yes_no)
    assert got == pytest.approx(expected) if isinstance(expected, float) else got == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0.26685", 0.26685), ("94.0", 94.0), ("1,234.5", 1234.5), ("14.1%", 0.141), ("$3", 3.0), ("-16", -16.0)]
    + [("Yes", "yes"), (" no ", "no"), (2.5, 2.5), (7, 7.0)]
    + [("about 3", None), ("3 and 4", None), ("", None), (float("nan"), None), (True, None), (None, None)],
)
def test_a_reference_answer_is_one_number_or_yes_no(value: object, expected: object) -> None:
    assert reference(value) == expected


def test_correct_is_within_the_relative_tolerance_bounds_included() -> None:
    assert correct(202.0, 200.0, 0.01) and correct(198.0, 200.0, 0.01)  # 1 % off, the bound itself
    assert not correct(202.01, 200.0, 0.01) and not correct(197.99, 200.0, 0.01)
    assert correct(0.1414, 0.14136, 0.01) and not correct(14.14, 0.14136, 0.01)  # % read as a fraction only
    assert correct(-16.0, -16.0, 0.0) and not correct(16.0, -16.0, 0.01)
    assert correct(0.0, 0.0, 0.01) and not correct(1e-9, 0.0, 0.01)  # a zero reference is met exactly
    assert correct("yes", "yes", 0.01) and not correct("no", "yes", 0.01) and not correct(1.0, "yes", 0.01)
    assert not correct(None, 1.0, 0.01) and not correct(None, "no", 0.01)
    # bounds whose floating-point difference lands a hair above the tolerance (1.01 - 1.0 = 0.010000000000000009)
    assert correct(1.01, 1.0, 0.01) and correct(0.99, 1.0, 0.01) and correct(1.1, 1.0, 0.1)
    assert not correct(1.0100001, 1.0, 0.01)


def test_an_answer_left_in_the_think_block_is_no_answer() -> None:
    assert split_generated("Let me add 2 and 2.\n</think>\n\nIt is \\boxed{4}.", opened=True) == (
        "Let me add 2 and 2.",
        "It is \\boxed{4}.",
    )
    reasoning, final = split_generated("Let me add 2 and 2: that is \\boxed{4}", opened=True)  # never closed
    assert final == "" and extract(final, yes_no=False) is None and "boxed{4}" in reasoning
    assert split_generated("It is 4.", opened=False) == ("", "It is 4.")  # chat.think none: no block was opened
    # chat.think none, but the distill opens a block itself and is cut short in it: its reasoning is no answer
    assert split_generated("<think>\nGrowth is 14.1%", opened=False) == ("Growth is 14.1%", "")
    assert split_generated("<think>\nr\n</think>\n\nIt is 4.", opened=False) == ("r", "It is 4.")


FINQA = Benchmark(
    name="finqa",
    instruction="Please reason step by step, and put your final answer within \\boxed{}.",
    rows=[
        {"text": "What was the change?", "answer": -16.0, "exact": False, "ngram": False},
        {"text": "What was the growth?", "answer": 0.136, "exact": False, "ngram": True},
        {"text": "Was it greater?", "answer": "yes", "exact": False, "ngram": False},
        {"text": "What was the total?", "answer": 4600.0, "exact": False, "ngram": False},
    ],
    provenance={"source": "data/benchmarks/finqa"},
    kind="numeric",
    max_new_tokens=64,
    rel_tolerance=0.01,
)


@pytest.fixture
def chat(tiny_tokenizer_dir: Path) -> Chat:
    return Chat(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), ChatConfig())


def test_numeric_metrics_per_model_on_every_and_on_the_clean_items(chat: Chat) -> None:
    texts = {
        "base": ["the total is 4600", "Growth was 13.6%", "maybe", "It was 4,600."],  # never closes its reasoning
        "tuned": ["ok\n</think>\n\n\\boxed{-16}", "</think>\n\n13.6%", "</think>\n\nNo.", "</think>\n\nIt is 4,600."],
    }
    generated = {"base": 30, "tuned": 12}  # tokens each answer took, as `answers.generate` counts them
    answers = {model: [Answer(text, generated[model], True) for text in rows] for model, rows in texts.items()}
    scored = {model: score_answers(chat, FINQA, rows) for model, rows in answers.items()}
    assert [s.value for s in scored["tuned"]] == [-16.0, pytest.approx(0.136), "no", 4600.0]
    assert [s.right for s in scored["tuned"]] == [True, True, False, True]
    assert all(s.value is None for s in scored["base"])

    def count(text: str) -> int:
        return len(chat.tokenizer(text, add_special_tokens=False)["input_ids"])

    # (reasoning, final answer) of each text: the base's never closes its reasoning, the tuned's split at </think>
    parts = {
        "base": [(text, "") for text in texts["base"]],
        "tuned": [("ok", "\\boxed{-16}"), ("", "13.6%"), ("", "No."), ("", "It is 4,600.")],
    }
    tokens = {model: [(count(think), count(final)) for think, final in pairs] for model, pairs in parts.items()}
    assert all(think > 0 for think, _ in tokens["base"]) and all(final > 0 for _, final in tokens["tuned"])
    for model, rows in scored.items():
        assert [(s.think_tokens, s.answer_tokens) for s in rows] == tokens[model], model

    metrics = numeric_metrics(FINQA, scored)
    assert (metrics["finqa_rows"], metrics["finqa_contaminated_rows"], metrics["finqa_clean_rows"]) == (4, 1, 3)
    assert metrics["finqa_tuned_accuracy"] == 0.75 and metrics["finqa_tuned_clean_accuracy"] == pytest.approx(2 / 3)
    assert metrics["finqa_base_accuracy"] == 0.0 and metrics["finqa_base_extraction_failure_rate"] == 1.0
    assert metrics["finqa_tuned_extraction_failure_rate"] == 0.0 and metrics["finqa_base_answer_tokens"] == 0.0
    for model, counts in tokens.items():  # means over the four rows, and over the clean ones (the 2nd is not)
        clean = [counts[i] for i in (0, 2, 3)]
        assert metrics[f"finqa_{model}_think_tokens"] == pytest.approx(sum(t for t, _ in counts) / 4)
        assert metrics[f"finqa_{model}_answer_tokens"] == pytest.approx(sum(a for _, a in counts) / 4)
        assert metrics[f"finqa_{model}_clean_think_tokens"] == pytest.approx(sum(t for t, _ in clean) / 3)
        assert metrics[f"finqa_{model}_clean_answer_tokens"] == pytest.approx(sum(a for _, a in clean) / 3)
    assert (metrics["finqa_base_generated_tokens"], metrics["finqa_tuned_clean_generated_tokens"]) == (30.0, 12.0)

    (first,) = numeric_samples(FINQA, answers, scored, limit=1)
    assert first == {
        "benchmark": "finqa",
        "question": "What was the change?",
        "reference": -16.0,
        "base": "the total is 4600",
        "base_value": None,
        "base_correct": False,
        "tuned": "ok\n</think>\n\n\\boxed{-16}",
        "tuned_value": -16.0,
        "tuned_correct": True,
    }


def test_a_numeric_prompt_is_the_question_after_the_instruction_and_a_long_one_is_named(chat: Chat) -> None:
    (first, *_) = numeric_prompts(chat, FINQA, max_length=512)
    question = f"{FINQA.instruction}\n\n{FINQA.rows[0]['text']}"
    assert first == chat.prompt_ids([{"role": "user", "content": question}])
    assert chat.tokenizer.decode(first).endswith("<｜Assistant｜><think>\n")  # the model reasons first
    with pytest.raises(ValueError, match=r"finqa row 1: its prompt takes \d+ tokens, more than model.max_seq_length 8"):
        numeric_prompts(chat, FINQA, max_length=8)
