"""Load one section of `params.yaml` into a typed config, failing fast on unknown or missing keys."""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")
log = logging.getLogger(__name__)


def scored_rows(key: str, available: int, asked: int) -> int:
    """How many of the `available` held-out rows are scored for the setting `key`, which asks for `asked`: all of them
    where there are fewer, said. `scored_rows("evaluate.max_rows", 500, 100)` -> `100`;
    `scored_rows("evaluate.max_rows", 40, 100)` -> `40`, with a warning."""
    if asked > available:
        log.warning("%s is %d but only %d held-out rows were tokenized: scoring %d", key, asked, available, available)
    return min(asked, available)


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML would keep the last one silently).

    `tokenize: {over_length: drop, over_length: truncate}` on line 42 of params.yaml raises
    `ValueError: params.yaml line 42: tokenize.over_length is given twice`.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        self.paths: dict[int, str] = {}  # id of each node: its key path, "" for the top level, "benchmarks.sets[0]"
        stack = [(node, "")]
        while stack:  # each node once: an alias (*name) is the node it names, and may name one that holds it
            inner, path = stack.pop()
            if id(inner) in self.paths:
                continue
            self.paths[id(inner)] = path
            if isinstance(inner, yaml.MappingNode):
                stack += [(value, joined(path, key.value)) for key, value in inner.value]
            elif isinstance(inner, yaml.SequenceNode):
                stack += [(item, f"{path}[{i}]") for i, item in enumerate(inner.value)]
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # the keys after a merge (`<<: *defaults`) override the merged ones, as YAML means
            key = self.construct_object(key_node)
            if key in seen:
                mark = key_node.start_mark
                path = joined(self.paths.get(id(node), ""), key)
                raise ValueError(f"{mark.name} line {mark.line + 1}: {path} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


def joined(path: str, key: Any) -> str:
    """The key path of `key` in the mapping at `path`: `joined("tokenize", "over_length")` -> `'tokenize.over_length'`,
    `joined("", "tokenize")` -> `'tokenize'`."""
    return f"{path}.{key}" if path else str(key)


def read_section(params_path: Path, section: str) -> dict[str, Any]:
    """Return the mapping under `section` in the YAML file, or raise naming the file and section. A section given
    with no keys (`tokenize:` alone, which YAML reads as null) is `{}`: every key takes its default."""
    with params_path.open(encoding="utf-8") as stream:  # the loader's marks then name the file
        params = yaml.load(stream, Loader=UniqueKeyLoader)
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise ValueError(f"{params_path} must be a mapping of sections, got {type(params).__name__}")
    if section not in params:
        raise ValueError(f"{params_path}: section '{section}' is missing")
    raw = {} if params[section] is None else params[section]
    if not isinstance(raw, dict):
        raise ValueError(f"{params_path}: section '{section}' must be a mapping, got {type(raw).__name__}")
    return raw


MOVED = {  # keys of earlier params.yaml files, and where they are now
    "evaluate.benchmarks": "benchmarks.sets",
    "evaluate.batch_size": "evaluate.batch_tokens",
}
REMOVED = {  # keys of earlier params.yaml files that no longer exist, and why
    "export.max_shard_size": "unsloth's merge writes the base model's own shards whatever it says",
}


def build(cls: type[C], raw: dict[str, Any], section: str) -> C:
    """Construct the dataclass `cls` from `raw`, naming `section.key` for unknown or missing keys.

    `build(LoraConfig, {"r": 8, "alpha": 1}, "lora")` raises `ValueError: lora.alpha is not a known key ...`.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{section}.{unknown[0]}"
        moved = f" (it moved to {MOVED[key]})" if key in MOVED else ""
        moved = f" (removed: {REMOVED[key]})" if key in REMOVED else moved
        raise ValueError(f"{key} is not a known key{moved}; expected one of {sorted(fields)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{section}.{missing[0]} is required")
    hints = typing.get_type_hints(cls)
    return cls(**{key: conform(value, hints[key], f"{section}.{key}") for key, value in raw.items()})


# a number as YAML 1.1 (PyYAML) leaves it text: `1e-4` (no dot), `5E-5`
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def conform(value: Any, hint: Any, key: str) -> Any:
    """`value` as the type `hint` of a config field asks for, or `ValueError` naming `key`, the value and the type.
    Where a number is asked for, an integer is taken as one, and so is text that is one (`learning_rate: 1e-4`
    reaches Python as the text "1e-4").

    `conform("1e-4", float, "train.learning_rate")` -> `0.0001`;
    `conform(4.5, int, "lora.r")` raises `ValueError: lora.r must be an integer, got 4.5 (float)`.
    """
    if hint is Any:
        return value
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        if value is None and type(None) in members:
            return None
        for member in (m for m in members if m is not type(None)):
            try:
                return conform(value, member, key)
            except ValueError:
                continue
    elif hint is float and isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        return float(value)
    elif hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    elif typing.get_origin(hint) is list and isinstance(value, list):
        (item,) = typing.get_args(hint)
        return [conform(element, item, f"{key}[{i}]") for i, element in enumerate(value)]
    elif (typing.get_origin(hint) is dict or hint is dict) and isinstance(value, dict):
        return value
    elif dataclasses.is_dataclass(hint) and isinstance(value, dict | hint):
        return value  # built, naming its own keys, by the config that holds it
    raise ValueError(f"{key} must be {described(hint)}, got {value!r} ({type(value).__name__})")


def described(hint: Any) -> str:
    """A type in the words of a params.yaml error: `described(int | None)` -> `'an integer or null'`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(described(member) for member in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list, each {described(typing.get_args(hint)[0])}"
    names = {int: "an integer", float: "a number", str: "text", bool: "true or false", type(None): "null"}
    names |= {dict: "a mapping", list: "a list"}
    if typing.get_origin(hint) is dict or hint in names:
        return names.get(hint, "a mapping")
    return "a mapping" if dataclasses.is_dataclass(hint) else f"a {getattr(hint, '__name__', hint)}"


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
