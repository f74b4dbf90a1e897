"""The `model` section: which base model the stages load, and how (4-bit, sequence length, dtype).

train decides `model.load_in_4bit: auto` for its GPU (`stages.fit`) and records the precision it trained in with the
adapter (`PRECISION_FILE`); evaluate, export and generate load the base in that same precision.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stages.params import require

log = logging.getLogger(__name__)

DTYPES = (None, "float16", "bfloat16", "float32")
PRECISION_FILE = "base_precision.json"  # in the adapter's folder: how train loaded the base
VARLEN_SWITCHES = ("UNSLOTH_TORCH_VARLEN", "UNSLOTH_LEAN_VARLEN")  # unsloth's switches of its varlen attention path


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
        f"model.load_in_4bit must be decided before loading (stages.fit.resolved), got {config.load_in_4bit!r}",
    )
    if torch.cuda.is_available() and flash_varlen():
        log.info("padding-free attention: one flash varlen call per layer (torch %s)", torch.__version__)
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


def flash_varlen() -> bool:
    """Whether unsloth runs the attention of a padding-free batch as one call of torch's flash varlen kernel per
    layer; where its own check refuses the installed torch, give it that kernel.

    unsloth takes the kernel only from a torch whose `varlen_attn` has `enable_gqa` (2.12 on); with an older one (the
    GPU image's 2.11) it makes one cuDNN call per run of equal lengths, with copies and fills around them: ~8 calls
    per layer on the data's length mix, which made the 8B shape 6 % slower (BENCHMARKS.md, session 11). What it calls
    on 2.12+, `aten._flash_attention_forward` and `_backward` over `cu_seqlens` with a window (`_LeanFlashVarlen`),
    is in torch's flash build before that too, and takes grouped K/V heads as they are. False where there is no flash
    kernel (a GPU before Ampere, ROCm, a build without it), where unsloth's varlen path is turned off
    (`UNSLOTH_TORCH_VARLEN=0`, `UNSLOTH_LEAN_VARLEN=0`), or where unsloth no longer has the parts named here: then
    it keeps its own choice.
    """
    import torch
    from unsloth.utils import attention_dispatch as dispatch

    flash = torch.backends.cuda.is_flash_attention_available() and torch.version.hip is None
    if not flash or torch.cuda.get_device_capability()[0] < 8:
        return False
    if getattr(dispatch, "_TORCH_VARLEN_ATTN", None) is not None:
        return True
    if any(os.environ.get(name, "1").lower() in ("0", "false", "no", "off") for name in VARLEN_SWITCHES):
        return False
    lean = getattr(dispatch, "_LeanFlashVarlen", None)
    if lean is None or not hasattr(dispatch, "_LEAN_VARLEN"):
        return False
    schema = str(torch.ops.aten._flash_attention_forward.default._schema)
    if "window_size_left" not in schema or "window_size_right" not in schema:
        return False

    def varlen_attn(
        query: Any,
        key: Any,
        value: Any,
        cu_seq_q: Any,
        cu_seq_k: Any,
        max_q: int,
        max_k: int,
        *,
        scale: float | None = None,
        window_size: tuple[int, int] = (-1, -1),
        enable_gqa: bool = False,
    ) -> Any:
        # unsloth passes one cu_seqlens for queries and keys, and grouped K/V heads unexpanded (enable_gqa)
        return lean.apply(query, key, value, cu_seq_q, max_q, tuple(window_size) == (-1, 0), scale, *window_size)

    dispatch._TORCH_VARLEN_ATTN = varlen_attn
    dispatch._LEAN_VARLEN = True
    dispatch._varlen_can_use_cudnn = lambda *args, **kwargs: False  # 2.11's varlen has no cuDNN path either
    return True


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
    """Write, beside the adapter's weights, the precision the base was trained in."""
    (adapter / PRECISION_FILE).write_text(json.dumps({"load_in_4bit": config.load_in_4bit}) + "\n", encoding="utf-8")


def trained_precision(config: ModelConfig, adapter: Path) -> ModelConfig:
    """`config` with the base's precision as the adapter was trained (its `PRECISION_FILE`).

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
    recorded = json.loads(path.read_text(encoding="utf-8"))["load_in_4bit"]
    if config.load_in_4bit not in ("auto", recorded):
        log.warning(
            "model.load_in_4bit is %s, but %s was trained on a base loaded with %s: loading it so",
            config.load_in_4bit,
            adapter,
            recorded,
        )
    return replace(config, load_in_4bit=recorded)


def mixed_precision() -> dict[str, bool]:
    """Trainer precision flags for this hardware: bf16 where the GPU has it, else fp16; none on the CPU."""
    import torch
    from unsloth import is_bfloat16_supported

    if not torch.cuda.is_available():
        return {"bf16": False, "fp16": False}
    bf16 = bool(is_bfloat16_supported())
    return {"bf16": bf16, "fp16": not bf16}
