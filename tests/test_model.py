"""model: evaluate, export and generate load the base in the precision the adapter was trained in; no code shipped
with a model runs unless `model.trust_remote_code` says so."""

from __future__ import annotations

import json
import shutil
import types
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
    load_with_adapter,
    record_precision,
    trained_precision,
    trained_template,
)
from finetune.training.adapter import save_adapter

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


def test_the_adapter_comes_with_the_chat_template_it_was_trained_with(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A `chat.template` of the training is saved with the adapter's tokenizer; export merges with the tokenizer
    loaded here, so the merged model must carry that template, not the base's."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit=False, dtype=None)
    model, tokenizer = load_base(config)
    base_template = tokenizer.chat_template
    trained = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tokenizer.chat_template = trained  # as Chat applies a chat.template
    adapter = tmp_path / "adapter"
    save_adapter(get_peft_model(model, PeftLoraConfig(r=4, target_modules=["q_proj"])), tokenizer, adapter, config)
    assert trained_template(adapter) == trained != base_template
    _, loaded, _ = load_with_adapter(config, adapter)
    assert loaded.chat_template == trained
    assert loaded.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == "[user] Hi\n"
    assert trained_template(tmp_path) is None  # a folder without a tokenizer: the base's stays


def test_an_adapter_of_another_base_is_refused_before_any_weight_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    config = ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit=False, dtype=None)
    model, tokenizer = load_base(config)
    adapter = tmp_path / "adapter"
    save_adapter(
        get_peft_model(model, PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"])), tokenizer, adapter, config
    )
    tuned, _, loaded = load_with_adapter(replace(config, load_in_4bit="auto"), adapter)
    assert isinstance(tuned, PeftModel) and loaded == config  # on its own base it loads

    other = tmp_path / "other"  # no such folder: loading it would fail otherwise, so the check comes first
    with pytest.raises(ValueError) as refused:
        load_with_adapter(replace(config, model_name=str(other)), adapter)
    assert str(refused.value) == (
        f"{adapter} was trained on {tiny_model_dir} (revision null), but model.model_name is {other} (revision null): "
        "set model.model_name and model.revision to the adapter's base"
    )
    with pytest.raises(ValueError, match=r"\(revision null\), but model.model_name is .* \(revision v2\): set"):
        load_with_adapter(replace(config, revision="v2"), adapter)  # the same name at another revision

    # an adapter saved before the base was recorded (its precision alone) is not checked
    (adapter / PRECISION_FILE).write_text(json.dumps({"load_in_4bit": False}) + "\n")
    elsewhere = replace(config, model_name=str(other))
    assert trained_precision(elsewhere, adapter) == elsewhere


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


def test_a_padding_free_row_enters_a_compiled_block_as_cu_seqlens_covering_its_pad_tail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What `finetune.model.compiled_blocks` hands a compiled Llama block: the row's lengths, cu_seqlens with a last
    segment over the pad tail (flash varlen leaves rows past cu_seqlens[-1] unwritten) and the longest segment as an
    int, all computed eagerly; unsloth's attention then reads them instead of the host lengths."""
    import torch
    import unsloth  # noqa: F401
    import unsloth.models.llama as llama
    from transformers import LlamaConfig, LlamaForCausalLM
    from unsloth.utils import hf_packed_attention

    from finetune.model import compiled_blocks
    from finetune.training.config import LoraConfig

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    model = LlamaForCausalLM(config)
    forward = type(model.model.layers[0]).forward
    if not torch.cuda.is_available():  # no compiled block, no flash kernel: nothing is patched
        fast = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_gradient_checkpointing=False)
        assert compiled_blocks.let_in(model) == compiled_blocks.compile_padding_free_blocks(model, False, fast) == []
        assert type(model.model.layers[0]).forward is forward
    assert compiled_blocks.compiled_layers(model) == (0, 2)  # none trained compiled (none trained)
    monkeypatch.setattr(compiled_blocks, "_ORIGINAL", {})  # put back after the test: unsloth's own functions
    for module, name in (
        (hf_packed_attention, "block_varlen_kwargs"),
        (llama, "get_packed_info_from_kwargs"),
        (llama, "run_attention"),
    ):
        monkeypatch.setattr(module, name, getattr(module, name))
    compiled_blocks.patch_unsloth()
    assert hf_packed_attention.block_varlen_kwargs is compiled_blocks.block_seq_info

    layer, hidden = model.model.layers[0], torch.zeros(1, 9, 16)
    kwargs = {"packed_seq_lengths": torch.tensor([3, 2], dtype=torch.int32)}  # 5 tokens, then 4 of padding
    lengths, cu_seqlens, longest = compiled_blocks.block_seq_info(layer, hidden, kwargs)
    assert lengths.tolist() == [3, 2] and cu_seqlens.tolist() == [0, 3, 5, 9] and longest == 4
    assert isinstance(longest, int)
    # without padding, no extra segment
    lengths, cu_seqlens, longest = compiled_blocks.block_seq_info(layer, torch.zeros(1, 5, 16), kwargs)
    assert cu_seqlens.tolist() == [0, 3, 5] and longest == 3
    # a padded batch (no lengths) keeps unsloth's path
    assert compiled_blocks.block_seq_info(layer, hidden, {}) is None
    # in the block, unsloth's attention reads what the hook computed; elsewhere it computes its own
    given = (lengths, cu_seqlens, longest)
    assert compiled_blocks.seq_info({**kwargs, hf_packed_attention.BLOCK_VARLEN_KWARG: given}, hidden.device) is given
    own = compiled_blocks.seq_info(kwargs, hidden.device)
    assert own[1].tolist() == [0, 3, 5] and int(own[2]) == 3


def test_the_blocks_compile_only_for_the_settings_they_were_measured_faster_with() -> None:
    from finetune.model.compiled_blocks import measured_faster
    from finetune.training.config import LoraConfig

    fast = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_gradient_checkpointing=False)
    assert measured_faster(False, fast)  # auto's choice for the 8B on an H200, the seed's LoRA
    assert not measured_faster(True, fast)  # a 4-bit base: not measured compiled
    assert not measured_faster(False, replace(fast, use_gradient_checkpointing="unsloth"))  # checkpointing: neither
    seven = [*fast.target_modules, "gate_proj", "up_proj", "down_proj"]
    assert measured_faster(False, replace(fast, r=16, target_modules=seven))  # with the MLP's LoRA through peft
    assert not measured_faster(True, replace(fast, r=16, target_modules=seven))


def test_compiled_blocks_run_the_mlps_lora_through_peft_where_unsloth_fused_it() -> None:
    """unsloth sets its fused LoRA MLP as an instance `forward` on CUDA (set here as it does, with its own function);
    `unfuse_lora_mlps` gives each such MLP back its class's forward, through peft's LoRA layers, and leaves any other
    instance forward alone."""
    import torch
    import unsloth  # noqa: F401
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from unsloth.kernels import apply_lora_mlp_swiglu

    from finetune.model.compiled_blocks import decoder_layers, unfuse_lora_mlps

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        LlamaForCausalLM(config), PeftLoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    )
    mlps = [layer.mlp for layer in decoder_layers(model)]
    for mlp in mlps[:2]:  # as unsloth.models.llama's get_peft_model does on CUDA
        mlp.forward = types.MethodType(apply_lora_mlp_swiglu, mlp)
    mlps[2].forward = types.MethodType(type(mlps[2]).forward, mlps[2])  # an instance forward of another kind
    assert unfuse_lora_mlps(model) == 2
    assert ["forward" in vars(mlp) for mlp in mlps] == [False, False, True] and unfuse_lora_mlps(model) == 0
    x = torch.randn(1, 5, 16)
    for mlp in mlps:  # peft's layers, whose LoRA (B not zero here) shows in the output
        expected = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        torch.testing.assert_close(mlp(x), expected)
        with model.disable_adapter():
            assert not torch.allclose(mlp(x), expected)


def test_compiled_blocks_run_the_attentions_lora_through_peft_only_where_the_mlps_had_it_too() -> None:
    """unsloth sets its fused LoRA functions as an attention's `apply_qkv` and `apply_o` on CUDA (set here as it does).
    `unfuse_lora` keeps them with LoRA on q/k/v/o alone (measured faster so, r 4) and, with the MLP's LoRA fused too,
    puts unsloth's plain functions back, whose q/k/v and o run through peft's LoRA layers."""
    import torch
    import unsloth  # noqa: F401
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from unsloth.kernels import apply_lora_mlp_swiglu
    from unsloth.models.llama import apply_lora_o, apply_lora_qkv, original_apply_o, original_apply_qkv

    from finetune.model.compiled_blocks import decoder_layers, unfuse_lora

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    for targets in (["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]):
        model = get_peft_model(
            LlamaForCausalLM(config), PeftLoraConfig(r=4, target_modules=targets, init_lora_weights=False)
        )
        layers = decoder_layers(model)
        for layer in layers:  # as unsloth.models.llama's get_peft_model does on CUDA
            layer.self_attn.apply_qkv, layer.self_attn.apply_o = apply_lora_qkv, apply_lora_o
            if "up_proj" in targets:
                layer.mlp.forward = types.MethodType(apply_lora_mlp_swiglu, layer.mlp)
        if "up_proj" not in targets:
            assert unfuse_lora(model) == (0, 0)
            assert all(layer.self_attn.apply_qkv is apply_lora_qkv for layer in layers)
            continue
        assert unfuse_lora(model) == (2, 2) and unfuse_lora(model) == (0, 0)
        x = torch.randn(1, 5, 16)
        for attention in (layer.self_attn for layer in layers):
            assert (attention.apply_qkv, attention.apply_o) == (original_apply_qkv, original_apply_o)
            q, k, v = attention.apply_qkv(attention, x)
            torch.testing.assert_close(attention.apply_o(attention, q), attention.o_proj(attention.q_proj(x)))
            with model.disable_adapter():  # peft's LoRA (B not zero here) shows in the output
                assert not torch.allclose(attention.q_proj(x), q) and not torch.allclose(attention.v_proj(x), v)


def test_the_train_report_counts_each_recompile_by_the_guard_that_failed() -> None:
    import torch

    from finetune.model.compiled_blocks import recompile_reasons

    def scaled(x: torch.Tensor, factor: int) -> torch.Tensor:
        return x * factor

    compiled = torch.compile(scaled, backend="eager", dynamic=False)  # every new int is a new graph
    before = recompile_reasons()
    for factor in (2, 3, 4, 3):
        assert compiled(torch.ones(2), factor).tolist() == [factor, factor]
    new = {reason: count - before.get(reason, 0) for reason, count in recompile_reasons().items()}
    failed = {reason: count for reason, count in new.items() if count and "factor" in reason}
    assert all("\n" not in reason and not reason[0].isdigit() for reason in failed), failed
    # the call with 3 compiled again past the graph built for 2, the one with 4 past those for 3 and 2 (the last 3
    # reused its graph): each failed guard names the int its graph was built for, before the source it reads
    guards = {reason.split(" #")[0]: count for reason, count in failed.items()}
    assert guards == {"factor == 2": 2, "factor == 3": 1}, recompile_reasons()
