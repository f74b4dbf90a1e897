"""evaluate: answer-only scoring that padding never touches, prompts cut where the template starts the answer."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from examples import SENTIMENT, tiny_training
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from unsloth import FastLanguageModel

from demo.tiny_model import BOS
from finetune.config.params import scored_rows
from finetune.evaluation.answers import Answer, generate
from finetune.evaluation.base_vs_tuned import (
    EvaluateConfig,
    Sample,
    evaluate_models,
    held_out_samples,
)
from finetune.evaluation.benchmark_items import Benchmark
from finetune.evaluation.benchmark_sets import REASONING
from finetune.evaluation.likelihood import (
    choice_nll,
    mean_loss,
    nll_per_row,
    sequence_nll,
    shared_length,
)
from finetune.model.load import ModelConfig, load_base
from finetune.tokens.chat import IGNORE_INDEX, Chat, ChatConfig
from finetune.tokens.encode import tokenized
from finetune.training.adapter import check_finite
from finetune.training.trainer import build_trainer

pytestmark = pytest.mark.slow  # a model, unsloth, a subprocess or a server: not in make test-fast

MESSAGES = [
    {"role": "user", "content": "What is a basis point?"},
    {"role": "assistant", "content": "One hundredth of a percentage point."},
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    """The tiny model in float32: scores that must agree do to the fifth digit (bfloat16 rounds at the third)."""
    config = ModelConfig(
        model_name=str(tiny_model_dir), revision=None, max_seq_length=256, load_in_4bit=False, dtype="float32"
    )
    model, tokenizer = load_base(config)
    model = get_peft_model(model, PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def chat(model_and_tokenizer) -> Chat:
    return Chat(model_and_tokenizer[1], ChatConfig())


def test_samples_are_the_first_held_out_prompts_kept_whole(chat: Chat, caplog: pytest.LogCaptureFixture) -> None:
    long_question = [{"role": "user", "content": "Why? " * 80}, MESSAGES[1]]
    conversations = [long_question, MESSAGES, MESSAGES]
    rows = tokenized(chat, conversations, max_length=64).to_list()  # the long question is cut inside its prompt
    assert [row["row"] for row in rows] == [1, 2]  # and left with no answer token: tokenize dropped it
    rows = tokenized(chat, conversations, max_length=4096).to_list()
    rows[0] |= {"input_ids": rows[0]["input_ids"][:40]}  # as a cut inside the prompt would leave it
    with caplog.at_level(logging.WARNING, logger="finetune.evaluation.base_vs_tuned"):
        (first,) = held_out_samples(rows, conversations, limit=1)
        assert first == Sample(chat.prompt_ids(MESSAGES[:1]), MESSAGES[0]["content"], MESSAGES[1]["content"])
        assert caplog.messages == []
        assert len(held_out_samples(rows, conversations, limit=5)) == 2  # fewer than asked: said
    assert caplog.messages == ["evaluate.num_samples is 5 but only 2 held-out prompts are whole: answering 2"]
    with pytest.raises(ValueError, match="held-out conversation 1 must end with an assistant turn"):
        held_out_samples(rows, [long_question, MESSAGES[::-1]], limit=1)


def test_max_rows_above_the_held_out_rows_scores_them_all_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="finetune.config.params"):
        assert (
            scored_rows("evaluate.max_rows", 500, 100) == 100
            and scored_rows("evaluate.max_rows", 40, 40) == 40
            and caplog.messages == []
        )
        assert scored_rows("evaluate.max_rows", 40, 100) == 40
    assert caplog.messages == ["evaluate.max_rows is 100 but only 40 held-out rows were tokenized: scoring 40"]


def test_encode_scores_the_answer_as_trained_and_cuts_at_max_length(chat: Chat) -> None:
    (ids, labels), (short_ids, short_labels) = chat.encode_many([MESSAGES], 256) + chat.encode_many([MESSAGES], 12)
    assert (ids, labels) == chat.encode(MESSAGES)
    prompt = chat.prompt_ids(MESSAGES[:1])
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt) :] == ids[len(prompt) :] and labels[-1] == chat.tokenizer.eos_token_id
    assert (short_ids, short_labels) == (ids[:12], labels[:12])


def test_padding_never_enters_the_loss(model_and_tokenizer, chat: Chat) -> None:
    model, tokenizer = model_and_tokenizer
    rows = [
        chat.encode_many([[{"role": "user", "content": q}, {"role": "assistant", "content": a}]], 256)[0]
        for q, a in [("Hi", "Hello."), ("What is EBITDA, in one long sentence?", "Earnings before interest and taxes.")]
    ]
    alone = [sequence_nll(model, [row], tokenizer.pad_token_id)[0] for row in rows]
    together = sequence_nll(model, rows, tokenizer.pad_token_id)
    assert [count for _, count in together] == [count for _, count in alone]
    assert [nll for nll, _ in together] == pytest.approx([nll for nll, _ in alone], rel=1e-4)
    per_row = nll_per_row(model, rows, tokenizer.pad_token_id, max_tokens=1024)
    assert [c for _, c in per_row] == [c for _, c in together]
    assert [n for n, _ in per_row] == pytest.approx([n for n, _ in together], rel=1e-4)
    scored = mean_loss(nll_per_row(model, rows, tokenizer.pad_token_id, max_tokens=1))
    tokens, nll = sum(c for _, c in alone), sum(n for n, _ in alone)
    assert scored["tokens"] == tokens
    assert scored["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def full_choice_nll(model, pad_id: int, choices: list[tuple[list[int], list[int]]]) -> list[float]:
    """Each choice scored whole, one sequence each, on the learnt tokens after the ones all choices share."""
    shared = max(shared_length([ids for ids, _ in choices]), 1)
    masked = [(ids, [IGNORE_INDEX] * shared + labels[shared:]) for ids, labels in choices]
    return [nll for nll, _ in sequence_nll(model, masked, pad_id)]


def test_each_choice_scores_as_its_whole_sequence_with_the_prompt_run_once(model_and_tokenizer, chat: Chat) -> None:
    model, tokenizer = model_and_tokenizer
    labels = ["positive", "negative", "neutral", "mildly negative"]  # answers of different token lengths
    questions = ["Rates rose.", "Shares of the bank fell sharply after the report.", "Rates fell.", "Flat."]
    rows = [
        chat.encode_many([[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for a in labels])
        for q in questions
    ]
    expected = [full_choice_nll(model, tokenizer.pad_token_id, row) for row in rows]
    assert len({round(value, 2) for values in expected for value in values}) == 16  # the choices score apart
    for max_tokens in (1, 64, 4096):  # one row a pass, some, all of equal length together
        got = choice_nll(model, rows, max_tokens)
        assert [v for values in got for v in values] == pytest.approx([v for e in expected for v in e], rel=1e-5)
    with model.disable_adapter():  # the base model continues from its own keys and values
        base = choice_nll(model, rows, 4096)[1]
        assert base == pytest.approx(full_choice_nll(model, tokenizer.pad_token_id, rows[1]), rel=1e-5)
    assert base != pytest.approx(expected[1], rel=1e-3)
    assert shared_length([[1, 2, 3], [1, 2, 4], [1, 5]]) == 1
    with pytest.raises(ValueError, match="row 0: expected two or more different choices"):
        choice_nll(model, [[rows[0][0], rows[0][0]]], 4096)


def test_disabling_the_adapter_changes_the_score(model_and_tokenizer, chat: Chat) -> None:
    model, tokenizer = model_and_tokenizer
    rows = chat.encode_many([MESSAGES], 256)
    with model.disable_adapter():
        base = mean_loss(nll_per_row(model, rows, tokenizer.pad_token_id, max_tokens=1))
    tuned = mean_loss(nll_per_row(model, rows, tokenizer.pad_token_id, max_tokens=1))
    assert base["tokens"] == tuned["tokens"] and base["loss"] != tuned["loss"]


def test_generate_answers_each_prompt_greedily_and_tells_whether_it_ended(model_and_tokenizer, chat: Chat) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = [chat.prompt_ids(MESSAGES[:1]), chat.prompt_ids([{"role": "user", "content": "Define beta."}])]
    assert tokenizer.decode(prompts[1]) == f"{BOS}<｜User｜>Define beta.<｜Assistant｜><think>\n"
    first = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    for prompt, answer in zip(prompts, first, strict=True):  # each the argmax token after token, up to EOS
        ids = list(prompt)
        while len(ids) < len(prompt) + 5 and tokenizer.eos_token_id not in ids[len(prompt) :]:
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        new = ids[len(prompt) :]
        ended = new[-1] == tokenizer.eos_token_id
        assert answer == Answer(tokenizer.decode(new[:-1] if ended else new), len(new), ended)
    assert generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=2) == first
    assert generate(model, tokenizer, prompts, max_new_tokens=5, batch_tokens=1) == first  # one prompt a batch
    with pytest.raises(ValueError, match="give batch_size or batch_tokens, one of them: got 2 and 64"):
        generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=2, batch_tokens=64)
    assert generate(model, tokenizer, [], max_new_tokens=5, batch_size=2) == []


MOVES = {"rose": "positive", "fell": "negative", "held": "neutral"}
# a numeric benchmark on the same firms: the answer, a number written three ways, follows the verb too
NUMERIC = Benchmark(
    name="moves",
    instruction=REASONING,
    rows=[],
    provenance={"source": "data/benchmarks/moves"},
    kind="numeric",
    max_new_tokens=24,
    rel_tolerance=0.01,
)
AMOUNTS = {
    "rose": ("It rose by 12.5%.", 0.125),
    "fell": ("It fell by 1,250.", 1250.0),
    "held": ("It held at -3.", -3.0),
}
MARGIN = 0.5  # tuned accuracy over base accuracy, on each benchmark: learnt, not noise (shuffled answers fall short)


def sentiment_question(firm: int, move: str) -> str:
    return f"{SENTIMENT.instruction}\n\nShares of firm {firm} {move}."


def numeric_text(firm: int, move: str) -> str:
    return f"How much did shares of firm {firm} move? They {move}."


def toy_rows(firms: range) -> list[list[dict[str, str]]]:
    """A learnable task: every definition gets the same answer; sentiment and the numeric answer follow the verb."""
    rows = []
    for firm in firms:
        rows.append([{"role": "user", "content": f"Define term {firm}."}, {"role": "assistant", "content": TOY_ANSWER}])
        for move, label in MOVES.items():
            numeric = f"{NUMERIC.instruction}\n\n{numeric_text(firm, move)}"
            for question, answer in ((sentiment_question(firm, move), label), (numeric, AMOUNTS[move][0])):
                rows.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return rows


TOY_ANSWER = "It is a finance term."


def test_tuning_on_a_learnable_task_beats_the_base_model_on_every_measure(
    tiny_model_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    config = ModelConfig(
        model_name=str(tiny_model_dir), revision=None, max_seq_length=256, load_in_4bit=True, dtype=None
    )
    model, tokenizer = load_base(config)
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # room for three tasks
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=every)
    train = tiny_training(per_device_train_batch_size=8, max_steps=100, logging_steps=10)
    chat = Chat(tokenizer, ChatConfig())
    data = tokenized(chat, toy_rows(range(0, 60)), config.max_seq_length)  # 420 conversations, ~2 epochs
    build_trainer(model, tokenizer, data, config, train, tmp_path / "out").train()
    FastLanguageModel.for_inference(model)

    # both benchmarks on firms never seen in training, the first two marked as found in the training data
    firms = [(firm, move, firm < 102) for firm in range(100, 110) for move in MOVES]
    sentiment = replace(
        SENTIMENT,
        rows=[
            {"text": f"Shares of firm {firm} {move}.", "label": MOVES[move], "exact": seen, "ngram": False}
            for firm, move, seen in firms
        ],
    )
    numeric = replace(
        NUMERIC,
        rows=[
            {"text": numeric_text(firm, move), "answer": AMOUNTS[move][1], "exact": seen, "ngram": False}
            for firm, move, seen in firms
        ],
    )
    # firms never seen in training
    held_out = [row for row in toy_rows(range(100, 108)) if row[1]["content"] == TOY_ANSWER]
    settings = EvaluateConfig(
        max_rows=None,
        batch_tokens=1024,
        num_samples=8,
        max_new_tokens=16,
        generate_batch_size=4,
        benchmark_batch_tokens=1024,
    )
    rows = tokenized(chat, held_out, config.max_seq_length).to_list()
    encoded = [(row["input_ids"], row["labels"]) for row in rows]
    metrics, answered, numeric_answered = evaluate_models(
        model, chat, encoded, held_out_samples(rows, held_out, 8), [sentiment, numeric], settings, max_length=256
    )

    assert metrics["tuned_loss"] < 0.5 * metrics["base_loss"], metrics
    assert metrics["tuned_rouge_l"] > metrics["base_rouge_l"] + 0.5, ([s["tuned"] for s in answered], metrics)
    assert metrics["tuned_token_f1"] > metrics["base_token_f1"] + 0.5, answered
    assert metrics["tuned_eos_rate"] > metrics["base_eos_rate"], answered
    assert len(answered) == 8 and answered[0]["reference"] == TOY_ANSWER
    for name in ("sentiment", "moves"):
        assert metrics[f"{name}_rows"] == 30 and metrics[f"{name}_contaminated_rows"] == 6, metrics
        for measure in ("accuracy", "clean_accuracy"):
            tuned, base = metrics[f"{name}_tuned_{measure}"], metrics[f"{name}_base_{measure}"]
            assert tuned >= base + MARGIN, (name, measure, metrics, numeric_answered)
    assert metrics["sentiment_tuned_macro_f1"] >= metrics["sentiment_base_macro_f1"] + MARGIN, metrics
    # the tuned model closes the think block at once, as trained; the random base never does: no number to read
    assert metrics["moves_tuned_extraction_failure_rate"] < metrics["moves_base_extraction_failure_rate"], metrics
    assert metrics["moves_tuned_think_tokens"] == 0 < metrics["moves_base_think_tokens"], metrics
    assert len(numeric_answered) == 8 and numeric_answered[0]["reference"] == 0.125 and numeric_answered[0]["tuned"]


def test_an_adapter_with_non_finite_weights_is_refused(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    weights = {"base.lora_A.weight": torch.ones(2, 4), "base.lora_B.weight": torch.zeros(4, 2)}
    save_file(weights, tmp_path / "adapter_model.safetensors")
    check_finite(tmp_path)  # finite: accepted
    weights["base.lora_B.weight"][1, 0] = float("nan")
    save_file(weights, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="base.lora_B.weight holds NaN or infinite values"):
        check_finite(tmp_path)
