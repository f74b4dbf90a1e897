"""The trained adapter: saved with its tokenizer, the base it was trained on and that base's precision, in bytes
that depend on those alone; and the one check that a set of weights is finite (train before each checkpoint,
evaluate on the file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.model.load import ModelConfig, record_precision


def save_adapter(model: Any, tokenizer: Any, folder: Path, model_config: ModelConfig) -> None:
    """The adapter's weights and config, the tokenizer (with any `chat.template`), the base it was trained on and the
    precision that base was loaded in (`record_precision`), into `folder`."""
    model.save_pretrained(folder)
    sort_target_modules(folder)
    tokenizer.save_pretrained(folder)
    record_precision(folder, model_config)


def sort_target_modules(adapter: Path) -> None:
    """Sort `target_modules` in the adapter's `adapter_config.json`: peft writes them from a set, in an order that
    Python's hash seed changes from run to run, so that the same training gave another folder hash (and evaluate
    ran again on bitwise-equal weights)."""
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def trainable_weights(model: Any) -> dict[str, Any]:
    """The weights of `model` that train (the adapter's), by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def non_finite(weights: dict[str, Any]) -> list[str]:
    """The names of the tensors that hold a NaN or an infinite value, in order: one check on the tensors' device, one
    read back. `non_finite({"a": tensor([1.0]), "b": tensor([nan])})` -> `["b"]`."""
    import torch

    if not weights:
        return []
    tensors = list(weights.values())
    device = tensors[0].device
    finite = torch.stack([t.isfinite().all().to(device) for t in tensors]).tolist()
    return [name for name, ok in zip(weights, finite, strict=True) if not ok]


def check_finite(adapter: Path) -> None:
    """Refuse an adapter with a NaN or infinite weight (a diverged training's), naming the first such tensor."""
    from safetensors.torch import load_file

    bad = non_finite(load_file(str(adapter / "adapter_model.safetensors")))
    if bad:
        raise ValueError(
            f"{adapter}: {bad[0]} holds NaN or infinite values: the training that wrote it diverged; "
            "train again with a lower train.learning_rate"
        )
