"""The `model` section: which base model the stages load, and how (4-bit, sequence length, dtype).

train decides `model.load_in_4bit: auto` for its GPU (`finetune.model.fit`) and records, with the adapter, the base
it trained on and the precision it loaded it in (`PRECISION_FILE`); evaluate, export and generate refuse an adapter
of another base than `model.model_name` and `model.revision` name, and load the base in that same precision, with
the adapter on it (`load_with_adapter`). No speed patch here (`finetune.model.patches`): tokenize reads this file
for the tokenizer, and a patch is no reason to tokenize again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from finetune.config.params import require

log = logging.getLogger(__name__)

DTYPES = (None, "float16", "bfloat16", "float32")
PRECISION_FILE = "base_precision.json"  # in the adapter's folder: which base train loaded, and how


@dataclass(frozen=True)
class ModelConfig:
    model_name: str  # Hub id or local folder of the base model
    revision: str | None  # Hub commit, tag or branch; null = the default branch
    max_seq_length: int  # longest sequence trained or scored, in tokens
    load_in_4bit: bool | str  # QLoRA: 4-bit NF4 base weights (bitsandbytes); auto = 16-bit where it fits
    dtype: str | None  # compute dtype; null = chosen from the hardware
    trust_remote_code: bool = False  # run Python code shipped with the model (its auto_map); only for models you trust

    def __post_init__(self) -> None:
        require(bool(self.model_name.strip()), "model.model_name must not be empty")
        require(self.max_seq_length >= 16, f"model.max_seq_length must be >= 16, got {self.max_seq_length}")
        require(self.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        require(
            self.load_in_4bit in (True, False, "auto"),
            f"model.load_in_4bit must be true, false or auto, got {self.load_in_4bit!r}",
        )


def load_base(config: ModelConfig, local_rank: int | None = None) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` with unsloth's `FastLanguageModel.from_pretrained`, 4-bit or not as decided; one
    of several processes (`local_rank`) loads the whole model onto its own GPU."""
    import torch
    from unsloth import FastLanguageModel

    require(
        isinstance(config.load_in_4bit, bool),
        f"model.load_in_4bit must be decided before loading (finetune.model.fit.resolved), got {config.load_in_4bit!r}",
    )
    placement = {}
    if local_rank is not None and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        placement = {"device_map": {"": local_rank}}
    return FastLanguageModel.from_pretrained(
        model_name=config.model_name,
        revision=config.revision,
        max_seq_length=config.max_seq_length,
        load_in_4bit=config.load_in_4bit,
        dtype=getattr(torch, config.dtype) if config.dtype else None,
        trust_remote_code=config.trust_remote_code,
        **placement,
    )


def load_with_adapter(
    config: ModelConfig, adapter: Path, local_rank: int | None = None
) -> tuple[Any, Any, ModelConfig]:
    """The base model in the precision `adapter` was trained in (`trained_precision`), the adapter on it, and the
    tokenizer with the chat template the adapter was trained with (`trained_template`: a `chat.template` of that
    training's, which export's merged model then carries); also the config as loaded. An adapter of another base than
    `config`'s is refused before any weight loads. For evaluate (one of several processes: `local_rank`, as
    `load_base`), export and generate."""
    from peft import PeftModel

    config = trained_precision(config, adapter)
    model, tokenizer = load_base(config, local_rank)
    return PeftModel.from_pretrained(model, str(adapter)), with_trained_template(tokenizer, adapter), config


def with_trained_template(tokenizer: Any, adapter: Path) -> Any:
    """`tokenizer` with the chat template the adapter was trained with, where its folder holds one."""
    template = trained_template(adapter)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def trained_template(adapter: Path) -> str | None:
    """The chat template of the tokenizer saved with the adapter (`chat_template.jinja`, or an older
    `tokenizer_config.json`'s `chat_template`), or None where the adapter folder holds none."""
    path = adapter / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    config = adapter / "tokenizer_config.json"
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else None


def linear_names(config: ModelConfig) -> set[str]:
    """The names of the base model's linear layers (`q_proj`, `down_proj`, ...), which `lora.target_modules`
    picks from: the model built from its configuration on the meta device, so no weight is read."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config(config), trust_remote_code=config.trust_remote_code)
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def load_tokenizer(config: ModelConfig) -> Any:
    """The base model's tokenizer alone (with its chat template): what the tokenize stage encodes with."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        config.model_name, revision=config.revision, trust_remote_code=config.trust_remote_code
    )


def base_config(config: ModelConfig) -> Any:
    """The base model's configuration (`config.json`), read without its weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        config.model_name, revision=config.revision, trust_remote_code=config.trust_remote_code
    )


def record_precision(adapter: Path, config: ModelConfig) -> None:
    """Write, beside the adapter's weights, the base it was trained on (`model_name`, `revision`, as params.yaml
    names them) and the precision that base was loaded in."""
    record = {"load_in_4bit": config.load_in_4bit, "model_name": config.model_name, "revision": config.revision}
    (adapter / PRECISION_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")


def trained_precision(config: ModelConfig, adapter: Path) -> ModelConfig:
    """`config` with the base's precision as the adapter was trained (its `PRECISION_FILE`), once its base is the
    one `config` names (`check_base`), so that no weight of another base is read.

    An adapter without that file (trained before it was written) is loaded as `model.load_in_4bit` says, which must
    then be true or false: `auto` could decide otherwise on this machine than it did on the training's GPU.
    """
    path = adapter / PRECISION_FILE
    if not path.is_file():
        require(
            isinstance(config.load_in_4bit, bool),
            f"{adapter} does not record the precision it was trained in ({PRECISION_FILE}): set model.load_in_4bit "
            "to true or false as in that training",
        )
        return config
    record = json.loads(path.read_text(encoding="utf-8"))
    check_base(config, adapter, record)
    recorded = record["load_in_4bit"]
    if config.load_in_4bit not in ("auto", recorded):
        log.warning(
            "model.load_in_4bit is %s, but %s was trained on a base loaded with %s: loading it so",
            config.load_in_4bit,
            adapter,
            recorded,
        )
    return replace(config, load_in_4bit=recorded)


def check_base(config: ModelConfig, adapter: Path, record: dict[str, Any]) -> None:
    """Refuse an adapter trained on another base than `config`'s (name or revision): its weights would not fit
    (torch's "size mismatch for ...lora_A..." minutes later), or fit and give wrong answers. A record without a
    `model_name` (written before it was recorded) is not checked.

    `check_base(ModelConfig("a/b", None, ...), Path("adapter"), {"model_name": "a/c", "revision": None})` raises
    `ValueError: adapter was trained on a/c (revision null), but model.model_name is a/b (revision null): set ...`.
    """
    if "model_name" not in record:
        return
    trained, asked = (record["model_name"], record.get("revision")), (config.model_name, config.revision)
    require(
        trained == asked,
        f"{adapter} was trained on {trained[0]} (revision {shown(trained[1])}), but model.model_name is {asked[0]} "
        f"(revision {shown(asked[1])}): set model.model_name and model.revision to the adapter's base",
    )


def shown(revision: str | None) -> str:
    """A revision as params.yaml writes it: `shown(None)` -> `'null'`, `shown("main")` -> `'main'`."""
    return "null" if revision is None else revision


def precision_flags(dtype: str | None, cuda: bool, bf16_supported: bool) -> dict[str, bool]:
    """The Trainer's `bf16`/`fp16` flags for `model.dtype` on this hardware: the compute dtype the model loads in,
    chosen by the hardware where `dtype` is null (bf16 where the GPU has it, else fp16); none on the CPU, nor for
    float32 weights (unsloth's trainer then picks the autocast the GPU allows). A flag other than the weights' dtype
    stops unsloth's trainer: `precision_flags("float16", True, True)` -> `{"bf16": False, "fp16": True}`."""
    if not cuda or dtype == "float32":
        return {"bf16": False, "fp16": False}
    require(
        dtype != "bfloat16" or bf16_supported,
        "model.dtype is bfloat16, which this GPU does not have: set float16, float32 or null",
    )
    bf16 = dtype == "bfloat16" or (dtype is None and bf16_supported)
    return {"bf16": bf16, "fp16": not bf16}


def mixed_precision(dtype: str | None) -> dict[str, bool]:
    """Trainer precision flags for `model.dtype` on this machine's hardware (`precision_flags`)."""
    import torch
    from unsloth import is_bfloat16_supported

    cuda = torch.cuda.is_available()
    return precision_flags(dtype, cuda, cuda and bool(is_bfloat16_supported()))
