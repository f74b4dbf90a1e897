"""JSON Schema of a config dataclass, from its fields' types, defaults and comments: what `params.schema.json` is
made of (`python -m tools.params_schema`), so that an editor with a YAML language server completes and checks the
keys of `params.yaml` as the stages will.

`config_schema(ModelConfig)["properties"]["max_seq_length"]`
-> `{"type": "integer", "description": "longest sequence trained or scored, in tokens"}`
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any

# a field and its comment in a config's source: `    r: int  # adapter rank`
FIELD_COMMENT = re.compile(r"^\s+(\w+):[^#\n]*#\s*(.+)$", re.MULTILINE)


def type_schema(hint: Any) -> dict[str, Any]:
    """The schema of a field's type: `type_schema(int | None)` -> `{"type": ["integer", "null"]}`."""
    if hint is Any:
        return {}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [type_schema(member) for member in typing.get_args(hint)]
        if all(set(member) == {"type"} and isinstance(member["type"], str) for member in members):
            return {"type": [member["type"] for member in members]}
        return {"anyOf": members}
    if typing.get_origin(hint) is list:
        return {"type": "array", "items": type_schema(typing.get_args(hint)[0])}
    if typing.get_origin(hint) is dict or hint is dict:
        return {"type": "object"}
    names = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null", list: "array"}
    if hint in names:
        return {"type": names[hint]}
    if dataclasses.is_dataclass(hint):
        return config_schema(hint)
    raise TypeError(f"no JSON Schema for the type {hint!r}")


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the config's source, by name."""
    return dict(FIELD_COMMENT.findall(inspect.getsource(cls)))


def config_schema(cls: type) -> dict[str, Any]:
    """An object of the config's fields: each one's type, comment and default; required, those without a default;
    no other key allowed (the stages refuse one, naming it). A config of defaults alone may be null too: a section
    given with no keys (`tokenize:`) loads with every default."""
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    properties, required = {}, []
    for field in dataclasses.fields(cls):
        schema = type_schema(hints[field.name]) | {"description": comments.get(field.name, "")}
        if field.default is not dataclasses.MISSING:
            schema["default"] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            schema["default"] = field.default_factory()
        else:
            required.append(field.name)
        properties[field.name] = schema
    kind = "object" if required else ["object", "null"]
    return {"type": kind, "properties": properties, "required": required, "additionalProperties": False}
