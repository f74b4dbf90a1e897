"""tokenize: the token ids and labels of every training and held-out conversation, once, for train and evaluate.

    python -m stages.tokenize --data data/standardized --out data/tokenized --metrics metrics/tokenize.json

Each conversation is encoded by `finetune.tokens.chat` (the chat template, the think block, answer-only labels),
cut to or dropped over `model.max_seq_length` tokens (`finetune.tokens.encode`), and written to
`<out>/<split>.arrow` (Arrow IPC, the format `datasets` memory-maps: train and evaluate open it without a copy,
every rank of a multi-GPU run the same file) with the columns `row`, `input_ids`, `labels`, `prompt_length`; and
`<out>/chat_probe.json`, the ids of `finetune.tokens.chat.PROBE`, by which train checks that the model's own
tokenizer encodes as this stage did.

`metrics/tokenize.json` holds each split's length statistics before the cut (p50/p95/p99/max, total, how many exceed
the limit) and every conversation cut or dropped, counted by reason. The work is spread over every core this process
may run on, in shards of conversations (`finetune.tokens.shards`); the output depends on neither. Each training row
is a turn of several merged conversations, so each distinct piece of text is tokenized once (about half of them on
Finance-Instruct) and the conversations assembled from those ids.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from finetune.config import cli
from finetune.config.params import flatten, load, require
from finetune.config.workspace import require_in_copy
from finetune.data.files import write_json
from finetune.data.parallel import cores
from finetune.model.load import ModelConfig, load_tokenizer
from finetune.tokens.chat import PROBE, PROBE_FILE, Chat, ChatConfig
from finetune.tokens.encode import TokenizeConfig
from finetune.tokens.shards import tokenize_split

log = logging.getLogger("tokenize")


def main(params_path: Path, data: Path, out: Path, metrics: Path) -> None:
    # one thread per worker process, the processes on every core. Workers on the Rust tokenizer's threads too ran the
    # full data 6 % faster on 2 cores (561.7 s against 599.4 s) but peaked at 11.8 GB against 1.15 GB; and a worker
    # forked after the parent started those threads would deadlock.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    config = load(TokenizeConfig, params_path, "tokenize")
    model_config = load(ModelConfig, params_path, "model")
    chat_config = load(ChatConfig, params_path, "chat")
    settings = {
        **flatten("tokenize", config),
        "model.model_name": model_config.model_name,
        "model.revision": model_config.revision,
        "model.max_seq_length": model_config.max_seq_length,
        **flatten("chat", chat_config),
    }
    log.info("config: %s", settings)
    require_in_copy(model_config.model_name, "model.model_name", os.environ, Path.cwd())  # a folder git lacks
    chat = Chat(load_tokenizer(model_config), chat_config)
    chat.check(padding=False)  # the pad token is train's and evaluate's concern: they pad

    workers = cores()
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, int] = {}
    for split in ("train", "eval"):
        counts = tokenize_split(
            data / f"{split}.parquet", out / f"{split}.arrow", chat, model_config.max_seq_length, config, workers
        )
        require(
            counts["conversations"] > 0,
            f"{split}: every conversation was dropped ({counts}): raise model.max_seq_length, or set "
            "tokenize.over_length: truncate if it is drop",
        )
        report |= {f"{split}_{key}": value for key, value in counts.items()}
        log.info("%s: %s -> %s", split, counts, out / f"{split}.arrow")
    write_json(out / PROBE_FILE, {"input_ids": chat.encode(PROBE)[0]})  # train checks its tokenizer against it
    write_json(metrics, report)
    log.info("%d worker processes; metrics -> %s", workers, metrics)


if __name__ == "__main__":
    main(
        **cli.arguments(
            __doc__, data="folder of the standardized splits", out="folder of the Arrow files", metrics="JSON"
        )
    )
