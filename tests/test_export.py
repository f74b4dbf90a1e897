"""export: the merged 16-bit folder computes what base + adapter compute, without peft or bitsandbytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from finetune.model.load import ModelConfig, load_base, record_precision
from stages.export import ExportConfig, main

pytestmark = pytest.mark.slow  # a model, unsloth, a subprocess or a server: not in make test-fast


@pytest.mark.parametrize("load_in_4bit", [False, True])  # the adapter trained on the base in 16 or in 4 bits
def test_the_merged_model_computes_what_the_bases_own_weights_and_the_adapter_compute(
    load_in_4bit: bool, tiny_model_dir: Path, tmp_path: Path, root: Path
) -> None:
    """unsloth's merge adds the adapter to the base's own 16-bit weights, read from its files, also for an adapter
    trained on the base in 4 bits (the usual QLoRA merge): the merged model is not the 4-bit base's rounding."""
    config = ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit=load_in_4bit, dtype=None)
    model, tokenizer = load_base(config)
    torch.manual_seed(0)
    tuned = get_peft_model(model, PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tuned.save_pretrained(tmp_path / "adapter")
    record_precision(tmp_path / "adapter", config)  # as the train stage writes it: export loads the base so
    reference = PeftModel.from_pretrained(  # the base's own weights with the adapter, through peft
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tmp_path / "adapter"
    )
    ids = torch.tensor([tokenizer("What is a basis point?")["input_ids"]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.float()
        with reference.disable_adapter():
            untuned = reference(input_ids=ids).logits.float()

    settings = yaml.safe_load((root / "params.yaml").read_text())
    settings["model"] |= {"model_name": str(tiny_model_dir), "max_seq_length": 256, "load_in_4bit": "auto"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings))
    main(tmp_path / "params.yaml", tmp_path / "adapter", tmp_path / "merged", tmp_path / "export.json")

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        logits = merged(input_ids=ids).logits.float()
    assert (expected - untuned).abs().max() > 1e-2  # the adapter matters, so the comparison can fail
    torch.testing.assert_close(logits, expected, rtol=0.0, atol=5e-2)  # 16-bit weights
    # the safetensors files written (one: the tiny model's base is one file) and the folder's bytes
    shards = list((tmp_path / "merged").glob("*.safetensors"))
    files = [path for path in (tmp_path / "merged").rglob("*") if path.is_file()]
    assert len(shards) == 1 and len(files) > len(shards)  # config and tokenizer files too
    assert json.loads((tmp_path / "export.json").read_text()) == {
        "export_shards": len(shards),
        "export_bytes": sum(path.stat().st_size for path in files),
    }


def test_an_unknown_save_method_is_named() -> None:
    with pytest.raises(ValueError, match="export.save_method must be one of"):
        ExportConfig(save_method="gguf")
