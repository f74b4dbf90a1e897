"""tools/generate.py: the prompt is encoded as training encoded it, and the streamed answer is the greedy one."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from finetune.data.conversion import ToSharegptConfig
from finetune.evaluation.answers import generate
from finetune.model.load import ModelConfig, load_base
from finetune.tokens.chat import Chat, ChatConfig
from finetune.tracking.store import use_experiment
from tools.generate import adapter_folder, messages, stream_answer, trained_chat

pytestmark = pytest.mark.slow  # a model, unsloth, a subprocess or a server: not in make test-fast


SHAREGPT = ToSharegptConfig("{user}[[\nYour input is:\n{system}]]", "assistant", 3, 3407)  # params.yaml's


def test_a_system_text_is_merged_into_the_question_as_the_training_rows_were() -> None:
    """The training never saw a system turn: to_sharegpt merged each row's system text into its user turn."""
    assert messages("Hi", None, SHAREGPT) == [{"role": "user", "content": "Hi"}]
    assert messages("Hi", "Be brief.", SHAREGPT) == [{"role": "user", "content": "Hi\nYour input is:\nBe brief."}]


def test_the_chat_settings_are_the_runs_and_the_template_the_adapters(tmp_path: Path, mlflow_store: str) -> None:
    workspace = ChatConfig(template="{{ messages }}", think="empty_block")
    use_experiment(mlflow_store, "generate", tmp_path / "mlartifacts")
    with mlflow.start_run() as trained:
        mlflow.log_params({"chat.think": "none", "chat.template": "None"})
    with mlflow.start_run() as older:  # a run that logged no chat settings
        mlflow.log_params({"lora.r": 4})
    assert trained_chat(workspace, trained.info.run_id, mlflow_store) == ChatConfig(template=None, think="none")
    assert trained_chat(workspace, older.info.run_id, mlflow_store) == ChatConfig(template=None, think="empty_block")
    assert trained_chat(workspace, None, mlflow_store) == ChatConfig(template=None, think="empty_block")


def test_the_streamed_answer_is_the_greedy_answer_evaluate_scores(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, tokenizer = load_base(ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit=True, dtype=None))
    model = get_peft_model(model, PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    chat = Chat(tokenizer, ChatConfig())
    history = messages("What is a basis point?", "You are an analyst.", SHAREGPT)
    capsys.readouterr()  # what loading printed

    ids = stream_answer(model, chat, history, max_new_tokens=12, temperature=0.0)
    printed = capsys.readouterr().out
    assert 1 <= len(ids) <= 12
    assert printed.strip() == tokenizer.decode(ids, skip_special_tokens=True).strip()  # streamed as generated
    (scored,) = generate(model, tokenizer, [chat.prompt_ids(history)], max_new_tokens=12, batch_size=1)
    eos = tokenizer.eos_token_id
    assert scored.tokens == len(ids) and scored.text == tokenizer.decode(ids[:-1] if ids[-1] == eos else ids)


def test_a_missing_adapter_folder_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no adapter_config.json; train first"):
        adapter_folder(tmp_path / "adapter", None, tmp_path)


def test_an_mlflow_run_without_an_adapter_artifact_is_named(tmp_path: Path, mlflow_store: str) -> None:
    use_experiment(mlflow_store, "generate", tmp_path / "mlartifacts")
    with mlflow.start_run() as failed:  # a FAILED training's, or one evaluate made: no adapter logged
        mlflow.set_tag("stage", "evaluate")
    with mlflow.start_run() as partial:  # an adapter folder with its weights but no adapter_config.json
        (tmp_path / "weights").mkdir()
        (tmp_path / "weights" / "adapter_model.safetensors").write_bytes(b"")
        mlflow.log_artifacts(str(tmp_path / "weights"), artifact_path="adapter")
    with mlflow.start_run() as trained:
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
        mlflow.log_artifacts(str(tmp_path / "adapter"), artifact_path="adapter")

    run_id = failed.info.run_id
    with pytest.raises(FileNotFoundError) as missing:
        adapter_folder(None, run_id, tmp_path)
    assert str(missing.value) == (
        f"MLflow run {run_id} holds no adapter artifact (a failed or evaluate-only run): pick a FINISHED training run"
    )
    with pytest.raises(FileNotFoundError, match=rf"the adapter artifact of MLflow run {partial.info.run_id} has no "):
        adapter_folder(None, partial.info.run_id, tmp_path)
    assert (adapter_folder(None, trained.info.run_id, tmp_path) / "adapter_config.json").read_text() == "{}"
    with pytest.raises(MlflowException, match="Run with id=0123456789abcdef0123456789abcdef not found"):
        adapter_folder(None, "0123456789abcdef0123456789abcdef", tmp_path)  # no such run: MLflow says so
