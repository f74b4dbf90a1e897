"""The baselines `perf.train_speed` holds the train stage's code against, on the same conversations and settings:

- `bare`: unsloth + TRL's SFTTrainer as their documentation writes them, none of the project's code in the loop;
- `plain`: transformers + peft + bitsandbytes, no unsloth, with a plain training loop (needs a CUDA GPU).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from perf.train_measure import Configs, StepClock, clocked, lora_ran, step_losses


def run_bare(configs: Configs, data: list, settings: dict[str, Any], work: Path) -> dict[str, Any]:
    """unsloth + TRL's SFTTrainer as their documentation writes them: the same rows as the project trains on (the
    tokenize stage's ids and labels), the same split of the batch and 16-bit base without checkpointing as
    `project-auto` chooses (`finetune.model.fit`), the same learning rate, optimizer and schedule, library defaults
    for the rest (no tracking, no token count, no callbacks). On rows of mixed length unsloth pads them (it turns
    padding-free batching off for tokenized data), so compare it with the project on `--lengths fixed`."""
    import unsloth  # noqa: F401, I001  # isort: skip
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel, is_bfloat16_supported

    from finetune.model import fit
    from finetune.tokens.chat import Chat
    from finetune.tokens.encode import tokenized

    model_config = dataclasses.replace(configs.model, load_in_4bit="auto")
    lora = dataclasses.replace(configs.lora, use_gradient_checkpointing="auto")
    split = dataclasses.replace(configs.train, micro_batch_size="auto")
    model_config, lora, split = fit.fit_to_machine(model_config, lora, split)
    max_length = model_config.max_seq_length
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_config.model_name, max_seq_length=max_length, load_in_4bit=model_config.load_in_4bit, dtype=None
    )
    model = FastLanguageModel.get_peft_model(model, **dataclasses.asdict(lora))
    chat = Chat(tokenizer, configs.chat)
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=tokenized(chat, data, max_length, configs.tokenize),
        args=SFTConfig(
            output_dir=str(work / "bare"),
            per_device_train_batch_size=split.per_device_train_batch_size,
            gradient_accumulation_steps=split.gradient_accumulation_steps,
            max_steps=split.max_steps,
            learning_rate=split.learning_rate,
            lr_scheduler_type=split.lr_scheduler_type,
            warmup_steps=split.warmup_steps,
            weight_decay=split.weight_decay,
            optim=split.optim,
            logging_steps=1,
            seed=split.seed,
            bf16=is_bfloat16_supported(),
            fp16=not is_bfloat16_supported(),
            max_length=max_length,
            report_to="none",
            dataset_kwargs={"skip_prepare_dataset": True},
        ),
    )
    clock = clocked(trainer)
    trainer.train()
    chosen = {"load_in_4bit": model_config.load_in_4bit, "use_gradient_checkpointing": lora.use_gradient_checkpointing}
    chosen |= {
        "per_device_train_batch_size": split.per_device_train_batch_size,
        "gradient_accumulation_steps": split.gradient_accumulation_steps,
    }
    ran = {"lora": lora_ran(model), "max_seq_length": max_length}
    return {"clock": clock, "settings": chosen, "losses": step_losses(trainer)} | ran


def run_plain(configs: Configs, data: list, settings: dict[str, Any], work: Path) -> dict[str, Any]:
    """transformers + peft + bitsandbytes: the base in NF4 with bf16 compute (`BitsAndBytesConfig`), the LoRA of
    `lora.*` added with peft after `prepare_model_for_kbit_training`, SDPA attention, gradient checkpointing, padded
    batches of the whole step, bf16 autocast, 8-bit AdamW at the learning rate of `train.learning_rate` (no
    schedule), the conversations in a seeded random order."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from finetune.tokens.chat import Chat

    lora, config, max_length = configs.lora, configs.train, configs.model.max_seq_length
    batch, steps = config.per_device_train_batch_size, config.max_steps
    tokenizer = AutoTokenizer.from_pretrained(configs.model.model_name)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(
        configs.model.model_name,
        quantization_config=quantization,
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
        device_map={"": 0},
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    adapter = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        bias=lora.bias,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
    )
    model = get_peft_model(model, adapter)
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    rendered = [Chat(tokenizer, configs.chat).render(m) for m in data]  # the same text as the project trains on
    encoded = [ids[:max_length] for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(encoded), generator=generator).tolist()
    clock = StepClock()
    model.train()
    for step in range(steps):
        rows = [encoded[i] for i in order[step * batch : (step + 1) * batch]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows], device="cuda")
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device="cuda")
        labels = ids.masked_fill(mask == 0, -100)
        clock.count({"input_ids": ids, "attention_mask": mask})
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):  # as Trainer's bf16=True runs it
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick()
    chosen = {"load_in_4bit": True, "use_gradient_checkpointing": True, "per_device_train_batch_size": batch}
    ran = {"lora": lora_ran(model), "max_seq_length": max_length}
    return {"clock": clock, "settings": chosen, "losses": []} | ran
