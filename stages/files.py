"""Small file helpers shared by the stages: metrics as JSON, plots as CSV, and file digests.

No MLflow here: a stage that only writes files (fetch, to_sharegpt, standardize, tokenize) depends on this module
alone, so a change to the tracking code does not rerun the data stages.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write `data` as indented, key-sorted JSON so the file diffs cleanly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """Rows as a CSV file with a header, as `dvc plots` reads them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def file_hash(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file's bytes. MD5 (the default) is the hash DVC 3 records for a file in dvc.lock and its
    cache; fetch records a source file's SHA-256, and evaluate finds the run that trained an adapter by the SHA-256
    of its weights."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()
