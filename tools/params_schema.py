"""Write `params.schema.json`, the JSON Schema of `params.yaml`, from the configs the stages load.

    python -m tools.params_schema           # rewrite params.schema.json
    python -m tools.params_schema --check   # exit 1 if the file differs from the configs (a test runs this check)

`params.yaml` names it on its first line (`# yaml-language-server: $schema=params.schema.json`), so an editor with
a YAML language server (VS Code's YAML extension, say) completes the keys, shows each one's comment and flags an
unknown key or a wrong type as you type, before any stage runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from finetune.config.schema import config_schema
from finetune.data.cleaning import FetchConfig
from finetune.data.conversion import ToSharegptConfig
from finetune.evaluation.base_vs_tuned import EvaluateConfig
from finetune.evaluation.benchmark_sets import PRESETS, BenchmarkConfig, BenchmarksConfig
from finetune.model.load import ModelConfig
from finetune.tokens.chat import ChatConfig
from finetune.tokens.encode import TokenizeConfig
from finetune.tracking.store import TrackingConfig
from finetune.training.config import LoraConfig, TrainConfig
from stages.export import ExportConfig
from stages.standardize import StandardizeConfig

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "params.schema.json"
SECTIONS = {  # params.yaml's sections, in its order, and the config each one loads into
    "fetch": FetchConfig,
    "to_sharegpt": ToSharegptConfig,
    "standardize": StandardizeConfig,
    "tokenize": TokenizeConfig,
    "model": ModelConfig,
    "chat": ChatConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "benchmarks": BenchmarksConfig,
    "export": ExportConfig,
    "tracking": TrackingConfig,
}


def benchmark_entry() -> dict[str, Any]:
    """One entry of `benchmarks.sets`: a preset, any of whose fields it may override, or every field itself."""
    schema = config_schema(BenchmarkConfig)
    preset = {"enum": sorted(PRESETS), "description": "a published benchmark's settings; other keys override them"}
    return schema | {"properties": {"preset": preset, **schema["properties"]}, "required": []}


def params_schema() -> dict[str, Any]:
    """The schema of the whole file: every section, each with its config's keys."""
    sections = {name: config_schema(config) for name, config in SECTIONS.items()}
    sections["benchmarks"]["properties"]["sets"]["items"] = benchmark_entry()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "params.yaml of the finance DeepSeek fine-tuning pipeline",
        "description": "Written by python -m tools.params_schema from the configs the stages load; do not edit.",
        "type": "object",
        "properties": sections,
        "required": list(sections),
        "additionalProperties": False,
    }


def rendered() -> str:
    return json.dumps(params_schema(), indent=2) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if params.schema.json is not what the configs give")
    args = parser.parse_args()
    if args.check:
        if not SCHEMA_FILE.is_file() or SCHEMA_FILE.read_text(encoding="utf-8") != rendered():
            sys.exit(f"{SCHEMA_FILE.name} differs from the configs: run python -m tools.params_schema")
        return
    SCHEMA_FILE.write_text(rendered(), encoding="utf-8")
    print(f"wrote {SCHEMA_FILE}")


if __name__ == "__main__":
    main()
