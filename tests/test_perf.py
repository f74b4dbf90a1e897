"""perf/: every speed script runs as a user runs it, on the tiny shape on the CPU, small sizes, nothing timed; the
table's header shows the settings it ran (read from the params file it was given, not written into the script).

The settings file differs from params.yaml where the header shows it (`lora.r` 8, not 4; other targets, alpha,
sequence length, `benchmarks.ngram`), so a header that describes params.yaml's values instead of the run's fails.
`gaps` has its own tests (tests/test_gaps.py); GPU-only setups (train_speed's `plain`, several processes) are
skipped by the script on the CPU, which the test checks it says.
"""

from __future__ import annotations

import json
import math
import re
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "finance_instruct_sample.jsonl"  # the corpus of the shapes' tokenizer
LORA = {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj", "down_proj"]}  # params.yaml: 4, 16, q/k/v/o


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def settings(folder: Path, **sections: dict[str, Any]) -> Path:
    """params.yaml with `sections`' keys overridden, written to `folder`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for section, values in sections.items():
        params[section] |= values
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_shape(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny shape, built once by `python -m perf.shapes` (the scripts build it in `--work` unless it is there)."""
    from perf.shapes import main

    folder = tmp_path_factory.mktemp("shapes") / "tiny"
    main(["tiny", str(folder), "--corpus", str(SAMPLE)])
    return folder


@pytest.fixture(scope="session")
def tiny_4bit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny shape pre-quantized 4-bit (`python -m perf.shapes tiny ... --four-bit`), built once on the CPU."""
    from perf.shapes import main

    folder = tmp_path_factory.mktemp("shapes") / "tiny-4bit"
    main(["tiny", str(folder), "--corpus", str(SAMPLE), "--four-bit"])
    return folder


def work_with(tmp_path: Path, tiny_shape: Path) -> Path:
    """A work folder holding the tiny shape already (a link: it is built once per session)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "tiny").symlink_to(tiny_shape, target_is_directory=True)
    return work


def test_shapes_writes_the_shape_it_names(tiny_shape: Path) -> None:
    from perf.shapes import SHAPES, described

    config = json.loads((tiny_shape / "config.json").read_text(encoding="utf-8"))
    spec = SHAPES["tiny"]
    assert (config["model_type"], config["hidden_size"]) == (spec["architecture"], spec["hidden_size"])
    assert (config["num_hidden_layers"], config["num_key_value_heads"]) == (2, 1)
    assert (tiny_shape / "tokenizer.json").is_file() and (tiny_shape / "model.safetensors").is_file()
    assert described(tiny_shape) == "llama, hidden 64, 2 layers, 4 heads (1 key/value), MLP 224, vocabulary 1,024"


def test_every_shape_has_its_distills_published_parameter_count() -> None:
    """The shapes are the R1 distills' (their model cards' sizes: 1.78 B, 7.62 B, 8.03 B, 14.8 B, 32.8 B, 70.6 B),
    counted on the meta device, so that a wrong width, depth or head count shows."""
    from perf.shapes import SHAPES, parameters

    published = {
        "qwen-1.5b": 1.78e9,
        "qwen-7b": 7.62e9,
        "llama-8b": 8.03e9,
        "qwen-14b": 14.8e9,
        "qwen-32b": 32.8e9,
        "llama-70b": 70.6e9,
    }
    assert set(SHAPES) == {"tiny", *published}
    for shape, count in published.items():
        assert parameters(shape) == pytest.approx(count, rel=0.005), shape


def test_a_4bit_shape_loads_as_the_stages_load_it_with_its_linear_layers_in_4_bit(tiny_4bit: Path) -> None:
    import bitsandbytes as bnb
    import torch

    from finetune.model.load import ModelConfig, load_base
    from perf.shapes import described, parameters

    model, tokenizer = load_base(ModelConfig(str(tiny_4bit), None, 256, load_in_4bit=True, dtype=None))
    linear = {name: type(module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert linear.pop("lm_head") is torch.nn.Linear  # the output layer stays bf16, as transformers keeps it
    assert len(linear) == 2 * 7 and set(linear.values()) == {bnb.nn.Linear4bit}
    assert model.num_parameters() == parameters("tiny")  # transformers counts a 4-bit weight's values, not bytes
    ids = tokenizer("What is a bond?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 1024) and torch.isfinite(logits).all()
    assert described(tiny_4bit).endswith(", vocabulary 1,024, pre-quantized 4-bit (NF4)")


def test_a_4bit_shape_is_written_as_transformers_writes_a_4bit_model(tmp_path: Path, tiny_4bit: Path) -> None:
    """transformers loads the folder in 4-bit and saves it again byte for byte: the same tensors, names and
    layout (`save_original_format=False`: this transformers cannot revert its 4-bit load's conversion)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_4bit, device_map={"": "cpu"})
    assert model.is_loaded_in_4bit
    model.save_pretrained(tmp_path, save_original_format=False)
    assert (tmp_path / "model.safetensors").read_bytes() == (tiny_4bit / "model.safetensors").read_bytes()
    config, saved = (json.loads((path / "config.json").read_text(encoding="utf-8")) for path in (tiny_4bit, tmp_path))
    assert config == saved and config["quantization_config"]["quant_method"] == "bitsandbytes"


def test_a_4bit_build_is_seeded_and_its_shards_indexed(tmp_path: Path, tiny_4bit: Path) -> None:
    """Built twice with the seed, in shards of 100 kB: the same bytes each time, and the same tensors as the
    single-file build; the index names every tensor's file and the bytes."""
    from safetensors.torch import load_file

    from perf.shapes import build

    for folder in (tmp_path / "a", tmp_path / "b"):
        build("tiny", folder, SAMPLE, four_bit=True, shard_bytes=100_000)
    files = sorted(path.name for path in (tmp_path / "a").iterdir())
    assert files == sorted(path.name for path in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes() for name in files)
    shards = [name for name in files if name.endswith(".safetensors")]
    # the embedding (131 kB, alone), the two layers and the last norm, the output layer (alone)
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)], files
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text(encoding="utf-8"))
    tensors = {name: tensor for shard in shards for name, tensor in load_file(tmp_path / "a" / shard).items()}
    whole = load_file(tiny_4bit / "model.safetensors")
    assert tensors.keys() == whole.keys() == index["weight_map"].keys()
    assert all(name in load_file(tmp_path / "a" / file) for name, file in index["weight_map"].items())
    assert all(tensors[name].dtype == whole[name].dtype and tensors[name].equal(whole[name]) for name in whole)
    assert index["metadata"]["total_size"] == sum(tensor.nbytes for tensor in tensors.values())


def test_shards_hold_each_module_whole_up_to_the_limit() -> None:
    import torch

    from perf.quantized import shards

    states = [{name: torch.zeros(size, dtype=torch.uint8)} for name, size in (("a", 2), ("b", 2), ("c", 3), ("d", 5))]
    assert [list(shard) for shard in shards(states, 4)] == [["a", "b"], ["c"], ["d"]]  # d alone, over the limit


def test_a_4bit_shape_takes_half_a_byte_a_linear_weight_on_disk(tiny_4bit: Path) -> None:
    """On disk: NF4 codes, half a byte a linear weight; an 8-bit scale a block of 64 and a float32 scale of those
    a block of 256 of them; a layer's code tables (16 and 256 float32); embeddings and output layer in bf16. Headers
    and norms take the rest (4 % on the tiny shape). The bf16 tiny shape's file is 44 % over this prediction (the
    embeddings are most of it); on the 1.5B shape the prediction was within 0.1 % (1.61 GB)."""
    from finetune.model.fit import model_shape
    from finetune.model.load import ModelConfig

    shape = model_shape(ModelConfig(str(tiny_4bit), None, 256, load_in_4bit=True, dtype=None))  # as the stages read it
    linear, layers = shape.linear_parameters, 7 * shape.layers
    predicted = linear / 2 + linear / 64 + 4 * linear / (64 * 256) + layers * (16 + 256) * 4
    predicted += 2 * shape.embedding_parameters
    on_disk = sum(path.stat().st_size for path in tiny_4bit.glob("*.safetensors"))
    assert on_disk == pytest.approx(predicted, rel=0.05)


def test_a_speed_script_refuses_a_16_bit_load_of_a_4bit_shape(
    tmp_path: Path, tiny_shape: Path, tiny_4bit: Path
) -> None:
    """Before any setup runs: a setup of `load_in_4bit: false` on a pre-quantized folder names the setting and the
    folder (`finetune.model.fit.resolved`, as the train stage decides). `auto` and true load it in 4-bit; a bf16
    folder keeps a false."""
    import dataclasses

    from finetune.model.fit import resolved
    from finetune.model.load import ModelConfig
    from perf.train_speed import main

    work = work_with(tmp_path, tiny_4bit)
    params = settings(tmp_path, model={"load_in_4bit": "auto"})
    refused = rf"model.load_in_4bit is false, but {work / 'tiny'} is a pre-quantized 4-bit checkpoint"
    with pytest.raises(ValueError, match=refused):
        main(["--params", str(params), "--shape", "tiny", "--work", str(work), "--setups", "bare,project-16bit-nogc"])
    config = ModelConfig(str(tiny_4bit), None, 256, load_in_4bit="auto", dtype=None)
    assert resolved(config).load_in_4bit is True
    assert resolved(dataclasses.replace(config, load_in_4bit=True)).load_in_4bit is True
    with pytest.raises(ValueError, match=rf"model.load_in_4bit is false, but {tiny_4bit} is a pre-quantized"):
        resolved(dataclasses.replace(config, load_in_4bit=False))
    assert resolved(dataclasses.replace(config, model_name=str(tiny_shape), load_in_4bit=False)).load_in_4bit is False


def test_train_speed_prints_the_lora_and_length_it_trained_with(
    tmp_path: Path, tiny_shape: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from perf.train_speed import main

    params = settings(tmp_path, lora=LORA, model={"max_seq_length": 256})
    arguments = ["--params", str(params), "--shape", "tiny", "--work", str(work_with(tmp_path, tiny_shape))]
    arguments += ["--setups", "project,bare,plain", "--steps", "7", "--warmup", "2", "--batch", "2"]
    status = main([*arguments, "--profile", "--processes", "1,2"])
    out, err = capfd.readouterr()

    assert status == 0, out[-3000:] + err[-5000:]
    assert "LoRA r 8, alpha 32, dropout 0.0 on down_proj/q_proj/v_proj" in out  # as the models carried it
    assert "max_seq_length 256, " in out and "batch 2 conversations per step, 7 steps (2 untimed)" in out
    assert f"settings of {params}" in out
    assert "| project | 1 | load_in_4bit True, use_gradient_checkpointing unsloth, per_device_train_batch_size 2" in out
    assert "| bare | 1 | " in out
    head, _, *lines = out[out.index("| setup |") :].splitlines()
    cells = [[cell.strip() for cell in line[1:-1].split("|")] for line in [head, *lines] if line.startswith("| ")]
    rows = {(row["setup"], row["processes"]): row for row in (dict(zip(cells[0], c, strict=True)) for c in cells[1:])}
    row, bare = rows[("project", "1")], rows[("bare", "1")]
    slowest, median = (float(seconds) for seconds in row["slowest / median step s"].split(" / "))
    assert float(row["timed s"]) > slowest >= median > 0  # 5 timed steps
    assert row["allocator retries"] == "0" if not cuda() else row["allocator retries"].isdigit()
    project_rate, bare_rate = (float(r["effective tokens/s (median of 1)"].replace(",", "")) for r in (row, bare))
    assert float(row["× bare"].rstrip("×")) == pytest.approx(project_rate / bare_rate, abs=2e-3)
    assert bare["× bare"] == "1.000×"  # the same LoRA: the bare loop over itself
    assert "profile of steps 5-7" in out and "where the GPU waited" in out
    if cuda():
        assert "| plain | 1 | " in out
    else:
        assert "plain: skipped, it needs a CUDA GPU" in out
        assert "project on 2 processes: skipped, it needs 2 GPUs and this machine has 0" in out
    assert "LoRA r 4" not in out


def test_train_speed_runs_a_setup_with_the_lora_named_and_says_which_it_carried(
    tmp_path: Path, tiny_shape: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from perf.train_speed import main

    params = settings(tmp_path, lora=LORA, model={"max_seq_length": 256})
    arguments = ["--params", str(params), "--shape", "tiny", "--work", str(work_with(tmp_path, tiny_shape))]
    setups = "project-tokens-peft-addmm,project-tokens-pad64"  # perf.lora_paths' paths, over the `auto` settings
    status = main([*arguments, "--setups", setups, "--loras", "all-r16-a32", "--steps", "3", "--warmup", "1"])
    out, err = capfd.readouterr()
    assert status == 0, out[-3000:] + err[-5000:]
    # r, alpha and targets from all-r16-a32, dropout from the settings file
    assert "LoRA r 16, alpha 32, dropout 0.0 on down_proj/gate_proj/k_proj/o_proj/q_proj/up_proj/v_proj" in out
    assert "| project-tokens-peft-addmm (all-r16-a32) | 1 | " in out
    assert "| project-tokens-pad64 (all-r16-a32) | 1 | " in out
    assert "LoRA r 8" not in out and "peft LoRA layers padded: 14" in out  # 7 projections in each of 2 layers
    assert "peft's LoRA layers through unsloth's addmm forward: True" in out
    # on the CPU no block compiles, whatever the LoRA, and unsloth fuses no LoRA function
    assert out.count("padding-free batches into compiled blocks of: []") == 2
    assert out.count("decoder layers that trained compiled (unsloth's block compile, CUDA only): 0 of 2") == 2
    assert out.count("LoRA back to peft's layers from unsloth's fused functions: 0 MLPs, 0 attentions") == 2


def test_the_one_pass_setup_takes_a_steps_conversations_in_one_micro_batch_without_checkpointing(
    tmp_path: Path, tiny_shape: Path
) -> None:
    from finetune.training.distributed import World
    from perf.train_measure import configs
    from perf.train_speed import SETUPS, setup_configs

    loaded = configs(settings(tmp_path), tiny_shape, batch=16, steps=4)
    for world, per_process in ((World(0, 0, 1), 16), (World(1, 1, 2), 8)):
        model, lora, train = setup_configs(loaded, SETUPS["project-auto-one-pass"][1], world)
        assert (lora.use_gradient_checkpointing, train.per_device_train_batch_size) == (False, per_process)
        # `auto`: without a GPU the seed's 4-bit; on one, 16 bits (the tiny shape's weights fit any GPU)
        assert train.gradient_accumulation_steps == 1 and model.load_in_4bit is not cuda()
    # the settings file's own setup keeps its checkpointing (params.yaml: "unsloth")
    _, lora, _ = setup_configs(loaded, SETUPS["project"][1], World(0, 0, 1))
    assert lora.use_gradient_checkpointing == "unsloth"


def test_the_step_clock_gives_each_step_the_tokens_it_trained_on(
    tmp_path: Path, tiny_shape: Path, mlflow_store: str
) -> None:
    """The speed tables' tokens: each step counts its own micro-batches, as the trainer's token count does. accelerate's
    data loader collates one batch ahead, so a count at the collator gave each step the next one's first micro-batch
    and left the timed steps one short (BENCHMARKS.md, session 23)."""
    from examples import tiny_training
    from unsloth import FastLanguageModel

    from finetune.model.load import ModelConfig, load_base
    from finetune.tokens.chat import Chat, ChatConfig
    from finetune.tokens.encode import tokenized
    from finetune.training.config import LoraConfig
    from finetune.training.trainer import build_trainer
    from perf.train_measure import clocked

    config = ModelConfig(str(tiny_shape), None, 256, load_in_4bit=False, dtype=None)
    model, tokenizer = load_base(config)
    model = FastLanguageModel.get_peft_model(model, **LoraConfig(**LORA).__dict__)
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:12]]
    conversations = [
        [{"role": "user", "content": r["user"]}, {"role": "assistant", "content": r["assistant"]}] for r in rows
    ]
    data = tokenized(Chat(tokenizer, ChatConfig()), conversations, config.max_seq_length)
    train = tiny_training(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3)
    trainer = build_trainer(model, tokenizer, data, config, train, tmp_path / "out")
    clock = clocked(trainer)
    trainer.train()

    seen = [0] + [entry["num_input_tokens_seen"] for entry in trainer.state.log_history if "loss" in entry]
    assert [real for real, _ in clock.steps] == [after - before for before, after in pairwise(seen)]
    assert sum(real for real, _ in clock.steps) == sum(len(ids) for ids in data["input_ids"])  # 3 steps: one epoch


def test_train_speed_refuses_an_unknown_setup_or_lora_and_a_profile_too_short(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from perf.train_speed import LORAS, SETUPS, main

    for arguments, message in (
        (["--setups", "project,fast"], f"--setups: unknown fast; known: {', '.join(SETUPS)}"),
        (["--loras", "params,all-r64"], f"--loras: unknown all-r64; known: {', '.join(LORAS)}"),
        (
            ["--setups", "project", "--profile", "--steps", "6"],
            "--profile records steps 5-7: --steps must be at least 7",
        ),
    ):
        with pytest.raises(SystemExit) as refused:
            main(arguments)
        assert refused.value.code == 2  # argparse's usage error
        assert f"error: {message}\n" in capsys.readouterr().err, arguments


def test_evaluate_speed_runs_the_three_stages_and_prints_what_they_ran(
    tmp_path: Path, tiny_shape: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from perf.evaluate_speed import main

    evaluate = {"batch_tokens": 512, "generate_batch_size": 2, "benchmark_batch_tokens": 8192}
    # the FinQA stand-in's ~1,000 tokens of the shape's tokenizer fit params.yaml's max_seq_length (2,048)
    params = settings(tmp_path, lora=LORA, evaluate=evaluate, benchmarks={"max_new_tokens": 3})
    work = work_with(tmp_path, tiny_shape)
    main(
        ["--params", str(params), "--shape", "tiny", "--work", str(work), "--rows", "6", "--samples", "2"]
        + ["--max-new-tokens", "4", "--benchmark-items", "5"]
    )
    out = capfd.readouterr().out

    header = next(line for line in out.splitlines() if line.startswith("tiny ("))
    assert "base in 4-bit" in header and "max_seq_length 2048" in header
    assert "LoRA r 8, alpha 32 on down_proj/q_proj/v_proj" in header  # the adapter's own config
    assert "2 samples x max_new_tokens 4, generate_batch_size 2, benchmark_batch_tokens 8192" in header
    assert "batch_tokens 512, " in header and "benchmarks ngram 13, max_new_tokens 3;" in header
    head, _, values = [line for line in out.splitlines() if line.startswith("|")][-3:]
    row = dict(zip(head.strip("| ").split(" | "), values.strip("| ").split(" | "), strict=True))
    assert (row["fpb items"], row["fiqa_sa items"], row["tfns items"], row["samples answered"]) == ("5", "5", "5", "2")
    generated = [int(n) for n in row["finqa tokens generated an item (base / tuned)"].split(" / ")]
    assert row["finqa items"] == "5" and all(0 < n <= 3 for n in generated), generated  # benchmarks.max_new_tokens
    assert float(row["evaluate stage wall s"]) >= float(row["evaluation s"]) > 0
    assert row["peak GPU GiB"] != "-" if cuda() else row["peak GPU GiB"] == "-"
    assert len((work / "benchmarks" / "fpb" / "sentences_50agree" / "train.jsonl").read_text().splitlines()) == 5


def test_the_benchmark_stand_ins_load_as_the_stage_loads_them_at_their_real_sizes(tmp_path: Path) -> None:
    """Each preset's stand-in, in its Hub schema and of its published size, is read by the benchmarks stage's own
    loader and label mapping (no model: the scoring itself is the evaluate_speed run's)."""
    from finetune.evaluation.benchmark_sets import benchmark_rows
    from perf.evaluate_speed import load_sets, settings_file
    from perf.stand_ins import REAL_ITEMS, benchmark_items
    from stages.benchmarks import load_set

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    written, items = settings_file(params, tmp_path / "tiny", tmp_path / "benchmarks", {}, "real")
    assert items == REAL_ITEMS == {"fpb": 4846, "fiqa_sa": 234, "tfns": 2388, "finqa": 1147}
    for i, bench in enumerate(load_sets(written)):
        dataset, provenance = load_set(bench, f"benchmarks.sets[{i}]", (tmp_path / "benchmarks",))
        rows = benchmark_rows(bench, dataset, f"benchmarks.sets[{i}]")
        assert len(rows) == items[bench.name] and "sha256" in provenance  # a local folder, not the Hub
        if bench.kind == "labels":
            assert {row["label"] for row in rows} == set(bench.labels)
    finqa = rows  # the last set: FinQA's questions in FLARE's layout, ~900 words and a table of numbers
    assert finqa[0]["text"].startswith("Please answer the given financial question based on the context.\nContext: ")
    assert all(row["text"].endswith("?\nAnswer:") and row["text"].count("\n|") == 7 for row in finqa)
    assert 800 < sum(len(row["text"].split()) for row in finqa) / len(finqa) < 1000
    assert 0 < sum(isinstance(row["answer"], str) for row in finqa) < 60  # a few yes/no, numbers the rest
    fiqa = [json.loads(line) for line in (tmp_path / "benchmarks" / "fiqa_sa" / "test.jsonl").open()]
    assert all(-1 <= row["score"] <= 1 for row in fiqa) and set(fiqa[0]) == {"sentence", "score"}
    with pytest.raises(ValueError, match="no real size known for 'headlines'"):
        benchmark_items("real", "headlines")


def test_data_stages_runs_the_stages_with_the_settings_it_prints(
    tmp_path: Path, tiny_shape: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from perf.data_stages import main

    params = settings(
        tmp_path, fetch={"eval_size": 20}, to_sharegpt={"conversation_extension": 2}, model={"max_seq_length": 512}
    )
    arguments = ["--params", str(params), "--rows", "150", "--work", str(tmp_path / "work"), "--cores", "1"]
    main([*arguments, "--tokenizer", str(tiny_shape)])
    out = capfd.readouterr().out

    assert "150 rows generated, fetch.eval_size 20" in out
    assert "to_sharegpt.conversation_extension 2" in out and "model.max_seq_length 512" in out
    assert "training conversations identical to the seed style: True" in out  # with the same to_sharegpt settings
    assert "| standardize | " in out and "| the stage, process start to end | 1 | " in out


def test_contamination_speed_finds_what_it_planted_by_the_ngram_of_the_params(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from perf.contamination_speed import main

    params = settings(tmp_path, benchmarks={"ngram": 9})
    main(["--params", str(params), "--work", str(tmp_path), "--conversations", "1500", "--items", "100"])
    out = capsys.readouterr().out

    assert "1,500 conversations of" in out and "benchmarks.ngram 9, " in out
    planted = re.search(r"planted 9 words found by the n-gram: (\d+)/(\d+)", out)
    assert planted and planted[1] == planted[2] != "0", out


def test_decode_speed_times_a_step_with_each_attention_for_each_batch_and_length(
    tmp_path: Path, tiny_shape: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from perf.decode_speed import main

    params = settings(tmp_path, lora=LORA)
    work = work_with(tmp_path, tiny_shape)
    arguments = ["--params", str(params), "--shape", "tiny", "--work", str(work), "--batches", "2,3"]
    status = main([*arguments, "--lengths", "16,24", "--new-tokens", "3"])
    out = capfd.readouterr().out

    assert status == 0, out[-3000:]
    assert f"tiny, 3 new tokens a prompt, settings of {params}" in out and "settings: 4-bit True" in out
    table = out[out.rindex("| batch |") :].splitlines()
    assert [line.split(" | ")[:2] for line in table[2:]] == [["| 2", "16"], ["| 3", "16"], ["| 2", "24"], ["| 3", "24"]]
    # times, which may read below 0 on a loaded machine (a difference of two runs): numbers, not checked for speed
    assert all(math.isfinite(float(cell)) for line in table[2:] for cell in line.split(" | ")[2:4])
    with pytest.raises(SystemExit) as refused:
        main(["--new-tokens", "1"])
    assert refused.value.code == 2  # argparse's usage error
    assert "error: --new-tokens must be at least 2 (a step is timed between 1 and it), got 1" in capfd.readouterr().err


def test_lora_products_times_each_way_for_every_output_width_and_rank(capfd: pytest.CaptureFixture[str]) -> None:
    import torch

    from perf.lora_products import main, padded

    z, b, y = torch.randn(8, 4), torch.randn(6, 4), torch.randn(8, 6)
    torch.testing.assert_close(y.clone().addmm_(padded(z, 32), padded(b, 32).t()), y.clone().addmm_(z, b.t()))
    assert main(["--shape", "tiny", "--tokens", "64", "--ranks", "4,8", "--repeat", "2"]) == 0
    out = capfd.readouterr().out
    assert "tiny: output widths [16, 64, 224], 64 rows, bf16" in out
    rows = [line.split(" | ") for line in out[out.rindex("| width |") :].splitlines()[2:]]
    assert [(row[0], row[1]) for row in rows] == [(f"| {w}", str(r)) for w in (16, 64, 224) for r in (4, 8)]
    assert all(float(cell) > 0 for row in rows for cell in row[2:6] + row[7:8])


def loss_and_gradients(model: Any, ids: Any) -> tuple[Any, dict[str, Any]]:
    """`model`'s loss on `ids` as their own labels, and the gradient of each weight it trains."""
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_peft_layers_through_unsloths_addmm_forward_give_peft_layers_loss_and_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`perf.lora_paths.addmm_lora_forwards`: peft's LoRA layers through unsloth's rewrite of their forward (the scale,
    here alpha 16 / r 4, inside the adapter's product) compute the loss and gradients of peft's own (float32, CPU)."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from unsloth_zoo.compiler import get_lora_layer_modules

    from perf import lora_paths

    for cls, _, _ in get_lora_layer_modules():  # patched for the whole process: put back after the test
        monkeypatch.setattr(cls, "forward", cls.forward)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64
    )
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    lora = PeftLoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM(config), lora)
    ids = torch.randint(0, 64, (2, 9))

    peft_forward = loss_and_gradients(model, ids)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == 4 and type(q_proj).forward.__name__ == "forward"
    assert lora_paths.addmm_lora_forwards() and type(q_proj).forward.__name__ == "unsloth_forward"
    torch.testing.assert_close(loss_and_gradients(model, ids), peft_forward)


def test_lora_products_padded_with_zeros_give_the_unpadded_loss_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """`perf.lora_paths.pad_lora_products`: unsloth's `addmm_` (its fused LoRA functions' products, CUDA only) and
    peft's LoRA layers with the inner size zero-padded compute what they computed unpadded (float32, CPU)."""
    import torch
    import unsloth.kernels.fast_lora as fast_lora
    import unsloth.kernels.utils as kernel_utils
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from perf import lora_paths

    for module in (kernel_utils, fast_lora):  # patched for the whole process: put back after the test
        monkeypatch.setattr(module, "addmm_", module.addmm_)
    monkeypatch.setattr(lora_paths, "_ORIGINAL", {})
    out, a, b = torch.randn(8, 6), torch.randn(8, 4), torch.randn(6, 4)
    padded = lora_paths.padded_addmm(64, kernel_utils.addmm_)
    for mat2 in (b.t(), b.t().contiguous()):  # B as unsloth passes it (a transposed view), and row-major
        assert lora_paths.padded_rows(mat2, 64).is_contiguous() == mat2.is_contiguous()
        torch.testing.assert_close(padded(out.clone(), a, mat2, alpha=0.5), out.clone().addmm_(a, mat2, alpha=0.5))

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        LlamaForCausalLM(config), PeftLoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    )
    ids = torch.randint(0, 64, (2, 9))

    unpadded, original = loss_and_gradients(model, ids), kernel_utils.addmm_
    assert lora_paths.pad_lora_products(model, 64) == 2 * len(targets)
    assert kernel_utils.addmm_ is fast_lora.addmm_ and kernel_utils.addmm_ is not original
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["default"](torch.zeros(1, 16)).shape == (1, 64)  # the rank-4 output, padded
    torch.testing.assert_close(loss_and_gradients(model, ids), unpadded)
