"""The demo's tiny model carries DeepSeek's special tokens and renders the R1 distill chat template as published."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from demo.tiny_model import BOS, EOS, SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_two_turn_golden_rendering(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are an analyst."},
        {"role": "user", "content": "What is beta?"},
        {"role": "assistant", "content": "<think>\nrecall the definition\n</think>\n\nMarket sensitivity."},
        {"role": "user", "content": "And alpha?"},
        {"role": "assistant", "content": "Excess return."},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        f"{BOS}You are an analyst.<｜User｜>What is beta?<｜Assistant｜>\n\nMarket sensitivity.{EOS}"
        f"<｜User｜>And alpha?<｜Assistant｜>Excess return.{EOS}"
    )


def test_generation_prompt_opens_a_think_block(tokenizer) -> None:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == f"{BOS}<｜User｜>Hi<｜Assistant｜><think>\n"


def test_special_tokens_are_single_ids_and_pad_is_not_eos(tokenizer) -> None:
    for token in SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_rendered_text_tokenizes_with_one_bos(tokenizer) -> None:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    ids = tokenizer(text)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


@pytest.mark.slow  # builds the model
def test_architecture_is_a_gqa_llama(tiny_model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "llama"
    assert config.num_attention_heads // config.num_key_value_heads == 4  # as in the 8B distill (32 / 8)


@pytest.mark.slow  # builds the model
def test_the_command_writes_the_tests_model_byte_for_byte(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m demo.tiny_model` (run here as its `main`) writes the folder the end-to-end tests copy instead of
    running it: the same files, the same bytes."""
    from demo.tiny_model import main

    sample = Path(__file__).resolve().parents[1] / "data/sample/finance_instruct_sample.jsonl"
    monkeypatch.setattr("sys.argv", ["demo.tiny_model", str(sample), str(tmp_path / "tiny")])
    main()
    assert "-parameter model and a 1" in capsys.readouterr().out
    written = {path.name: path.read_bytes() for path in (tmp_path / "tiny").iterdir()}
    assert written == {path.name: path.read_bytes() for path in tiny_model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(written)
