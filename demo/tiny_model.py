"""Build a tiny random-weight model of the DeepSeek-R1-Distill-Llama architecture, for offline runs.

    python -m demo.tiny_model data/sample/finance_instruct_sample.jsonl models/tiny-deepseek

The model is a 2-layer Llama with grouped-query attention (the 8B distill's layout, scaled down), and the
tokenizer is a byte-level BPE trained on the sample's text on the fly, carrying DeepSeek's special tokens
and the R1 distill chat template as published. Nothing is downloaded. The same inputs give the same folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]

# DeepSeek-R1-Distill's chat template as published in its tokenizer_config.json: BOS, the system text with no
# role tag, then <｜User｜>question<｜Assistant｜>answer<｜end▁of▁sentence｜> per turn; reasoning up to </think> is
# stripped from assistant turns, and the generation prompt opens a think block.
DEEPSEEK_R1_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE on `texts` and wrap it as a DeepSeek-style fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=2048,
        padding_side="left",
        add_bos_token=False,
        add_eos_token=False,
    )
    tokenizer.chat_template = DEEPSEEK_R1_CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, hidden_size: int, num_layers: int, seed: int):
    """A random-weight LlamaForCausalLM shaped like the 8B distill (GQA 4:1, SwiGLU, RoPE), scaled down."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 7 // 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        # wider than Llama's 0.02: behind a 64-wide RMS-normed state, 0.02 caps every logit near 1, so no adapter
        # could make any token likely; at 0.1 a LoRA can learn a peaked distribution on a toy task
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def corpus_tokenizer(corpus: Path, vocab_size: int = 1024):
    """The demo's tokenizer trained on the system, user and assistant texts of `corpus` (JSON lines): the one of the
    tiny model, the tests and the speed scripts' shapes."""
    rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    return train_tokenizer([row[column] for row in rows for column in ("system", "user", "assistant")], vocab_size)


def write(
    corpus: Path, output: Path, vocab_size: int = 1024, hidden_size: int = 64, layers: int = 2, seed: int = 0
) -> str:
    """Build the tokenizer on `corpus`' texts and the model, and save both to `output`; what was written, in words.
    The command and the tests' tiny model (`tests/conftest.py`) both come from here."""
    tokenizer = corpus_tokenizer(corpus, vocab_size)
    model = build_model(tokenizer, hidden_size, layers, seed)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    model.generation_config.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return f"wrote a {model.num_parameters():,}-parameter model and a {len(tokenizer)}-token tokenizer to {output}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path, help="JSONL rows with system/user/assistant text to train the BPE on")
    parser.add_argument("output", type=Path)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write(args.corpus, args.output, args.vocab_size, args.hidden_size, args.layers, args.seed))


if __name__ == "__main__":
    main()
