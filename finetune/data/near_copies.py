"""How fetch tells that a row copies another, near enough: texts compared after normalising them, and training rows
that share a long run of words with a held-out answer.

Scraped instruction data repeats rows with a trailing space or newline, a doubled space, a tab or a no-break space
added; to a model they are the same row. `normalised` is the text fetch compares, never the text it writes: Unicode
NFKC (a no-break space becomes a space, "ﬁ" "fi"), then every run of whitespace one space, and none at either end.
`text_digests` gives each text's digest in that form without writing the normalised copies out: the texts that are
printable ASCII with single inner spaces already are their normalised form and are digested as they are.

A training row can also hold a held-out answer inside a longer text, or reworded in places. `sharing_answers` finds
the training rows with a run of `n` words of a held-out answer, with the benchmarks' contamination check
(`finetune.evaluation.contamination`), the held-out answers its items, on every core.
"""

from __future__ import annotations

import hashlib
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finetune.data import parallel
from finetune.evaluation.contamination import Index

# a text that matches none of these is its own normalised form: a byte outside printable ASCII (whitespace other than
# the space, or any non-ASCII character, which NFKC may change), a doubled space, a space at either end
NOT_NORMALISED = r"[^ -~]|  |^ | $"
ROWS_PER_SEARCH = 4096  # training rows a worker searches at once (their three texts): ~50 MB of word arrays


def normalised(text: str) -> str:
    """A text as fetch compares it: NFKC, each run of whitespace (`str.isspace`) one space, none at the ends.

    `normalised("\\tThe ﬁrm\\u00a0 grew.\\n")` -> `"The firm grew."`
    """
    return " ".join(unicodedata.normalize("NFKC", text).split())


def text_digests(cells: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The 128-bit BLAKE2b digest of each text `normalised` (a null as `""`), as two uint64 columns, as
    `finetune.data.files.digests` gives them."""
    cells = pc.fill_null(cells, "").cast(pa.large_string())
    if isinstance(cells, pa.ChunkedArray):
        cells = cells.combine_chunks()
    out = np.empty((len(cells), 2), np.uint64)
    if not len(cells):
        return out
    ready = np.asarray(pc.invert(pc.match_substring_regex(cells, NOT_NORMALISED)))

    def digest(data: bytes | memoryview) -> bytes:
        return hashlib.blake2b(data, digest_size=16).digest()

    # the texts in normal form: their UTF-8 bytes straight from the Arrow buffer, no Python string made
    offsets = np.frombuffer(cells.buffers()[1], np.int64)[cells.offset : cells.offset + len(cells) + 1]
    data = memoryview(cells.buffers()[2] or b"")
    (at,) = np.nonzero(ready)
    starts, stops = offsets[at].tolist(), offsets[at + 1].tolist()
    as_is = b"".join(digest(data[a:b]) for a, b in zip(starts, stops, strict=True))
    out[at] = np.frombuffer(as_is, np.uint64).reshape(-1, 2)
    (at,) = np.nonzero(~ready)
    others = cells.take(pa.array(at)).to_pylist()
    changed = b"".join(digest(normalised(text).encode()) for text in others)
    out[at] = np.frombuffer(changed, np.uint64).reshape(-1, 2)
    return out


def _digest(span: tuple[int, int]) -> np.ndarray:  # in a worker process
    start, stop = span
    rows = parallel.STATE["texts"].slice(start, stop - start)
    return np.concatenate([text_digests(column) for column in rows.columns], axis=1)


def row_keys(texts: pa.Table, processes: int, batch: int = 65536) -> np.ndarray:
    """Each row's `text_digests`, its columns side by side (two uint64 columns per text column), on `processes`
    processes: `row_keys(table of system, user, assistant, 1)` -> an array of shape `(rows, 6)`."""
    spans = [(start, min(start + batch, len(texts))) for start in range(0, len(texts), batch)]
    parts = list(parallel.run(_digest, spans, processes, {"texts": texts}))
    return np.concatenate(parts) if parts else np.empty((0, 2 * texts.num_columns), np.uint64)


def _search(span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:  # in a worker process
    start, stop = span
    rows = parallel.STATE["texts"].slice(start, stop - start)  # in the table's order: a slice copies nothing
    searched = pa.array(parallel.STATE["searched"][start:stop])
    null = pa.scalar(None, pa.large_string())
    columns = [pc.if_else(searched, column.combine_chunks().cast(pa.large_string()), null) for column in rows.columns]
    holding, items = parallel.STATE["index"].sharing(pa.concat_arrays(columns))
    return holding.reshape(len(columns), -1).any(axis=0), items


def sharing_answers(
    texts: pa.Table, searched: np.ndarray, answers: list[str], n: int, processes: int, batch: int = ROWS_PER_SEARCH
) -> tuple[np.ndarray, np.ndarray]:
    """Which rows of `texts` (in any of its text columns; only the rows `searched`, a mask) hold a run of `n` words
    of one of `answers`, and which answers had a run found. Words as the contamination check reads them: lower
    case, punctuation as spaces.

    `texts` `[{"user": "Why?", "assistant": "So: " + A}]`, `searched=[True]`, `answers=[A]` with A of 13 words or
    more, `n=13` -> `([True], [True])`
    """
    index = Index(answers, n)
    holding, found = np.zeros(len(texts), bool), np.zeros(len(answers), bool)
    spans = [(start, min(start + batch, len(texts))) for start in range(0, len(texts), batch)]
    state = {"texts": texts, "searched": searched, "index": index}
    for (start, stop), (span_holding, items) in zip(spans, parallel.run(_search, spans, processes, state), strict=True):
        holding[start:stop] = span_holding
        found[items] = True
    return holding, found
