"""export: merge the trained adapter into the base model, one model folder for vLLM, TGI or transformers.

    python -m stages.export --adapter models/adapter --out models/merged --metrics metrics/export.json

Optional, so it lives in `export/dvc.yaml`: `dvc repro` (the root pipeline) never runs it; `dvc repro
export/dvc.yaml` does, after train if the adapter is stale. The merge is unsloth's `save_pretrained_merged`, which
adds the adapter to the base's own 16-bit weights (read from its files, also where it trained on the base in 4 bits),
so the folder loads without bitsandbytes or peft (`export.save_method: merged_16bit`, the default; `merged_4bit`
keeps the base in 4 bits, for bitsandbytes).
The base is loaded in the precision the adapter was trained in (`finetune.model.load.trained_precision`), and an
adapter of another base than `model.model_name` is refused before it loads; the tokenizer saved beside the merged
weights has the chat template the adapter was trained with (`finetune.model.load.trained_template`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from finetune.config import cli
from finetune.config.params import flatten, load, require
from finetune.data.files import write_json
from finetune.model.load import ModelConfig, load_with_adapter

log = logging.getLogger("export")

SAVE_METHODS = ("merged_16bit", "merged_4bit")


@dataclass(frozen=True)
class ExportConfig:
    save_method: str = "merged_16bit"  # unsloth's save_method: merged_16bit or merged_4bit

    def __post_init__(self) -> None:
        require(
            self.save_method in SAVE_METHODS,
            f"export.save_method must be one of {SAVE_METHODS}, got {self.save_method!r}",
        )


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(params_path: Path, adapter: Path, out: Path, metrics: Path) -> None:
    import unsloth  # noqa: F401, I001  # isort: skip  # first: it patches transformers and peft
    from unsloth.save import patch_saving_functions

    config = load(ExportConfig, params_path, "export")
    model, tokenizer, model_config = load_with_adapter(load(ModelConfig, params_path, "model"), adapter)
    log.info("config: %s", {**flatten("model", model_config), **flatten("export", config)})
    patch_saving_functions(model)  # unsloth's merged save, as get_peft_model would have attached it
    # the base's own shards are written (unsloth's merge takes no max_shard_size: it rewrites each shard of the base)
    model.save_pretrained_merged(str(out), tokenizer, save_method=config.save_method)
    shards = sorted(path.name for path in out.glob("*.safetensors"))
    require(bool(shards), f"{out}: the merge wrote no safetensors file")
    write_json(metrics, {"export_bytes": folder_bytes(out), "export_shards": len(shards)})
    log.info("merged model -> %s (%d shards), metrics -> %s", out, len(shards), metrics)


if __name__ == "__main__":
    main(
        **cli.arguments(
            __doc__, adapter="the trained adapter's folder", out="the merged model's folder", metrics="JSON"
        )
    )
