"""Benchmark: fetch -> to_sharegpt -> standardize -> tokenize on 518,185 rows shaped like Finance-Instruct-500k.

    python -m perf.data_stages [--params params.yaml] [--rows 518185] [--work /tmp/bench-data] [--cores 1,2]

Generates rows with the real data's length mix (answers ~1 kB, questions ~400 B, a quarter of the system
prompts non-empty, many `"\\n"`), runs each stage of this project as its own process (`python -m stages.<name>`,
as `dvc repro` does) with the settings of `--params` (its `fetch.dataset` the generated rows, its `model.model_name`
the tokenizer's folder), and, in the same run:
- the seed's way: unsloth's `to_sharegpt` (with the `to_sharegpt` settings: merged prompt, answer column,
  `conversation_extension`, seed) then `standardize_sharegpt`, called directly, and whether the project's training
  conversations equal the seed's;
- the tokenize stage on each number of cores of `--cores` (pinned with `taskset`), against the tokenizer's own
  batch encode of the same text (the conversations rendered as the chat template renders them, untimed; then the
  Rust core's `encode_batch_fast`, timed, on the same cores, all of them busy: `tokenizer(texts)` calls it and adds
  offsets, so it is the faster of the two).
Prints the settings the stages ran (read back from the settings file they read), then wall time and peak resident
memory per step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

WORDS = (
    "revenue margin equity bond yield coupon duration hedge option futures swap liquidity capital dividend "
    "portfolio risk return volatility beta alpha inflation rate credit default spread leverage asset liability "
    "cash flow valuation discount earnings ratio market index fund tax depreciation amortization"
).split()


def text(rng: random.Random, n_bytes: int) -> str:
    words: list[str] = []
    size = 0
    while size < n_bytes:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def make_rows(n: int, seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    columns: dict[str, list[str]] = {"system": [], "user": [], "assistant": []}
    for _ in range(n):
        kind = rng.random()
        system = text(rng, int(rng.expovariate(1 / 300)) + 20) if kind < 0.25 else "\n" if kind < 0.6 else ""
        columns["system"].append(system)
        columns["user"].append(text(rng, int(rng.expovariate(1 / 400)) + 10))
        columns["assistant"].append(text(rng, int(rng.expovariate(1 / 1000)) + 10))
    return columns


def single_turns(n: int, seed: int) -> list[list[dict[str, str]]]:
    """`n` generated rows as the data stages turn them into one-turn conversations (merged prompt, roles)."""
    columns = make_rows(n, seed)
    return [
        [
            {"role": "user", "content": f"{user}\nYour input is:\n{system}" if system.strip() else user},
            {"role": "assistant", "content": answer},
        ]
        for system, user, answer in zip(columns["system"], columns["user"], columns["assistant"], strict=True)
    ]


def measured(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run `command`, its output to `log`; return its wall seconds and peak resident memory in GB."""
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed, see {log}:\n{log.read_text()[-3000:]}")
    return wall, usage.ru_maxrss / 1024**2


TOKENIZER_OWN = """
import json, os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "true"
import pyarrow.parquet as pq
from transformers import AutoTokenizer
from finetune.tokens.chat import Chat, ChatConfig
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
chat = Chat(tokenizer, ChatConfig(**json.loads(sys.argv[3])))
timed, tokens = 0.0, 0
for split in ("train", "eval"):
    for batch in pq.ParquetFile(f"{sys.argv[1]}/{split}.parquet").iter_batches(batch_size=2048):
        texts = ["".join(t for t, _ in chat.fast_pieces(c)) for c in batch.column("conversations").to_pylist()]
        start = time.perf_counter()
        ids = [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        timed += time.perf_counter() - start
        tokens += sum(map(len, ids))
print(timed, tokens)
"""

SEED_STYLE = """
import json, sys, unsloth
from datasets import Dataset
from unsloth import standardize_sharegpt
from unsloth.chat_templates import to_sharegpt
rows = Dataset.from_parquet(sys.argv[1])
rows = rows.map(lambda b: {"system": ["" if not s.strip() else s for s in b["system"]]}, batched=True)
out = to_sharegpt(rows, **json.loads(sys.argv[3]))
standardize_sharegpt(out).to_parquet(sys.argv[2])
"""


def header(rows: int, settings: Path, tokenizer: Path) -> str:
    """What the stages ran: the settings that shape the work, read back from the file they read."""
    from finetune.config.params import load
    from finetune.data.cleaning import FetchConfig
    from finetune.data.conversion import ToSharegptConfig
    from finetune.model.load import ModelConfig
    from finetune.tokens.chat import ChatConfig
    from finetune.tokens.encode import TokenizeConfig

    fetch, sharegpt = load(FetchConfig, settings, "fetch"), load(ToSharegptConfig, settings, "to_sharegpt")
    tokenize, model = load(TokenizeConfig, settings, "tokenize"), load(ModelConfig, settings, "model")
    chat = load(ChatConfig, settings, "chat")
    return (
        f"{rows:,} rows generated, fetch.eval_size {fetch.eval_size}, drop_duplicates {fetch.drop_duplicates}, "
        f"to_sharegpt.conversation_extension {sharegpt.conversation_extension}, tokenize.over_length "
        f"{tokenize.over_length}, train_on_responses_only {tokenize.train_on_responses_only}, model.max_seq_length "
        f"{model.max_seq_length}, chat.think {chat.think}, tokenizer of {tokenizer}; {os.cpu_count()} cores"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings file, as the stages read")
    parser.add_argument("--rows", type=int, default=518_185)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-data"))
    parser.add_argument("--skip-seed", action="store_true", help="leave out the seed-style baseline")
    parser.add_argument(
        "--cores", default=str(len(os.sched_getaffinity(0))), help='core counts to tokenize on ("": none)'
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="model folder whose tokenizer and chat template tokenize encodes with (default: the demo's tiny model, "
        "whose 1,024-token vocabulary makes ~2x more tokens per byte than the 8B model's 128k, so slower)",
    )
    parser.add_argument("--reuse", action="store_true", help="tokenize the data stages' output of an earlier run")
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)  # internal: write the rows and exit
    args = parser.parse_args(argv)
    if args.generate:
        from datasets import Dataset

        Dataset.from_dict(make_rows(args.rows, seed=0)).to_parquet(str(args.generate))
        return
    root = Path(__file__).resolve().parents[1]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_DATASETS_CACHE": str(work / "hf-cache")}

    # rows are made in a child process: a fork inherits its parent's peak RSS, so this process stays small
    source = work / "rows.parquet"
    python = sys.executable
    generate = [python, "-m", "perf.data_stages", "--rows", str(args.rows), "--generate", str(source)]
    if not (args.reuse and source.is_file()):
        subprocess.run(generate, check=True, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = work / "tiny-deepseek"
        sample = root / "data" / "sample" / "finance_instruct_sample.jsonl"
        build = [python, "-m", "demo.tiny_model", str(sample), str(tokenizer)]
        subprocess.run(build, check=True, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    params = yaml.safe_load(args.params.read_text(encoding="utf-8"))
    params["fetch"] |= {"dataset": str(source.resolve()), "revision": None}
    params["model"] |= {"model_name": str(tokenizer.resolve()), "revision": None}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    def stage(name: str, **paths: str) -> list[str]:  # as dvc.yaml runs it, the paths relative to `work`
        flags = [item for key, value in paths.items() for item in (f"--{key}", value)]
        return [python, "-m", f"stages.{name}", "--params", "params.yaml", *flags, "--metrics", f"{name}.json"]

    steps = {
        "fetch": stage("fetch", sources=".", out="raw"),  # the generated rows.parquet is in `work`
        "to_sharegpt": stage("to_sharegpt", data="raw", out="sharegpt"),
        "standardize": stage("standardize", data="sharegpt", out="standardized"),
    }
    if args.reuse and (work / "standardized" / "train.parquet").is_file():
        steps = {}  # the data stages' output of an earlier run: tokenize alone
    results = {name: measured(command, work, env, work / f"{name}.log") for name, command in steps.items()}
    total = sum(wall for wall, _ in results.values())
    peak = max((rss for _, rss in results.values()), default=0.0)
    print(f"\n{header(args.rows, work / 'params.yaml', tokenizer)}\n")
    print("| step | wall s | peak RSS GB |\n|---|---|---|")
    for name, (wall, rss) in results.items():
        print(f"| {name} | {wall:.1f} | {rss:.2f} |")
    print(f"| **project, three data stages** | **{total:.1f}** | **{peak:.2f}** |")
    if not args.skip_seed:
        seed_out = work / "seed.parquet"
        # the to_sharegpt settings the stage ran, passed to unsloth's function of the same arguments
        options = json.dumps(params["to_sharegpt"])
        seed_command = [python, "-c", SEED_STYLE, str(work / "raw" / "train.parquet"), str(seed_out), options]
        wall, rss = measured(seed_command, work, env, work / "seed.log")
        from datasets import Dataset

        print(f"| seed style (unsloth to_sharegpt + standardize_sharegpt, training rows) | {wall:.1f} | {rss:.2f} |")
        dropped = json.loads((work / "to_sharegpt.json").read_text(encoding="utf-8"))["train_dropped_same_as_held_out"]
        if dropped:  # the seed style keeps them: its conversations are other merges of other rows
            print(f"\ntraining conversations not compared: to_sharegpt dropped {dropped} held-out copies")
        else:
            ours = Dataset.from_parquet(str(work / "standardized" / "train.parquet"))["conversations"]
            theirs = Dataset.from_parquet(str(seed_out))["conversations"]
            print(f"\ntraining conversations identical to the seed style: {ours == theirs}")
    print("\n| tokenize | cores | wall s | peak RSS GB |\n|---|---|---|---|")
    stats = {}
    for cores in [int(n) for n in args.cores.split(",") if n]:  # --cores "": the data stages alone
        pinned = ["taskset", "-c", f"0-{cores - 1}"] if cores < len(os.sched_getaffinity(0)) else []
        tokenize = [*pinned, *stage("tokenize", data="standardized", out="tokenized")]
        wall, rss = measured(tokenize, work, env, work / "tok.log")
        print(f"| the stage, process start to end | {cores} | {wall:.1f} | {rss:.2f} |", flush=True)
        chat = json.dumps(params["chat"])  # the same chat settings as the stage: the same text
        own = [*pinned, python, "-c", TOKENIZER_OWN, str(work / "standardized"), str(tokenizer), chat]
        output = subprocess.run(own, check=True, env=env, cwd=root, capture_output=True, text=True).stdout.split()
        fast, tokens = float(output[-2]), int(output[-1])
        stats = json.loads((work / "tokenize.json").read_text())
        written = stats["train_tokens_total"] + stats["eval_tokens_total"]
        print(f"| the tokenizer's own batch encode (`encode_batch_fast`), same text | {cores} | {fast:.1f} | |")
        print(f"|   stage / tokenizer: {wall / fast:.2f}; tokens: stage {written:,}, tokenizer {tokens:,} | | | |")
    if stats:
        print("\ntraining conversations, tokens:", {k: v for k, v in stats.items() if k.startswith("train_tokens")})


if __name__ == "__main__":
    main()
