"""standardize: map ShareGPT turns to role/content messages with unsloth's `standardize_sharegpt`.

    python -m stages.standardize --data data/sharegpt --out data/standardized --metrics metrics/standardize.json

`{"from": "human", "value": ...}` becomes `{"role": "user", "content": ...}` and `gpt` becomes `assistant`,
the form that chat templates and TRL's `SFTTrainer` read.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from datasets import Dataset

from stages import params
from stages.params import require
from stages.tracking import write_json

log = logging.getLogger("standardize")


@dataclass(frozen=True)
class StandardizeConfig:
    aliases_for_system: list[str]  # ShareGPT role names read as "system"
    aliases_for_user: list[str]  # ... as "user"
    aliases_for_assistant: list[str]  # ... as "assistant"

    def __post_init__(self) -> None:
        for role in ("system", "user", "assistant"):
            require(bool(getattr(self, f"aliases_for_{role}")), f"standardize.aliases_for_{role} must not be empty")


def standardize(dataset: Dataset, config: StandardizeConfig) -> Dataset:
    """unsloth's `standardize_sharegpt` with this stage's role aliases."""
    from unsloth import standardize_sharegpt

    return standardize_sharegpt(dataset, **asdict(config))


def main(params_path: Path, data: Path, out: Path, metrics: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = params.load(StandardizeConfig, params_path, "standardize")
    log.info("config: %s", asdict(config))

    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "eval"):
        sharegpt = Dataset.from_parquet(str(data / f"{split}.parquet"))
        standardized = standardize(sharegpt, config)
        assert len(standardized) == len(sharegpt), f"{split}: {len(sharegpt)} in, {len(standardized)} out"
        standardized.to_parquet(out / f"{split}.parquet")
        counts |= {f"{split}_conversations_in": len(sharegpt), f"{split}_conversations": len(standardized)}
        log.info("%s: %d conversations -> %s", split, len(standardized), out / f"{split}.parquet")
    write_json(metrics, counts)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    main(args.params, args.data, args.out, args.metrics)
