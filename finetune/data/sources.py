"""Where a stage's data comes from: the Hugging Face Hub, or a local file or folder in the same schema that DVC
watches. One loader for fetch (the training dataset) and benchmarks (the label sets), each result with its
provenance: the Hub commit it resolved to, or the SHA-256 of each local file.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from finetune.config.params import require
from finetune.data.files import file_hash

LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}  # by suffix


def check_watched(path: Path, sources: tuple[Path, ...], key: str) -> None:
    """Refuse a local `path` outside the folders DVC watches for the stage (`sources`, its deps): an edit of it
    would not rerun the pipeline."""
    require(
        any(path.resolve().is_relative_to(folder.resolve()) for folder in sources),
        f"{key}: {path} is outside {', '.join(map(str, sources))}, the folders DVC watches for this stage: an edit "
        "of it would not rerun the pipeline; move it into one of them",
    )


def from_hub(dataset: str, split: str, revision: str | None, **options: Any) -> tuple[Any, dict[str, Any]]:
    """A split of a Hub dataset (`options`: `name`, `data_dir`), and its provenance: the id, the revision asked
    for and the commit it resolved to."""
    from datasets import load_dataset

    loaded = load_dataset(dataset, split=split, revision=revision, **options)
    provenance = {"source": dataset, "requested_revision": revision, "resolved_revision": resolved_revision(loaded)}
    return loaded, provenance


# a local file read again each time: datasets' cache knows a file by its path and modification time, and a file
# replaced with its time kept (cp -p, rsync -a, an unpacked archive) gave the old rows beside the new file's SHA-256
REREAD = "force_redownload"


def from_file(path: Path, text: bool = False) -> Any:
    """A local .parquet/.json/.jsonl/.csv file's rows; one that cannot be parsed is named. A CSV's cells are read as
    written: only an empty cell is null, where pandas would also read `None`, `NA`, `N/A`, `null`, `nan` ... so;
    `text`: every CSV column as text (an answer of digits stays an answer, an empty column holds nulls of text)."""
    from datasets import Features, Value, load_dataset

    options: dict[str, Any] = {}
    if path.suffix.lower() == ".csv":
        check_utf8_lines(path)
        options = {"keep_default_na": False, "na_values": [""]}
        if text:
            with path.open(encoding="utf-8-sig", newline="") as f:
                header = next(csv.reader(f), [])
            options["features"] = Features({column: Value("string") for column in header})
    try:
        return load_dataset(
            LOCAL_FORMATS[path.suffix.lower()], data_files=str(path), split="train", download_mode=REREAD, **options
        )
    except Exception as error:  # datasets wraps the parser's error; name the file, keep the cause
        cause = error.__cause__ or error
        raise ValueError(f"{path}: cannot be read as {path.suffix[1:]}: {cause}") from error


def check_utf8_lines(path: Path) -> None:
    """Refuse a text file that is not UTF-8, naming the line and the byte in it (pandas names a byte of its chunk)."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            decoded_line(path, number, raw)


def decoded_line(path: Path, number: int, raw: bytes) -> str:
    """Line `number` of `path` (its bytes `raw`) as text, or `ValueError` naming the line and the byte that is not
    UTF-8: `decoded_line(Path("a.csv"), 3, b"caf\xe9")` raises `a.csv line 3: not valid UTF-8 (invalid continuation
    byte at byte 3)`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} line {number}: not valid UTF-8 ({error.reason} at byte {error.start})") from None


def local_provenance(path: Path) -> dict[str, Any]:
    """The SHA-256 of a local file, or of each file of a folder, by path."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {"source": str(path), "sha256": {str(p): file_hash(p, "sha256") for p in files}}


def resolved_revision(dataset: Any) -> str | None:
    """The Hub commit a loaded dataset came from: the last folder of its cache path (`.../0.0.0/<commit>/...`)."""
    for cache_file in dataset.cache_files:
        for part in reversed(Path(cache_file["filename"]).parts[:-1]):
            if len(part) == 40 and all(c in "0123456789abcdef" for c in part):
                return part
    return None
