"""The CUDA path: 4-bit NF4 base on the GPU, unsloth's kernels, a few training steps. Skipped without a GPU."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from examples import LORA, tiny_training
from unsloth import FastLanguageModel

from finetune.model.load import ModelConfig, load_base, mixed_precision
from finetune.model.patches import apply_speed_patches
from finetune.tokens.chat import IGNORE_INDEX, Chat, ChatConfig
from finetune.tokens.encode import tokenized
from finetune.training.batching import batching_tags
from finetune.training.config import LoraConfig
from finetune.training.data import loss_rows
from finetune.training.trainer import build_trainer

pytestmark = pytest.mark.slow
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")  # all but one test here

TRAIN = tiny_training(per_device_train_batch_size=8, max_steps=15, optim="adamw_8bit")


@cuda
def test_4bit_training_on_the_gpu_learns(tiny_model_dir: Path, tmp_path: Path, mlflow_store: str) -> None:
    import bitsandbytes as bnb

    config = ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit=True, dtype=None)
    apply_speed_patches()
    model, tokenizer = load_base(config)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # NF4 weights, on the GPU
    assert next(model.parameters()).is_cuda and mixed_precision(None)["bf16"] != mixed_precision(None)["fp16"]
    model = FastLanguageModel.get_peft_model(model, **LoraConfig(r=4, target_modules=["q_proj", "v_proj"]).__dict__)
    rows = [
        [{"role": "user", "content": f"Ratio of firm {i}?"}, {"role": "assistant", "content": "Assets over debts."}]
        for i in range(32)
    ]
    data = tokenized(Chat(tokenizer, ChatConfig()), rows, config.max_seq_length)
    trainer = build_trainer(model, tokenizer, data, config, TRAIN, tmp_path / "out")
    assert trainer.args.padding_free  # the tokenized rows are known to be cut: unsloth keeps padding-free batching
    assert batching_tags(trainer.args, config) == {"fit.batching": "padding-free", "fit.attention": "flash-varlen"}
    trainer.train()
    rows_logged = loss_rows(trainer.state.log_history)
    assert all(row["padding_share"] == 0 for row in rows_logged)
    losses = [row["loss"] for row in rows_logged]
    assert all(math.isfinite(loss) for loss in losses) and sum(losses[-3:]) < sum(losses[:3])
    assert all(row["tokens_per_second"] > 0 for row in rows_logged)


@cuda
def test_auto_settings_fit_the_tiny_model_in_16_bit_without_checkpointing(tiny_model_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    from finetune.model.fit import fit_to_machine

    config = ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit="auto", dtype=None)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_gradient_checkpointing="auto")
    train = replace(TRAIN, per_device_train_batch_size=2, gradient_accumulation_steps=4, micro_batch_size="auto")
    config, lora, train = fit_to_machine(config, lora, train)
    assert config.load_in_4bit is False and lora.use_gradient_checkpointing is False
    assert (train.per_device_train_batch_size, train.gradient_accumulation_steps) == (8, 1)
    model, _ = load_base(config)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def summed_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], keys: tuple[str, ...] = ()) -> float:
    """The loss summed over every learnt token of `batches` (the model's mean times the tokens it averaged), with
    only `keys` of each batch given to the model (all it holds, as the Trainer gives them, if none are named)."""
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            learnt = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
            given = {key: batch[key] for key in keys} if keys else batch
            total += float(model(**given).loss) * learnt
    return total


TOGETHER = 2e-5  # relative difference allowed between conversations sharing a row and the same ones alone


@cuda
@pytest.mark.parametrize(
    ("dtype", "packing"),
    [("float32", True), ("bfloat16", False)],
    ids=["packed-float32", "padding-free-bfloat16"],
)
def test_batched_conversations_keep_apart(
    dtype: str,
    packing: bool,
    tiny_model_dir: Path,
    tmp_path: Path,
    sample_rows: list,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Conversations that share a row must not attend to each other: `train.packing` (TRL's bfd rows, float32) and
    padding-free batches (16-bit, where unsloth runs torch's flash varlen kernel: `finetune.model.patches`, applied
    here as train applies it). The rows' summed loss equals that of the same conversations one by one within 2e-5
    relative (measured on an H200: 4e-8 in float32, 1e-8 in bf16); the same rows read as single sequences (no
    position ids) differ by more than ten times that (5e-4 and 3e-3 there), so the check can tell the two apart."""
    from unsloth.utils import attention_dispatch as dispatch

    config = ModelConfig(str(tiny_model_dir), None, 512, load_in_4bit=False, dtype=dtype)
    apply_speed_patches()
    model, tokenizer = load_base(config)
    varlen = dispatch._LeanFlashVarlen.apply
    calls = []
    monkeypatch.setattr(dispatch._LeanFlashVarlen, "apply", lambda *args: calls.append(1) or varlen(*args))
    model = FastLanguageModel.get_peft_model(model, **LoraConfig(r=4, target_modules=["q_proj", "v_proj"]).__dict__)
    conversations = [
        [{"role": "user", "content": row["user"]}, {"role": "assistant", "content": row["assistant"]}]
        for row in sample_rows[:12]
    ]
    data = tokenized(Chat(tokenizer, ChatConfig()), conversations, config.max_seq_length)
    together = replace(TRAIN, packing=True, padding_free=True) if packing else replace(TRAIN, padding_free=True)
    batched = build_trainer(model, tokenizer, data, config, replace(together, per_device_train_batch_size=6), tmp_path)
    assert not packing or len(batched.train_dataset) < len(conversations)  # packing took place
    one_by_one = build_trainer(model, tokenizer, data, config, replace(TRAIN, per_device_train_batch_size=1), tmp_path)
    rows, singles = list(batched.get_train_dataloader()), list(one_by_one.get_train_dataloader())
    assert all(len(row["input_ids"]) == 1 for row in rows) and len(rows) < len(singles)  # shared rows
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in rows) == sum(
        int((b["labels"] != IGNORE_INDEX).sum()) for b in singles
    )
    apart, alone = summed_loss(model, rows), summed_loss(model, singles)  # with the position ids the collator gives
    print(f"{dtype}: rows {apart}, one by one {alone}, flash varlen calls {len(calls)}")
    assert abs(apart - alone) <= TOGETHER * abs(alone), (apart, alone)
    assert bool(calls) == (dtype != "float32")  # flash has no float32 kernel: unsloth's per-segment SDPA runs there
    merged = summed_loss(model, rows, ("input_ids", "labels"))
    assert abs(merged - alone) > 10 * TOGETHER * abs(alone), (merged, alone)


def restore_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """`compiled_blocks.let_in` patches unsloth and the layer class for the whole process: put them back after the
    test."""
    import unsloth.models.llama as llama
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from unsloth.utils import hf_packed_attention

    from finetune.model import compiled_blocks

    for owner, name in (
        (LlamaDecoderLayer, "forward"),
        (hf_packed_attention, "block_varlen_kwargs"),
        (llama, "get_packed_info_from_kwargs"),
        (llama, "run_attention"),
    ):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    monkeypatch.setattr(compiled_blocks, "_ORIGINAL", {})


def fused(model: Any) -> tuple[int, int]:
    """How many of `model`'s MLPs and attentions run unsloth's fused LoRA, which its `get_peft_model` sets on CUDA: MLPs
    with a `forward` of their own, attentions whose `apply_qkv` or `apply_o` is unsloth's LoRA function."""
    from unsloth.models.llama import apply_lora_o, apply_lora_qkv

    from finetune.model.compiled_blocks import decoder_layers

    layers = decoder_layers(model)
    attentions = [vars(layer.self_attn) for layer in layers]
    return (
        sum("forward" in vars(layer.mlp) for layer in layers),
        sum(own.get("apply_qkv") is apply_lora_qkv or own.get("apply_o") is apply_lora_o for own in attentions),
    )


ALL_LINEAR = replace(
    LORA,
    r=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    use_gradient_checkpointing=False,
)


@cuda
@pytest.mark.parametrize(
    "lora", [replace(LORA, use_gradient_checkpointing=False), ALL_LINEAR], ids=["qkvo-r4", "all-r16"]
)
def test_padding_free_batches_train_through_the_compiled_blocks_as_through_the_eager_ones(
    lora: LoraConfig,
    tiny_model_dir: Path,
    tmp_path: Path,
    sample_rows: list,
    monkeypatch: pytest.MonkeyPatch,
    mlflow_store: str,
) -> None:
    """The train stage's compiled padding-free blocks (`finetune.model.compiled_blocks`, taken where measured faster:
    a 16-bit base, no checkpointing), with the seed's LoRA and with LoRA on all seven projections, which then runs
    through peft's layers instead of unsloth's fused functions: every decoder layer trains compiled, and the logged
    losses and gradient norms of a few steps on rows of several conversations are those of the eager blocks (on the 8B
    shape at r 4 within 1e-3: BENCHMARKS.md, session 22). unsloth's fused LoRA rounds otherwise than peft's layers,
    and Adam's first updates are the learning rate times each gradient element's sign, however small: after the first
    step the all-seven curves may part by more (8B shape: up to 0.17 of 12.4 by step 6, session 25)."""
    from finetune.model import compiled_blocks

    restore_after(monkeypatch)
    config = ModelConfig(str(tiny_model_dir), None, 512, load_in_4bit=False, dtype="bfloat16")
    mlp_lora = "gate_proj" in lora.target_modules
    train = tiny_training(per_device_train_batch_size=6, max_steps=4, padding_free=True)
    conversations = [
        [{"role": "user", "content": row["user"]}, {"role": "assistant", "content": row["assistant"]}]
        for row in sample_rows[:24]
    ]
    apply_speed_patches()

    def trained(compile_blocks: bool) -> tuple[list[str], tuple[int, int], list[dict[str, float]]]:
        model, tokenizer = load_base(config)
        names = compiled_blocks.compile_padding_free_blocks(model, config.load_in_4bit, lora) if compile_blocks else []
        model = FastLanguageModel.get_peft_model(model, **lora.__dict__)
        assert fused(model) == ((2 if mlp_lora else 0), 2)  # unsloth fuses LoRA on CUDA
        if names:  # as the stage does: peft's layers for all seven, unsloth's fused functions for q/k/v/o alone
            assert compiled_blocks.unfuse_lora(model) == ((2, 2) if mlp_lora else (0, 0))
            assert fused(model) == ((0, 0) if mlp_lora else (0, 2))
        data = tokenized(Chat(tokenizer, ChatConfig()), conversations, config.max_seq_length)
        trainer = build_trainer(model, tokenizer, data, config, train, tmp_path / f"compiled-{compile_blocks}")
        assert trainer.args.padding_free
        assert len(next(iter(trainer.get_train_dataloader()))["input_ids"]) == 1  # conversations share a row
        trainer.train()
        return names, compiled_blocks.compiled_layers(model), loss_rows(trainer.state.log_history)

    _, eager_layers, eager = trained(compile_blocks=False)  # first: let_in wraps the layer class for what follows
    names, layers, compiled = trained(compile_blocks=True)
    print(f"eager blocks {eager_layers}: {eager}\ncompiled blocks {layers}: {compiled}")
    assert names == ["LlamaDecoderLayer"] and eager_layers == (0, 2) and layers == (2, 2)
    assert len(compiled) == len(eager) == train.max_steps
    for step, (row, expected) in enumerate(zip(compiled, eager, strict=True)):
        widen = 4 if mlp_lora and step else 1  # fused and peft MLPs, after Adam's first update (see above)
        assert row["loss"] == pytest.approx(expected["loss"], rel=5e-3 * widen), (row, expected)
        assert row["grad_norm"] == pytest.approx(expected["grad_norm"], rel=2e-2 * widen), (row, expected)


@cuda
def test_a_padding_free_step_in_passes_of_so_many_tokens_trains_as_the_step_in_one_pass(
    tiny_model_dir: Path, tmp_path: Path, sample_rows: list, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
) -> None:
    """`train.micro_batch_tokens` on the stage's CUDA path: padding-free rows cut between conversations, through the
    compiled blocks, log the losses and gradient norms of the rows run whole (bf16: the tolerances of the compiled
    blocks' test above)."""
    from finetune.model import compiled_blocks
    from finetune.training.batching import cut_by_tokens

    restore_after(monkeypatch)
    config = ModelConfig(str(tiny_model_dir), None, 512, load_in_4bit=False, dtype="bfloat16")
    lora = replace(LORA, use_gradient_checkpointing=False)
    conversations = [
        [{"role": "user", "content": row["user"]}, {"role": "assistant", "content": row["assistant"]}]
        for row in sample_rows[:36]
    ]
    apply_speed_patches()
    runs = []
    for tokens in (None, 512):
        model, tokenizer = load_base(config)
        assert compiled_blocks.compile_padding_free_blocks(model, config.load_in_4bit, lora) == ["LlamaDecoderLayer"]
        model = FastLanguageModel.get_peft_model(model, **lora.__dict__)
        data = tokenized(Chat(tokenizer, ChatConfig()), conversations, config.max_seq_length)
        train = tiny_training(per_device_train_batch_size=12, max_steps=3, padding_free=True, micro_batch_tokens=tokens)
        trainer = build_trainer(model, tokenizer, data, config, train, tmp_path / f"tokens-{tokens}")
        first = next(iter(trainer.get_train_dataloader()))
        assert len(first["input_ids"]) == 1 and "packed_seq_lengths" in first  # one padding-free row
        assert tokens is None or len(cut_by_tokens(first, tokens)) > 1
        trainer.train()
        runs.append(loss_rows(trainer.state.log_history))
    print(f"whole: {runs[0]}\nin passes: {runs[1]}")
    assert len(runs[0]) == len(runs[1]) == 3
    for row, expected in zip(runs[1], runs[0], strict=True):
        assert row["loss"] == pytest.approx(expected["loss"], rel=5e-3), (row, expected)
        assert row["grad_norm"] == pytest.approx(expected["grad_norm"], rel=2e-2), (row, expected)


def lora_gradients(
    model_dir: Path, dtype: str, adapter: dict[str, torch.Tensor], rows: list, path: str = "fused"
) -> tuple[float, tuple[int, int], dict[str, torch.Tensor]]:
    """The loss of the longest of `rows` through the tiny model in `dtype` with LoRA at r 16 on all seven projections,
    the adapter's weights set to `adapter` (name -> tensor; if empty, filled first with `get_peft_model`'s A and a
    random B, so that every weight gets a gradient), how many MLPs and attentions ran unsloth's fused LoRA (`fused`),
    and every LoRA weight's gradient in float32. `path="peft"` takes unsloth's fused LoRA away: peft's layers run it."""
    from finetune.model.compiled_blocks import unfuse_lora

    model, tokenizer = load_base(ModelConfig(str(model_dir), None, 512, load_in_4bit=False, dtype=dtype))
    model = FastLanguageModel.get_peft_model(model, **ALL_LINEAR.__dict__)
    if path == "peft":  # as the train stage does for compiled blocks, where the MLPs have LoRA
        before = fused(model)
        assert unfuse_lora(model) == before and fused(model) == (0, 0)
    weights = {name: p for name, p in model.named_parameters() if "lora_" in name}
    if not adapter:
        draw = torch.Generator().manual_seed(0)
        for name, p in sorted(weights.items()):
            value = p.detach().float().cpu()
            adapter[name] = torch.randn(value.shape, generator=draw) * 0.05 if "lora_B" in name else value
    for name, p in weights.items():
        p.data.copy_(adapter[name])
    conversations = [
        [{"role": "user", "content": r["user"]}, {"role": "assistant", "content": r["assistant"]}] for r in rows
    ]
    row = max(tokenized(Chat(tokenizer, ChatConfig()), conversations, 512), key=lambda r: len(r["input_ids"]))
    batch = {key: torch.tensor([row[key]], device=model.device) for key in ("input_ids", "labels")}
    loss = model(**batch).loss
    loss.backward()
    return float(loss), fused(model), {name: p.grad.float().cpu() for name, p in weights.items()}


@cuda
def test_lora_on_all_seven_projections_gets_the_gradients_of_float32_autograd(
    tiny_model_dir: Path, sample_rows: list
) -> None:
    """In bf16 on CUDA unsloth runs LoRA on q/k/v, o and the MLP through its fused autograd functions; peft's layers
    run it in float32 (unsloth keeps its fused kernels off a float32 base). The gradients of every LoRA weight, A and
    B, of one conversation are those of float32 autograd within bf16's error, through unsloth's fused LoRA functions and
    through peft's layers in their place (the train stage's choice in compiled blocks). Measured on an H200: 1.2-2.5e-2
    relative either way, the losses within 3e-5 (BENCHMARKS.md, session 25); a wrong gradient would be off by ~100 %."""
    adapter: dict[str, torch.Tensor] = {}
    rows = sample_rows[:12]
    reference_loss, none_fused, reference = lora_gradients(tiny_model_dir, "float32", adapter, rows)
    assert none_fused == (0, 0)
    results = {}
    for path in ("fused", "peft"):
        loss, ran_fused, grads = lora_gradients(tiny_model_dir, "bfloat16", adapter, rows, path)
        kinds: dict[str, float] = {}
        for name, expected in reference.items():
            kind = ".".join(
                part
                for part in name.split(".")
                if part in ("self_attn", "mlp") or part.endswith("_proj") or part.startswith("lora_")
            )
            error = float((grads[name] - expected).norm() / expected.norm())
            kinds[kind] = max(kinds.get(kind, 0.0), error)
        results[path] = (loss, ran_fused, kinds)
        print(
            f"{path}: loss {loss:.6f} (float32 {reference_loss:.6f}), fused (MLPs, attentions) {ran_fused}, worst "
            "relative error " + ", ".join(f"{kind} {error:.2e}" for kind, error in sorted(kinds.items()))
        )
    assert results["fused"][1] == (2, 2) and results["peft"][1] == (0, 0)
    for path, (loss, _, kinds) in results.items():
        assert loss == pytest.approx(reference_loss, rel=1e-3), path
        assert max(kinds.values()) < 5e-2, (path, kinds)


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-5), ("bfloat16", 5e-3)])
def test_label_choices_continue_from_the_prompts_keys_and_values(
    dtype: str, tolerance: float, tiny_model_dir: Path
) -> None:
    """evaluate's label scoring on unsloth's inference path (`for_inference`; on CUDA its own, on the CPU too): each
    label continued from the prompt's cached keys and values scores as its whole sequence does, base and tuned (an
    adapter that changes the scores). On the CPU, positions off by the prompt's length moved the scores by 1.5 %;
    bfloat16 rounding moves them by about 0.1 %."""
    from finetune.evaluation.likelihood import choice_nll, sequence_nll, shared_length

    config = ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit=False, dtype=dtype)
    apply_speed_patches()
    model, tokenizer = load_base(config)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = FastLanguageModel.get_peft_model(model, **lora.__dict__, init_lora_weights=False)  # not zero: it counts
    FastLanguageModel.for_inference(model)
    chat = Chat(tokenizer, ChatConfig())
    labels = ["positive", "negative", "neutral", "mildly negative"]
    rows = [
        chat.encode_many([[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for a in labels])
        for q in ("Rates rose.", "Shares of the bank fell sharply after the report.", "Rates fell.")
    ]

    def whole(choices: list[tuple[list[int], list[int]]]) -> list[float]:
        shared = max(shared_length([ids for ids, _ in choices]), 1)
        masked = [(ids, [IGNORE_INDEX] * shared + learnt[shared:]) for ids, learnt in choices]
        return [nll for nll, _ in sequence_nll(model, masked, tokenizer.pad_token_id)]

    scores = {}
    for adapter in (True, False):
        with model.disable_adapter() if not adapter else torch.no_grad():
            got = [v for values in choice_nll(model, rows, 4096) for v in values]
            expected = [v for row in rows for v in whole(row)]
        print(f"{dtype}, adapter {adapter}: cached {got[:4]}, whole {expected[:4]}")
        assert got == pytest.approx(expected, rel=tolerance)
        scores[adapter] = got
    assert scores[True] != pytest.approx(scores[False], rel=10 * tolerance)  # the adapter was on, then off


@cuda
def test_generation_on_the_gpu_takes_the_grouped_decode_attention_and_answers_as_unsloths(
    tiny_model_dir: Path,
) -> None:
    """On CUDA unsloth decodes through its own attention step (on the CPU it does not, so only here): the patch is
    called for every decode step and layer, and the greedy answers are unsloth's own (float32: no rounding tie)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from unsloth.models import llama

    from finetune.model.patches import grouped_decode_attention, unsloth_decode_attention

    config = ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit=False, dtype="float32")
    model, tokenizer = load_base(config)
    model = get_peft_model(model, PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    ids = [[tokenizer.bos_token_id, *range(100, 100 + n)] for n in (5, 17, 30)]  # left-padded: a mask
    prompts = tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt").to("cuda")

    def answers() -> list[list[int]]:
        with torch.no_grad():
            out = model.generate(**prompts, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        return out[:, prompts["input_ids"].shape[1] :].tolist()

    attention = llama.scaled_dot_product_attention  # patched already if an earlier test applied the speed patches
    llama.scaled_dot_product_attention = unsloth_decode_attention()
    try:
        expected = answers()
        grouped_decode_attention()
        grouped, calls = llama.scaled_dot_product_attention, []
        llama.scaled_dot_product_attention = lambda *args, **kwargs: calls.append(1) or grouped(*args, **kwargs)
        assert answers() == expected
        assert len(calls) >= 7 * model.config.num_hidden_layers  # every decode step of every layer
    finally:
        llama.scaled_dot_product_attention = attention


@cuda
def test_the_grouped_decode_attention_in_bf16_is_as_exact_as_unsloths() -> None:
    """At the 8B's head layout in bf16 (32 query heads over 8 K/V heads, 1,024 cached tokens, left padding), the
    patch is as close to the exact attention (float64) as unsloth's own call, whose math kernel computes in float32:
    the kernels differ by rounding, not by what they attend to."""
    from unsloth.models import llama

    from finetune.model.patches import grouped_decode_attention, unsloth_decode_attention

    attention, unsloth_attention = llama.scaled_dot_product_attention, unsloth_decode_attention()
    llama.scaled_dot_product_attention = unsloth_attention
    try:
        grouped_decode_attention()
        patched = llama.scaled_dot_product_attention
    finally:
        llama.scaled_dot_product_attention = attention
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch, heads, kv_heads, length, dim = 16, 32, 8, 1024, 128
    query, key, value = (
        torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16)
        for shape in ((batch, heads, 1, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim))
    )
    starts = torch.randint(0, length // 2, (batch,), generator=generator, device="cuda")
    mask = (torch.arange(length, device="cuda")[None, :] >= starts[:, None])[:, None, None, :]
    exact = torch.nn.functional.scaled_dot_product_attention(
        query.double(), key.double(), value.double(), attn_mask=mask, enable_gqa=True
    )
    errors = {
        name: (function(query, key, value, attn_mask=mask, is_causal=False, enable_gqa=True).double() - exact)
        .abs()
        .max()
        .item()
        for name, function in (("unsloth", unsloth_attention), ("grouped", patched))
    }
    print(f"largest difference from float64: {errors}")
    assert errors["grouped"] <= 2 * errors["unsloth"] + 1e-3


@cuda
@pytest.mark.parametrize(("load_in_4bit", "dtype"), [(False, "float32"), (True, "bfloat16")])
def test_evaluates_answers_replay_the_decode_step_as_cuda_graphs_and_are_the_eager_answers(
    load_in_4bit: bool, dtype: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluate's answers (`answers.generate`, the speed patches applied) replay unsloth's decode step as CUDA graphs,
    base, tuned and base again (the adapter toggled between calls), and are the eager step's answers token for
    token (`UNSLOTH_DECODE_CUDA_GRAPHS=0` keeps the replay off); the decode buffers are freed after each batch, the
    replayed and the eager alike."""
    import contextlib

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from finetune.evaluation.answers import generate
    from finetune.model.patches import GRAPH_SWITCH, decode_graph_counts

    apply_speed_patches()
    model, tokenizer = load_base(ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit=load_in_4bit, dtype=dtype))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = get_peft_model(model, PeftLoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    model.eval()
    prompts = [[tokenizer.bos_token_id, *range(100, 100 + n)] for n in (5, 17, 30, 9)]

    def answers() -> list[list[tuple[str, int, bool]]]:
        out = []
        for adapter in (False, True, False):
            with contextlib.nullcontext() if adapter else model.disable_adapter():
                out.append([(a.text, a.tokens, a.ended) for a in generate(model, tokenizer, prompts, 12, 4)])
        return out

    buffers = ("_unsloth_graph_buffers", "paged_attention")  # the replay's and the eager step's: freed after a batch
    monkeypatch.setenv(GRAPH_SWITCH, "0")
    eager = answers()
    assert decode_graph_counts(model)["replays"] == 0
    assert not any(name in module.__dict__ for module in model.modules() for name in buffers)
    monkeypatch.delenv(GRAPH_SWITCH)
    replayed = answers()
    counts = decode_graph_counts(model)
    print(f"{dtype}, 4-bit {load_in_4bit}: {counts}; answers {eager[1][:2]}")
    assert counts["replays"] >= 3 * 5 and counts["captures"] >= 3  # a capture per call: freed after each
    assert replayed == eager
    assert eager[0] != eager[1] and eager[0] == eager[2]  # the adapter changes the answers, and toggles back
    assert not any(name in module.__dict__ for module in model.modules() for name in buffers)
