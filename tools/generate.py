"""generate: answer a prompt with the base model and a trained adapter, streaming the tokens as they come.

    python -m tools.generate "What drives a bond's duration?"                 # models/adapter
    python -m tools.generate --run <mlflow run id> "What drives a bond's duration?"
    python -m tools.generate --system "You are a credit analyst." --max-new-tokens 512 "..."

The base model comes from `params.yaml`'s `model` section, loaded in the precision the adapter was trained in
(`finetune.model.load.trained_precision`). The question is asked as the training rows were: `--system` merged into
the user turn by `to_sharegpt.merged_prompt` (`finetune.data.conversion.user_turn`: "<question>\nYour input
is:\n<system>"), encoded by `finetune.tokens.chat` with the chat template saved with the adapter and `chat.think`
(a run's own, with `--run`): the same template, the same think block, the same token pieces as tokenize encoded.
Greedy by default; `--temperature` > 0 samples. Not a pipeline stage (it lives outside `stages/`): nothing is
written but the answer, on stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from finetune.config import cli
from finetune.config.params import load
from finetune.data.conversion import ToSharegptConfig, user_turn
from finetune.model.load import ModelConfig, load_with_adapter
from finetune.tokens.chat import Chat, ChatConfig
from finetune.tracking.store import store_root, tracking_uri

log = logging.getLogger("generate")


def messages(prompt: str, system: str | None, config: ToSharegptConfig) -> list[dict[str, str]]:
    """The question as a training row's user turn (`user_turn`): with the seed's settings `messages("Hi", "Be
    brief.", config)` -> `[{"role": "user", "content": "Hi\\nYour input is:\\nBe brief."}]`."""
    return [{"role": "user", "content": user_turn(prompt, system, config)}]


def trained_chat(workspace: ChatConfig, run_id: str | None, uri: str) -> ChatConfig:
    """The chat settings the adapter was trained with: no `template` (the adapter's tokenizer carries its own), and
    `think` as the MLflow run logged it (`--run`; a run that logged none, and a local adapter: the workspace's)."""
    think = workspace.think
    if run_id is not None:
        import mlflow

        think = mlflow.MlflowClient(uri).get_run(run_id).data.params.get("chat.think", think)
        if think != workspace.think:
            log.info("chat.think %s, as run %s trained (params.yaml: %s)", think, run_id, workspace.think)
    return replace(workspace, template=None, think=think)


def stream_answer(
    model: Any, chat: Chat, history: list[dict[str, str]], max_new_tokens: int, temperature: float
) -> list[int]:
    """Generate the next answer to `history`, printing it to stdout as it comes; returns its token ids."""
    import torch
    from transformers import TextStreamer

    ids = chat.prompt_ids(history)
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            max_new_tokens=max_new_tokens,
            pad_token_id=chat.tokenizer.pad_token_id,
            streamer=TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True),
            **sampling,
        )
    return output[0, len(ids) :].tolist()


def adapter_folder(adapter: Path | None, run_id: str | None, store: Path) -> Path:
    """The adapter to load: a local folder, or the `adapter` artifacts of an MLflow run (downloaded); either must
    hold an `adapter_config.json`."""
    if run_id is None:
        folder = adapter or Path("models/adapter")
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{folder}: no adapter_config.json; train first (dvc repro) or pass --run")
        return folder
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(os.environ, store)
    try:
        folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter", tracking_uri=uri))
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        mlflow.MlflowClient(uri).get_run(run_id)  # no such run: MLflow's "Run with id=... not found"
        raise FileNotFoundError(
            f"MLflow run {run_id} holds no adapter artifact (a failed or evaluate-only run): pick a FINISHED "
            "training run"
        ) from error
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{folder}: the adapter artifact of MLflow run {run_id} has no adapter_config.json: pick a FINISHED "
            "training run"
        )
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", help="the question")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings file (default params.yaml)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--adapter", type=Path, help="adapter folder (default models/adapter)")
    source.add_argument("--run", help="MLflow run id whose logged adapter to use")
    parser.add_argument("--system", help="system text, merged into the question as to_sharegpt merged the rows'")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest answer, reasoning included (512)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    args = parser.parse_args()
    cli.setup_logging()  # to stderr: stdout holds the answer alone
    cli.brief_errors("generate")
    cli.exit_without_collecting()

    import unsloth  # noqa: F401, I001  # isort: skip  # first: it patches transformers and peft
    from unsloth import FastLanguageModel

    store = store_root(os.environ, Path.cwd())
    history = messages(args.prompt, args.system, load(ToSharegptConfig, args.params, "to_sharegpt"))
    chat_config = trained_chat(load(ChatConfig, args.params, "chat"), args.run, tracking_uri(os.environ, store))
    folder = adapter_folder(args.adapter, args.run, store)
    model, tokenizer, model_config = load_with_adapter(load(ModelConfig, args.params, "model"), folder)
    log.info("base %s + adapter %s", model_config.model_name, folder)
    FastLanguageModel.for_inference(model)
    chat = Chat(tokenizer, chat_config)
    chat.check(padding=False)
    stream_answer(model, chat, history, args.max_new_tokens, args.temperature)


if __name__ == "__main__":
    main()
