"""Load one section of `params.yaml` into a typed config, failing fast on unknown or missing keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


def read_section(params_path: Path, section: str) -> dict[str, Any]:
    """Return the mapping under `section` in the YAML file, or raise naming the file and section."""
    params = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    if not isinstance(params.get(section), dict):
        raise ValueError(f"{params_path}: section '{section}' is missing or not a mapping")
    return params[section]


def build(cls: type[C], raw: dict[str, Any], section: str) -> C:
    """Construct the dataclass `cls` from `raw`, naming `section.key` for unknown or missing keys.

    `build(LoraConfig, {"r": 8, "alpha": 1}, "lora")` raises `ValueError: lora.alpha is not a known key ...`.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{section}.{unknown[0]} is not a known key; expected one of {sorted(fields)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{section}.{missing[0]} is required")
    return cls(**raw)


def load(cls: type[C], params_path: Path, section: str) -> C:
    """`build` the config of `section` from the params file."""
    return build(cls, read_section(params_path, section), section)


def require(condition: bool, message: str) -> None:
    """Raise `ValueError(message)` unless `condition`: one line per check in a config's `__post_init__`."""
    if not condition:
        raise ValueError(message)


def flatten(section: str, config: Any) -> dict[str, Any]:
    """Flatten a config dataclass into `{"section.key": value}`, as MLflow params and `dvc exp show` name them."""
    return {f"{section}.{key}": value for key, value in dataclasses.asdict(config).items()}
