"""contamination: benchmark items planted in training messages are found, whole or by a 13-word n-gram, and
nothing else is."""

from __future__ import annotations

import pyarrow as pa
import pytest

from finetune.evaluation.contamination import (
    Index,
    Lookup,
    contamination,
    distinct_messages,
    without_shared_ends,
    words,
)

LONG = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007"  # 17 words
SHORT = "Shares of the bank fell 5% on Monday."  # 8 words
FILLER = "the board reviewed the budget and the auditors signed off on the accounts for the year"


def messages(*texts: str | None) -> pa.Array:
    return pa.array(list(texts), pa.large_string())


def test_words_are_lower_case_with_punctuation_as_spaces() -> None:
    assert words(["Shares ROSE 5%.", "...", "  Société   Générale\tup ", None]).to_pylist() == [
        ["shares", "rose", "5"],
        None,
        ["société", "générale", "up"],
        None,
    ]


def test_typographic_punctuation_and_unicode_spaces_separate_words_as_ascii_ones_do() -> None:
    typographic = (
        "The company\u2019s \u201cNET\u201d profit\u00a0rose\u2009\u2014 sharply\u2026 (\u00e9t\u00e9 \u6771\u4eac)"
    )
    plain = 'the company\'s "net" profit rose - sharply... (\u00e9t\u00e9 \u6771\u4eac)'
    assert words([typographic]).to_pylist() == words([plain]).to_pylist()
    assert words([typographic]).to_pylist() == [
        ["the", "company", "s", "net", "profit", "rose", "sharply", "\u00e9t\u00e9", "\u6771\u4eac"]
    ]
    # a benchmark item copied into a training message with typographic quotes and no-break spaces is found
    index = Index([LONG], 13)
    copied = LONG.replace("'", "\u2019").replace(" ", "\u00a0")
    found = contamination(index, messages(f"{FILLER} {copied}"), processes=1)
    assert found["exact"].tolist() == [True] and found["ngram"].tolist() == [True]


def test_an_item_inside_a_message_is_found_whole_whatever_its_case_spacing_and_punctuation() -> None:
    index = Index([LONG, SHORT, "Revenue fell short of analyst estimates for the quarter, the company said today."], 13)
    planted = messages(
        f"{FILLER}. OPERATING profit rose to EUR 13.1mn ... no: {FILLER}",  # "13.1mn": one word fewer, not whole
        f"Q: what happened?\n  operating   PROFIT rose to eur 13.1 mn from eur 8.7 mn in the corresponding "
        f"period in 2007! {FILLER}",
        f"News: shares of the bank fell 5 % on Monday, {FILLER}",
    )
    found = contamination(index, planted, processes=1)
    assert found["exact"].tolist() == [True, True, False]
    assert found["ngram"].tolist() == [True, False, False]  # the short item has no 13-gram: exact only


def test_a_shared_13_word_run_is_found_and_a_12_word_one_is_not() -> None:
    item = " ".join(f"w{i}" for i in range(20))
    thirteen = " ".join(f"w{i}" for i in range(5, 18))
    twelve = " ".join(f"w{i}" for i in range(5, 17))
    index = Index([item], 13)
    assert contamination(index, messages(f"x {thirteen} y"), 1)["ngram"].tolist() == [True]
    assert contamination(index, messages(f"x {twelve} y"), 1)["ngram"].tolist() == [False]
    assert contamination(index, messages(f"x {thirteen} y"), 1)["exact"].tolist() == [False]


def test_a_match_never_spans_two_messages_or_an_unknown_word() -> None:
    index = Index([SHORT, LONG], 13)
    half = len(LONG.split()) // 2
    split_long = messages(" ".join(LONG.split()[:half]), " ".join(LONG.split()[half:]), None, "")
    split_short = messages("Shares of the bank", "fell 5% on Monday.")
    interrupted = messages(LONG.replace("EUR 8.7", "EUR unknownword 8.7"))
    for texts in (split_long, split_short, interrupted):
        found = contamination(index, texts, processes=1)
        assert not found["exact"].any() and not found["ngram"].any(), texts


def test_sharing_names_the_texts_that_hold_an_items_n_gram_and_the_items() -> None:
    index = Index([SHORT, LONG, FILLER], 13)
    twelve = " ".join(FILLER.split()[:12])
    texts = messages(None, f"x {LONG.upper()} y", "", SHORT, twelve, "", f"{LONG}. {FILLER}", None)
    holding, items = index.sharing(texts)
    assert holding.tolist() == [False, True, False, False, False, False, True, False]  # empty texts in between
    assert items.tolist() == [1, 2]  # the short item has no n-gram; 12 of the filler's words are not one


def test_the_flags_depend_on_neither_batch_size_nor_processes() -> None:
    items = [LONG, SHORT, "Net sales decreased by 4.5% in the third quarter, the company said in its statement"]
    texts = [FILLER] * 50 + [f"x {LONG} y"] + [FILLER] * 30 + [SHORT] + [FILLER] * 20
    one = contamination(Index(items, 13), messages(*texts), processes=1, batch=1000)
    for processes, batch in ((2, 7), (1, 1), (2, 1000)):
        other = contamination(Index(items, 13), messages(*texts), processes=processes, batch=batch)
        assert all((one[key] == other[key]).all() for key in one), (processes, batch)
    assert one["exact"].tolist() == [True, True, False]


def test_distinct_messages_of_conversations() -> None:
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    conversations = pa.chunked_array(
        [
            pa.array([[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]], pa.list_(turn)),
            pa.array([[{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]], pa.list_(turn)),
        ]
    )
    assert sorted(distinct_messages(conversations).to_pylist()) == ["a", "b", "q"]


def test_lookup_finds_exactly_the_members() -> None:
    import numpy as np

    targets = np.array([5, 2**63 + 9, 2**40], np.uint64)
    lookup = Lookup(targets)
    values = np.array([5, 6, 2**63 + 9, 2**40 + 1, 2**40], np.uint64)
    assert lookup(values).tolist() == [True, False, True, False, True]
    assert Lookup(np.zeros(0, np.uint64))(values).tolist() == [False] * 5


def test_an_n_gram_length_below_1_is_refused() -> None:
    with pytest.raises(ValueError, match="n-gram length must be >= 1, got 0"):
        Index([SHORT], 0)


def test_a_benchmarks_template_is_left_out_of_its_items_whole_words_only() -> None:
    flare = "Please answer the given financial question based on the context.\nContext: "
    items = [f"{flare}the bank lent more\nQuestion: why?\nAnswer:", f"{flare}the board met\nQuestion: when?\nAnswer:"]
    assert without_shared_ends(items) == ["bank lent more\nQuestion: why?", "board met\nQuestion: when?"]
    assert without_shared_ends(["$KO up", "$KA down"]) == ["$KO up", "$KA down"]  # "$K" is no whole word
    assert without_shared_ends(["Shares rose", "Shares rose"]) == ["Shares rose", "Shares rose"]  # nothing but template
    assert without_shared_ends(["Q: Did rates rise? A:", "Q: Why? A:"]) == ["Did rates rise?", "Why?"]
    assert without_shared_ends([SHORT]) == [SHORT]
    # with its template, an item shares 13 words with a message in the same template by its first two words alone
    training = messages(f"{flare}the bank sold a plant and {FILLER}")
    template = contamination(Index(items, 13), training, processes=1)
    assert template["ngram"].tolist() == [True, False]
    found = contamination(Index(without_shared_ends(items), 13), training, processes=1)
    assert found["ngram"].tolist() == [False, False] and found["exact"].tolist() == [False, False]
