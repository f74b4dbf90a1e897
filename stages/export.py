"""export: merge the trained adapter into the base model, one 16-bit model folder for vLLM, TGI or transformers.

    python -m stages.export --adapter models/adapter --out models/merged --metrics metrics/export.json

Optional, so it lives in `export/dvc.yaml`: `dvc repro` (the root pipeline) never runs it; `dvc repro
export/dvc.yaml` does, after train if the adapter is stale. The merge is unsloth's `save_pretrained_merged`, which
dequantizes a 4-bit base to 16 bits before adding the adapter, so the folder loads without bitsandbytes or peft.
The base is loaded in the precision the adapter was trained in (`stages.model.trained_precision`).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from stages import params
from stages.files import write_json
from stages.model import ModelConfig, load_base, trained_precision
from stages.params import require

log = logging.getLogger("export")

SAVE_METHODS = ("merged_16bit", "merged_4bit")


@dataclass(frozen=True)
class ExportConfig:
    save_method: str = "merged_16bit"  # unsloth's save_method: merged_16bit or merged_4bit
    max_shard_size: str = "5GB"  # largest safetensors file written

    def __post_init__(self) -> None:
        require(
            self.save_method in SAVE_METHODS,
            f"export.save_method must be one of {SAVE_METHODS}, got {self.save_method!r}",
        )


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(params_path: Path, adapter: Path, out: Path, metrics: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import unsloth  # noqa: F401, I001  # isort: skip  # first: it patches transformers and peft
    from peft import PeftModel
    from unsloth.save import patch_saving_functions

    model_config = trained_precision(params.load(ModelConfig, params_path, "model"), adapter)
    config = params.load(ExportConfig, params_path, "export")
    log.info("config: %s", {**params.flatten("model", model_config), **params.flatten("export", config)})

    model, tokenizer = load_base(model_config)
    model = PeftModel.from_pretrained(model, str(adapter))
    patch_saving_functions(model)  # unsloth's merged save, as get_peft_model would have attached it
    model.save_pretrained_merged(
        str(out), tokenizer, save_method=config.save_method, max_shard_size=config.max_shard_size
    )
    shards = sorted(path.name for path in out.glob("*.safetensors"))
    require(bool(shards), f"{out}: the merge wrote no safetensors file")
    write_json(metrics, {"export_bytes": folder_bytes(out), "export_shards": len(shards)})
    log.info("merged model -> %s (%d shards), metrics -> %s", out, len(shards), metrics)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    main(args.params, args.adapter, args.out, args.metrics)
