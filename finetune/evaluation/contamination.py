"""Which benchmark items appear in the training conversations: whole (exact) or by a shared long n-gram.

Both sides are normalised the same way (`words`): lower case, every run of characters that are no letter or digit
(punctuation, whitespace) one separator, so "Shares ROSE 5%." and "shares rose 5 %" are the same words. An item is
- `exact`: its whole word sequence occurs inside one training message;
- `ngram`: one of its n-word windows occurs inside one training message (an item shorter than n words: exact only).

The training side is streamed in Arrow batches, never as Python strings: each word becomes its number in the
benchmark items' own vocabulary (a word no item has cannot be part of a match), each window of words a 64-bit
polynomial hash computed for every position at once from prefix sums (`Hashed.windows`), looked up in the sorted
hashes of the items' windows. A 64-bit collision between ~10^8 training windows and ~10^5 item windows has a
chance of about 10^-6. Distinct messages only: a conversation repeats rows (`to_sharegpt.conversation_extension`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from finetune.data import parallel

P = np.uint64(0x9E3779B97F4A7C15)  # odd, so it has an inverse modulo 2^64
P_INVERSE = np.uint64(pow(int(P), -1, 2**64))
# each byte as the words see it: ASCII letters lower-cased, other ASCII bytes (punctuation, whitespace) a space;
# the bytes of other UTF-8 characters kept, so that words in any script stay words
BYTES = np.array([b if chr(b).isalnum() else 32 for b in range(128)] + list(range(128, 256)), np.uint8)
BYTES[ord("A") : ord("Z") + 1] += 32


def words(texts: pa.Array | pa.ChunkedArray | list[str]) -> pa.ListArray:
    """Each text's words, normalised (none: null): `words(["Shares ROSE 5%.", "..."])` ->
    `[["shares", "rose", "5"], None]`. One table lookup per byte (3 times as fast as a regular expression); a batch
    with other than ASCII text goes through one first, for the characters outside ASCII alone."""
    if isinstance(texts, list):
        texts = pa.array(texts, pa.large_string())
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    texts = texts.cast(pa.large_string())
    if not pc.all(pc.string_is_ascii(texts)).as_py():  # `BYTES` handles ASCII: other characters here
        # lower case, and every run of characters no letter, digit or mark a space: ’ “ ” — and the no-break space
        # separate words as ' " - and the space do (`BYTES` keeps the bytes of what is left, letters in any script)
        texts = pc.replace_substring_regex(pc.utf8_lower(texts), r"[^\x00-\x7f\p{L}\p{N}\p{M}]+", " ")
    validity, offsets, data = texts.buffers()
    mapped = BYTES[np.frombuffer(data, np.uint8)] if data is not None else np.zeros(0, np.uint8)
    spaced = pa.Array.from_buffers(
        pa.large_string(), len(texts), [validity, offsets, pa.py_buffer(mapped)], offset=texts.offset
    )
    spaced = pc.ascii_trim_whitespace(spaced)
    return pc.ascii_split_whitespace(pc.if_else(pc.equal(spaced, ""), pa.scalar(None, spaced.type), spaced))


def powers(base: np.uint64, n: int) -> np.ndarray:
    """`[1, base, base^2, ...]` modulo 2^64, `n` of them."""
    out = np.full(n, base, np.uint64)
    out[0] = 1
    return np.cumprod(out, dtype=np.uint64)


class Hashed:
    """Texts as one array of word ids (0: a word no benchmark item has), hashed so that the hash of any window of
    words is three array operations (`windows`)."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, codes: np.ndarray, inverse: np.ndarray) -> None:
        n = len(ids)
        self.prefix = np.zeros(n + 1, np.uint64)  # sum over j < i of code(ids[j]) * P^-j
        with np.errstate(over="ignore"):
            np.cumsum(codes[ids] * inverse[:n], out=self.prefix[1:])
        # the longest window of known words inside one text that starts at each position
        unknown = np.where(ids == 0, np.arange(n), n)
        next_unknown = np.minimum.accumulate(unknown[::-1])[::-1]
        self.run = np.minimum(next_unknown, np.repeat(offsets[1:], np.diff(offsets))) - np.arange(n)

    def windows(self, k: int, power: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The hash of the `k` words from every position (the same wherever those words stand) and whether the
        window lies in one text and holds known words only."""
        count = len(self.run) - k + 1
        if count <= 0:
            return np.zeros(0, np.uint64), np.zeros(0, bool)
        with np.errstate(over="ignore"):
            values = (self.prefix[k:] - self.prefix[:count]) * power[:count]
        return values, self.run[:count] >= k


class Index:
    """The benchmark items' words, hashes of their n-grams and of their whole texts: what a training batch is
    looked up in. `Index(["Shares rose 5%."], n=13)`: one item of 3 words, shorter than n: found exact only."""

    def __init__(self, items: list[str], n: int) -> None:
        if n < 1:
            raise ValueError(f"the n-gram length must be >= 1, got {n}")
        self.n = n
        lists = words(items)
        flat = pc.list_flatten(lists)
        self.vocabulary = pc.unique(flat)
        ids = np.asarray(pc.index_in(flat, value_set=self.vocabulary)).astype(np.int64) + 1
        offsets = np.asarray(lists.offsets).astype(np.int64)
        self.lengths = np.diff(offsets)
        self.codes = np.random.default_rng(0).integers(1, 2**62, len(self.vocabulary) + 1, dtype=np.uint64) * 2 + 1
        self.codes[0] = 0
        self.power, self.inverse = powers(P, len(ids) + 1), powers(P_INVERSE, len(ids) + 1)
        h = Hashed(ids, offsets, self.codes, self.inverse)
        starts = offsets[:-1]
        self.whole = np.zeros(len(items), np.uint64)  # each item's hash of all its words
        with np.errstate(over="ignore"):
            has = self.lengths > 0
            self.whole[has] = (h.prefix[offsets[1:][has]] - h.prefix[starts[has]]) * self.power[starts[has]]
        # every n-gram of every item, sorted, and which item it is from
        values, valid = h.windows(n, self.power)
        (grams,) = np.nonzero(valid)
        owner = np.searchsorted(offsets, grams, side="right") - 1
        order = np.argsort(values[grams], kind="stable")
        self.gram_hashes, self.gram_items = values[grams][order], owner[order]
        self.first_gram = np.zeros(len(items), np.uint64)  # the first n-gram of each long item
        long = self.lengths >= n
        self.first_gram[long] = values[starts[long]]
        self.short = np.nonzero(has & ~long)[0]
        self.grams = Lookup(self.gram_hashes)
        self.short_wholes = {
            int(k): Lookup(self.whole[self.short[self.lengths[self.short] == k]])
            for k in np.unique(self.lengths[self.short])
        }

    def word_ids(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """The word ids of `texts` (0: a word no item has) and each text's offsets into them."""
        lists = words(texts)
        found = pc.index_in(pc.list_flatten(lists), value_set=self.vocabulary)
        ids = np.asarray(pc.fill_null(found, -1)).astype(np.int64) + 1
        offsets = np.asarray(lists.offsets).astype(np.int64)
        return ids, offsets - offsets[0]

    def grams_in(self, texts: pa.Array) -> tuple[Hashed, np.ndarray, np.ndarray, np.ndarray]:
        """`texts` hashed, with the hash of the n-gram at each word position, the positions where an item's n-gram
        stands, and each text's offsets into the positions."""
        ids, offsets = self.word_ids(texts)
        if len(self.inverse) <= len(ids):
            self.power, self.inverse = powers(P, 2 * len(ids)), powers(P_INVERSE, 2 * len(ids))
        h = Hashed(ids, offsets, self.codes, self.inverse)
        values, valid = h.windows(self.n, self.power)
        (sites,) = np.nonzero(valid & self.grams(values))
        return h, values, sites, offsets

    def items_of(self, grams: np.ndarray) -> np.ndarray:
        """The items (sorted numbers) that hold any of the n-gram hashes `grams`."""
        found = np.unique(grams)
        lo = np.searchsorted(self.gram_hashes, found, side="left")
        hi = np.searchsorted(self.gram_hashes, found, side="right")
        items = [self.gram_items[a:b] for a, b in zip(lo, hi, strict=True)]
        return np.unique(np.concatenate(items + [np.zeros(0, int)])).astype(np.int64)

    def sharing(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Which `texts` hold an n-gram of an item (a mask), and the items whose n-grams they hold."""
        _, values, sites, offsets = self.grams_in(texts)
        holding = np.zeros(len(texts), bool)
        holding[np.searchsorted(offsets, sites, side="right") - 1] = True  # an empty text has no site
        return holding, self.items_of(values[sites])

    def search(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """The items found in `texts` (training messages): those found whole (exact), those by an n-gram."""
        h, values, sites, _ = self.grams_in(texts)
        ngram = self.items_of(values[sites])
        exact = []
        for item in ngram[self.lengths[ngram] >= self.n]:  # a long item whole: where its first n-gram stands
            k = int(self.lengths[item])
            at = sites[(values[sites] == self.first_gram[item]) & (h.run[sites] >= k)]
            with np.errstate(over="ignore"):
                if ((h.prefix[at + k] - h.prefix[at]) * self.power[at] == self.whole[item]).any():
                    exact.append(int(item))
        for k, lookup in self.short_wholes.items():  # the short items whole: every window of their length
            values, valid = h.windows(k, self.power)
            hits = np.unique(values[valid & lookup(values)])
            of_length = self.short[self.lengths[self.short] == k]
            exact += of_length[np.isin(self.whole[of_length], hits)].tolist()
        return np.array(sorted(exact), np.int64), ngram


class Lookup:
    """Membership in a fixed set of hashes: a 2^22-bit table of their top bits first, then a binary search for the
    few values that pass it. `Lookup(np.array([5, 9], np.uint64))(np.array([9, 4], np.uint64))` -> `[True, False]`."""

    def __init__(self, targets: np.ndarray) -> None:
        self.sorted = np.unique(targets)
        self.table = np.zeros(1 << 22, bool)
        self.table[self.sorted >> np.uint64(42)] = True

    def __call__(self, values: np.ndarray) -> np.ndarray:
        out = np.zeros(len(values), bool)
        if len(self.sorted) == 0:
            return out
        (passed,) = np.nonzero(self.table[values >> np.uint64(42)])
        at = np.minimum(np.searchsorted(self.sorted, values[passed]), len(self.sorted) - 1)
        out[passed[self.sorted[at] == values[passed]]] = True
        return out


def without_shared_ends(texts: list[str]) -> list[str]:
    """Each of a benchmark's texts less the whole words that every one of them opens and closes with: the
    benchmark's own template (FLARE's instruction line and "Context:", the closing "Answer:"), which would match any
    training message in the same template by its first or last words alone. A text that is template only stays.

    `without_shared_ends(["Q: Did rates rise? A:", "Q: Why? A:"])` -> `["Did rates rise?", "Why?"]`.
    """
    if len(texts) < 2:
        return texts
    opening = os.path.commonprefix(texts)
    start = len(opening) - len(re.split(r"\s", opening)[-1])  # a word cut short stays in
    closing = os.path.commonprefix([text[::-1] for text in texts])[::-1]
    end = len(closing) - len(re.split(r"\s", closing)[0])
    out = []
    for text in texts:
        kept = text[start : len(text) - end] if start + end < len(text) else ""
        out.append(kept.strip() if kept.strip() else text)
    return out


def distinct_messages(conversations: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Every distinct message text of a `conversations` column (lists of `{"role", "content"}`)."""
    return pc.unique(pc.struct_field(pc.list_flatten(conversations), "content"))  # unique first: 1/3 to copy


def _search(span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:  # in a worker process
    start, stop = span
    return parallel.STATE["index"].search(parallel.STATE["messages"].slice(start, stop - start))


def contamination(index: Index, messages: pa.Array, processes: int, batch: int = 8192) -> dict[str, np.ndarray]:
    """Flags per item, `{"exact": bool array, "ngram": bool array}`, the messages searched `batch` at a time over
    `processes` forked processes (`finetune.data.parallel`, which share the index and messages without copying them)."""
    exact, ngram = np.zeros(len(index.lengths), bool), np.zeros(len(index.lengths), bool)
    spans = [(start, min(start + batch, len(messages))) for start in range(0, len(messages), batch)]
    for found_exact, found_ngram in parallel.run(_search, spans, processes, {"index": index, "messages": messages}):
        exact[found_exact] = True
        ngram[found_ngram] = True
    return {"exact": exact, "ngram": ngram | exact & (index.lengths >= index.n)}


def training_messages(train: Path) -> pa.Array:
    """The distinct message texts of the training conversations in a parquet file (`conversations` column)."""
    return distinct_messages(pq.read_table(train, columns=["conversations"]).column("conversations"))
