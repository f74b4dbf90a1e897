"""model: evaluate, export and generate load the base in the precision the adapter was trained in; no code shipped
with a model runs unless `model.trust_remote_code` says so."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from finetune.model.fit import model_shape
from finetune.model.load import (
    PRECISION_FILE,
    ModelConfig,
    linear_names,
    load_base,
    load_tokenizer,
    record_precision,
    trained_precision,
)

pytestmark = pytest.mark.slow  # a model, unsloth, a subprocess or a server: not in make test-fast

CONFIG = ModelConfig("m", None, 2048, load_in_4bit="auto", dtype=None)


@pytest.mark.parametrize("trained", [True, False])
def test_the_precision_recorded_at_training_is_the_one_loaded(tmp_path: Path, trained: bool) -> None:
    record_precision(tmp_path, ModelConfig("m", None, 2048, load_in_4bit=trained, dtype=None))
    assert (tmp_path / PRECISION_FILE).is_file()
    assert trained_precision(CONFIG, tmp_path).load_in_4bit is trained  # `auto` decided as at training
    written = ModelConfig("m", None, 2048, load_in_4bit=not trained, dtype=None)
    assert trained_precision(written, tmp_path).load_in_4bit is trained  # the adapter's, not params.yaml's


def test_an_adapter_without_a_record_needs_an_explicit_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not record the precision .* set model.load_in_4bit to true or false"):
        trained_precision(CONFIG, tmp_path)
    four_bit = ModelConfig("m", None, 2048, load_in_4bit=True, dtype=None)
    assert trained_precision(four_bit, tmp_path) == four_bit


def test_auto_is_decided_before_loading() -> None:
    with pytest.raises(ValueError, match="model.load_in_4bit must be decided before loading"):
        load_base(CONFIG)


REMOTE_CODE = """
import os, pathlib
pathlib.Path(os.environ["REMOTE_CODE_MARKER"]).write_text("the model's own code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class ShippedConfig(LlamaConfig):
    model_type = "llama"
class ShippedModel(LlamaForCausalLM):
    config_class = ShippedConfig
"""


def test_code_shipped_with_a_model_runs_only_when_trust_remote_code_is_on(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "model"  # the tiny model, with Python code of its own that its config.json points to
    shutil.copytree(tiny_model_dir, folder)
    (folder / "shipped.py").write_text(REMOTE_CODE)
    config_file = folder / "config.json"
    found = json.loads(config_file.read_text())
    shipped = {"AutoConfig": "shipped.ShippedConfig", "AutoModelForCausalLM": "shipped.ShippedModel"}
    config_file.write_text(json.dumps(found | {"auto_map": shipped}))
    marker = tmp_path / "ran"
    monkeypatch.setenv("REMOTE_CODE_MARKER", str(marker))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))

    config = ModelConfig(str(folder), None, 256, load_in_4bit=True, dtype=None)  # the default: off
    assert not config.trust_remote_code
    load_tokenizer(config), linear_names(config), model_shape(config)  # every loader of the stages
    model, _ = load_base(config)
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()

    model, _ = load_base(replace(config, trust_remote_code=True))
    assert type(model).__name__ == "ShippedModel" and marker.exists()


def test_the_grouped_decode_attention_is_unsloths_head_for_head_and_leaves_other_calls_alone() -> None:
    """The decode step's attention as unsloth calls it (one query a prompt, the cache laid out as its paged cache
    is, a left-padding mask, grouped K/V heads) gives what SDPA's own grouped-query attention gives."""
    import torch
    import unsloth  # noqa: F401
    from unsloth.models import llama

    from finetune.model.patches import grouped_decode_attention, unsloth_decode_attention

    attention, unsloth_attention = llama.scaled_dot_product_attention, unsloth_decode_attention()
    llama.scaled_dot_product_attention = unsloth_attention
    grouped_decode_attention()
    patched = llama.scaled_dot_product_attention
    try:
        assert patched is not unsloth_attention and patched.unsloth_attention is unsloth_attention
        grouped_decode_attention()
        assert llama.scaled_dot_product_attention is patched  # applied once
        torch.manual_seed(0)
        batch, heads, kv_heads, length, dim = 3, 8, 2, 11, 16
        query = torch.randn(batch, 1, heads, dim).transpose(1, 2)  # as unsloth's Qn: a transposed view
        cache = torch.randn(2, length, batch, kv_heads, dim)  # its paged K and V: (length, batch, heads, dim)
        key, value = cache[0].permute(1, 2, 0, 3), cache[1].permute(1, 2, 0, 3)
        mask = torch.arange(length)[None, :] >= torch.tensor([0, 4, 7])[:, None]  # left padding of 0, 4, 7
        mask = mask[:, None, None, :]
        expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
        got = patched(query, key, value, attn_mask=mask, is_causal=False, enable_gqa=True)
        assert got.shape == (batch, heads, 1, dim)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # a prefill (several queries) and a causal call go to unsloth's as they came
        prefill = torch.randn(batch, heads, 4, dim)
        keys = torch.randn(batch, kv_heads, 4, dim)
        torch.testing.assert_close(
            patched(prefill, keys, keys, is_causal=True, enable_gqa=True),
            unsloth_attention(prefill, keys, keys, is_causal=True, enable_gqa=True),
        )
        with pytest.raises(ValueError, match="is_causal must be False"):
            patched(query, key, value, is_causal=True, enable_gqa=True)
    finally:
        llama.scaled_dot_product_attention = attention
