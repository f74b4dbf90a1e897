"""End to end: the real `dvc repro` of the demo configuration in a fresh git repo (its data stages run once for the
session's end-to-end modules, `data_stages_run`; the rest here), then `dvc exp run -S lora.r=8`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml
from datasets import Dataset

from demo.run import apply_overrides
from finetune.evaluation.benchmark_sets import RESERVED
from tools.servers import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DATA_STAGES = ("fetch", "to_sharegpt", "standardize", "tokenize")
OUTPUTS = [
    "data/raw/train.parquet",
    "data/raw/eval.parquet",
    "data/sharegpt/train.parquet",
    "data/sharegpt/eval.parquet",
    "data/standardized/train.parquet",
    "data/standardized/eval.parquet",
    "data/tokenized/train.arrow",
    "data/tokenized/eval.arrow",
    "data/tokenized/chat_probe.json",
    "models/adapter/adapter_model.safetensors",
    "models/adapter/adapter_config.json",
    "models/adapter/tokenizer.json",
    "models/adapter/base_precision.json",
    "metrics/fetch.json",
    "metrics/to_sharegpt.json",
    "metrics/standardize.json",
    "metrics/tokenize.json",
    "metrics/train.json",
    "metrics/train_loss.csv",
    "metrics/eval_loss.csv",
    "metrics/evaluate.json",
    "metrics/evaluate_samples.json",
    "metrics/evaluate_bars.csv",
    "data/benchmark_items/benchmarks.json",
    "data/benchmark_items/fpb.jsonl",
    "data/benchmark_items/fiqa_sa.jsonl",
    "data/benchmark_items/tfns.jsonl",
    "data/benchmark_items/finqa.jsonl",
    "metrics/benchmarks.json",
]

PICKLES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}  # weights that load by unpickling, which runs code


def clean_env() -> dict[str, str]:
    """This environment without DVC's or MLflow's variables, this interpreter's environment first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    return env | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}


def run(command: list[str], cwd: Path, env: Mapping[str, str] | None = None) -> str:
    """Run a command in `clean_env()` plus `env`; return its output, failing loudly."""
    environ = clean_env() | dict(env or {})
    result = subprocess.run(command, cwd=cwd, env=environ, capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-6000:]}"
    return output


def dvc(*args: str, cwd: Path, env: Mapping[str, str] | None = None) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd, env)


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def runs(repo: Path) -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.search_runs(
        experiment_names=["finance-deepseek"], order_by=["attributes.start_time ASC"], output_format="list"
    )


def demo_project(folder: Path, root: Path, tiny_model_dir: Path) -> None:
    """Make `folder` a fresh git repo holding the project's files, with the demo's settings in params.yaml and the
    demo's tiny model (the session's: `python -m demo.tiny_model`'s code, `demo.tiny_model.write`)."""
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], root).split()
    for name in files:
        if (root / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes((root / name).read_bytes())
    params = apply_overrides(
        yaml.safe_load((folder / "params.yaml").read_text()),
        yaml.safe_load((folder / "demo/params.yaml").read_text()),
    )
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(tiny_model_dir, folder / "models/tiny-deepseek")
    run(["git", "init", "-q"], folder)
    run(["git", "config", "user.name", "Test"], folder)
    run(["git", "config", "user.email", "test@example.com"], folder)
    run(["git", "add", "-A"], folder)
    run(["git", "commit", "-qm", "project with the demo settings"], folder)


# the first repro's Python hash seed; the hash-seed test trains again under another (the two order {q,k,v,o}_proj
# differently, so that a set written in its iteration order would come out in another order)
HASH_SEEDS = ("1", "2")


@pytest.fixture(scope="session")
def data_stages_run(tmp_path_factory: pytest.TempPathFactory, root: Path, tiny_model_dir: Path) -> tuple[Path, str]:
    """The demo project after `dvc repro tokenize benchmarks` (the data stages and the benchmarks stage), committed
    with its dvc.lock and DVC's cache, and what that command printed. Built once per test session, by whichever
    pytest-xdist worker asks first while the others wait on a lock; each module's `repo` is a copy of it, so that the
    end-to-end modules (here, test_team, test_sweeps) run the data stages once between them."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base  # the session's, common to its workers
    folder, printed = shared / "data-stages-run", shared / "data-stages-run.out"
    with (shared / "data-stages-run.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not printed.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way
            folder.mkdir()
            demo_project(folder, root, tiny_model_dir)
            output = dvc("repro", "tokenize", "benchmarks", cwd=folder, env={"PYTHONHASHSEED": HASH_SEEDS[0]})
            run(["git", "add", "-A"], folder)
            run(["git", "commit", "-qm", "the data stages and the benchmark items"], folder)
            printed.write_text(output, encoding="utf-8")
    return folder, printed.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, data_stages_run: tuple[Path, str]) -> Path:
    """The module's own copy of the demo project with its data stages run and committed (DVC's temporary files left
    behind: a lock or state of the copied folder's path)."""
    repo = tmp_path_factory.mktemp("project")

    def dvc_tmp(folder: str, names: list[str]) -> list[str]:
        return ["tmp"] if Path(folder).name == ".dvc" else []

    shutil.copytree(data_stages_run[0], repo, symlinks=True, dirs_exist_ok=True, ignore=dvc_tmp)
    return repo


TIMED = {"metrics/train.json", "metrics/train_loss.csv", "metrics/eval_loss.csv"}  # train's outputs with wall times


def trained(repo: Path) -> dict[str, str]:
    """The MD5 of each of train's outputs that holds no wall time, as dvc.lock records them now."""
    outs = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]["outs"]
    return {out["path"]: out["md5"] for out in outs if out["path"] not in TIMED}


@pytest.fixture(scope="module")
def first_repro(repo: Path) -> str:
    output = dvc("repro", cwd=repo, env={"PYTHONHASHSEED": HASH_SEEDS[0]})
    FIRST_TRAINED.update(trained(repo))
    FIRST_ADAPTER.update(adapter_tensors(repo))
    return output


FIRST_TRAINED: dict[str, str] = {}  # train's output hashes after the first repro, for the hash-seed test
FIRST_ADAPTER: dict[str, Any] = {}  # its adapter's weights: the uninterrupted training the resumed one is held to


def test_repro_runs_every_stage_and_writes_its_outputs(
    repo: Path, data_stages_run: tuple[Path, str], first_repro: str
) -> None:
    # the data stages and benchmarks (`dvc repro tokenize benchmarks`, shared by the modules), then the rest
    assert ran_stages(data_stages_run[1]) == {"fetch", "to_sharegpt", "standardize", "tokenize", "benchmarks"}
    assert ran_stages(first_repro) == {"train", "evaluate"}
    assert ran_stages(data_stages_run[1]) | ran_stages(first_repro) == {
        "fetch",
        "to_sharegpt",
        "standardize",
        "tokenize",
        "train",
        "benchmarks",
        "evaluate",
    }
    missing = [name for name in OUTPUTS if not (repo / name).is_file()]
    assert not missing
    adapter = json.loads((repo / "models/adapter/adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 16
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert evaluation["eval_rows"] == 40 and evaluation["eval_tokens"] > 0
    assert evaluation["tuned_loss"] < evaluation["base_loss"]
    samples = json.loads((repo / "metrics/evaluate_samples.json").read_text())
    assert evaluation["generated_samples"] == 8 == len(samples["samples"])
    written = samples["samples"]
    for model in ("base", "tuned"):  # the scores are the means over the samples written beside them
        assert evaluation[f"{model}_rouge_l"] == pytest.approx(sum(r[f"{model}_rouge_l"] for r in written) / 8)
        assert evaluation[f"{model}_eos_rate"] == sum(r[f"{model}_ended"] for r in written) / 8
    # a benchmark's metrics start with its name, evaluate's own with a word no benchmark may take as its name
    ours = {key for key in evaluation if not key.startswith(("fpb_", "fiqa_sa_", "tfns_", "finqa_"))}
    assert {key.split("_")[0] for key in ours} <= set(RESERVED), ours
    # the presets on the demo's local stand-ins; FPB's last sentence is a training answer of the sample
    assert (evaluation["fpb_rows"], evaluation["fiqa_sa_rows"], evaluation["tfns_rows"]) == (31, 24, 24)
    assert evaluation["fpb_contaminated_rows"] >= 1 and evaluation["tfns_contaminated_share"] == 0.0
    assert evaluation["fpb_clean_rows"] == 31 - evaluation["fpb_contaminated_rows"]
    # FinQA's stand-in, each question answered (up to 32 tokens) by both models
    assert evaluation["finqa_rows"] == 12 and [s["benchmark"] for s in samples["benchmark_samples"]] == ["finqa"] * 8
    assert evaluation["finqa_base_think_tokens"] + evaluation["finqa_base_answer_tokens"] > 0
    # every share is a count of its rows: of all rows, or of the rows not seen in training
    for name, rows in (("fpb", 31), ("fiqa_sa", 24), ("tfns", 24), ("finqa", 12)):
        clean = evaluation[f"{name}_clean_rows"]
        shares = {"accuracy": rows, "clean_accuracy": clean}
        if name == "finqa":
            shares |= {"extraction_failure_rate": rows, "clean_extraction_failure_rate": clean}
        for key, count in shares.items():
            counts = [evaluation[f"{name}_{model}_{key}"] * count for model in ("base", "tuned")]
            assert all(n == pytest.approx(round(n)) for n in counts), (name, key, counts)
    lengths = json.loads((repo / "metrics/tokenize.json").read_text())
    assert 0 < lengths["train_tokens_p50"] <= lengths["train_tokens_p95"] <= lengths["train_tokens_max"]
    assert lengths["train_tokens_over_max_seq_length"] == 0  # the sample fits the demo's 512 tokens
    assert (
        lengths["train_conversations"] == json.loads((repo / "metrics/train.json").read_text())["train_conversations"]
    )
    record = json.loads((repo / "models/adapter/base_precision.json").read_text())  # the base trained on, and how
    assert record == {"load_in_4bit": True, "model_name": "models/tiny-deepseek", "revision": None}
    assert not [path.name for path in (repo / "models/adapter").iterdir() if path.suffix in PICKLES]  # safetensors


def test_mlflow_holds_the_finished_run_with_params_curve_metrics_and_adapter(repo: Path, first_repro: str) -> None:
    (run_,) = runs(repo)
    assert run_.info.status == "FINISHED"
    assert run_.data.params["lora.r"] == "4"
    assert run_.data.params["lora.target_modules"] == str(["q_proj", "k_proj", "v_proj", "o_proj"])
    history = mlflow.MlflowClient().get_metric_history(run_.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 31))
    assert {"evaluate/base_loss", "evaluate/tuned_loss", "evaluate/tuned_rouge_l"} <= set(run_.data.metrics)
    benchmark = {
        "evaluate/tfns_tuned_accuracy",
        "evaluate/tfns_tuned_clean_macro_f1",
        "evaluate/fpb_contaminated_share",
        "evaluate/finqa_tuned_accuracy",
        "evaluate/finqa_base_clean_think_tokens",
    }
    assert benchmark <= set(run_.data.metrics)
    assert run_.data.tags["benchmark.tfns.source"] == "data/benchmarks/tfns"
    assert "data/benchmarks/tfns/validation.jsonl" in run_.data.tags["benchmark.tfns.sha256"]
    eval_history = mlflow.MlflowClient().get_metric_history(run_.info.run_id, "eval_loss")
    assert [m.step for m in eval_history] == [10, 20, 30]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json"} <= artifacts
    assert run_.data.tags["git_commit"] == run(["git", "rev-parse", "HEAD"], repo).strip()
    assert (run_.data.tags["fit.batching"], run_.data.tags["fit.attention"]) == ("padded", "sdpa")  # on the CPU


def test_mlflow_lineage_data_hashes_system_metrics_throughput_and_registry(repo: Path, first_repro: str) -> None:
    from finetune.data.files import file_hash

    (run_,) = runs(repo)[:1]
    client = mlflow.MlflowClient()  # of the store that runs() chose
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    tokenized = {out["path"]: out["md5"] for out in lock["tokenize"]["outs"]}["data/tokenized"]
    assert run_.data.tags["dvc_lock.data/tokenized"] == tokenized
    inputs = {i.tags[0].value: i.dataset for i in client.get_run(run_.info.run_id).inputs.dataset_inputs}
    for context, name in (("training", "train.arrow"), ("evaluation", "eval.arrow")):
        assert inputs[context].name == f"tokenized/{name}"
        assert inputs[context].digest == file_hash(repo / "data/tokenized" / name)  # DVC's hash of the file
    assert any(key.startswith("system/") for key in run_.data.metrics), sorted(run_.data.metrics)
    for key in ("tokens_per_second", "padding_share"):
        history = client.get_metric_history(run_.info.run_id, key)
        assert len(history) == 30, key
    assert all(m.value > 0 for m in client.get_metric_history(run_.info.run_id, "tokens_per_second"))
    assert all(0 <= m.value < 1 for m in client.get_metric_history(run_.info.run_id, "padding_share"))
    (version,) = client.search_model_versions("name = 'finance-deepseek-adapter'")[-1:]
    assert version.run_id in {r.info.run_id for r in runs(repo)} and version.source.endswith("/adapter")
    assert [p.name for p in (repo / "models/checkpoints").iterdir()] == [".gitkeep"]  # trained: nothing to resume


def test_evaluate_refuses_a_benchmark_item_too_long_before_the_model_loads(
    repo: Path, first_repro: str, tmp_path: Path
) -> None:
    """A FinQA prompt over model.max_seq_length is named before the model loads (minutes for the 8B), not after."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["max_seq_length"] = 64
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    command = [sys.executable, "-m", "stages.evaluate", "--params", str(tmp_path / "params.yaml"), "--data"]
    command += ["data/tokenized", "--texts", "data/standardized", "--benchmarks", "data/benchmark_items", "--adapter"]
    command += ["models/adapter", "--metrics", str(tmp_path / "m.json"), "--samples", str(tmp_path / "s.json")]
    command += ["--bars", str(tmp_path / "b.csv")]
    result = subprocess.run(command, cwd=repo, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.splitlines()[-1]
    assert re.fullmatch(
        r"evaluate: error: finqa row 1: its prompt takes \d+ tokens, more than model.max_seq_length 64: "
        r"shorten the text or raise model.max_seq_length",
        last,
    ), last
    assert "evaluate: config:" not in result.stderr  # logged once the model has loaded


def test_export_runs_only_when_asked_and_generate_answers_from_a_logged_adapter(repo: Path, first_repro: str) -> None:
    assert "export" not in ran_stages(first_repro) and not (repo / "models/merged").exists()
    exported = dvc("repro", "export/dvc.yaml", cwd=repo)
    assert ran_stages(exported) == {"export/dvc.yaml:export"}
    assert (repo / "models/merged/config.json").is_file() and list((repo / "models/merged").glob("*.safetensors"))
    assert not [path.name for path in (repo / "models/merged").iterdir() if path.suffix in PICKLES]
    (run_,) = runs(repo)[:1]
    command = [sys.executable, "-m", "tools.generate", "--run", run_.info.run_id, "--max-new-tokens", "8", "Bonds?"]
    answer = subprocess.run(command, cwd=repo, env=clean_env(), capture_output=True, text=True, check=False)
    assert answer.returncode == 0, answer.stderr[-6000:]
    # the run's logged adapter, downloaded: the one the stage saved, byte for byte
    logged = re.search(r"\+ adapter (\S+)\n", answer.stderr)
    assert logged and Path(logged[1]) != repo / "models/adapter", answer.stderr[-3000:]
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (Path(logged[1]) / name).read_bytes() == (repo / "models/adapter" / name).read_bytes(), name
    streamed = [line for line in answer.stdout.splitlines(keepends=True) if not line.startswith("Unsloth")]
    assert streamed and answer.stdout.endswith("\n"), answer.stdout  # up to 8 tokens, after unsloth's banner


def test_no_held_out_row_appears_in_a_training_conversation(repo: Path, first_repro: str) -> None:
    def pairs(conversation: list[dict[str, str]]) -> list[tuple[str, str]]:
        return [(q["content"], a["content"]) for q, a in zip(conversation[::2], conversation[1::2], strict=True)]

    train = Dataset.from_parquet(str(repo / "data/standardized/train.parquet"))
    held_out = Dataset.from_parquet(str(repo / "data/standardized/eval.parquet"))
    held_out_pairs = {pair for conversation in held_out["conversations"] for pair in pairs(conversation)}
    assert len(held_out_pairs) == 40
    assert all(len(conversation) == 6 for conversation in train["conversations"])  # conversation_extension 3
    trained = {pair for conversation in train["conversations"] for pair in pairs(conversation)}
    assert trained.isdisjoint(held_out_pairs)


def test_data_stages_rerun_give_byte_identical_outputs(repo: Path, first_repro: str) -> None:
    def data_hashes() -> dict[str, str]:
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        return {out["path"]: out["md5"] for stage in DATA_STAGES for out in lock[stage]["outs"]}

    before = data_hashes()
    assert ran_stages(dvc("repro", "--force", "tokenize", cwd=repo)) == set(DATA_STAGES)
    assert data_hashes() == before


def test_plots_show_draws_both_loss_curves_and_the_bars(repo: Path, first_repro: str) -> None:
    shown = json.loads(dvc("plots", "show", "--json", cwd=repo))["data"]
    assert set(shown) == {"loss", "metrics/evaluate_bars.csv"}
    points = shown["loss"][0]["content"]["data"]["values"]
    assert {p["filename::field"] for p in points} == {"train_loss.csv::loss", "eval_loss.csv::eval_loss"}
    bars = {
        (p["panel"], p["measure"], p["model"])
        for p in shown["metrics/evaluate_bars.csv"][0]["content"]["data"]["values"]
    }
    assert {("loss", "loss", "base"), ("loss", "loss", "tuned"), ("perplexity", "perplexity", "tuned")} <= bars
    assert {("score", "tfns accuracy", "tuned"), ("score", "fpb clean macro f1", "base")} <= bars
    html = dvc("plots", "show", "-o", "plots", cwd=repo)
    page = (repo / "plots" / "index.html").read_text(encoding="utf-8")
    assert "index.html" in html and "eval_loss" in page and "tuned" in page


@pytest.mark.parametrize(
    ("key", "value", "stale"),
    [
        (("model", "max_seq_length"), 256, {"tokenize", "train", "evaluate"}),
        (("model", "model_name"), "models/other", {"tokenize", "train", "evaluate"}),
        (("chat", "think"), "none", {"tokenize", "train", "evaluate"}),
        (("tokenize", "over_length"), "drop", {"tokenize"}),  # then train and evaluate, once tokenize has rerun
        (("lora", "r"), 8, {"train"}),
        (("model", "load_in_4bit"), False, {"train", "evaluate"}),
        (("benchmarks", "ngram"), 8, {"benchmarks"}),  # then evaluate, once benchmarks has rerun
        (("fetch", "held_out_ngram"), 8, {"fetch"}),  # then every stage after it, once fetch has rerun
        (("benchmarks", "max_new_tokens"), 8, {"benchmarks"}),  # then evaluate, which reads it in the stage's files
        (("evaluate", "benchmark_batch_tokens"), 4096, {"evaluate"}),
    ],
)
def test_a_setting_makes_stale_exactly_the_stages_it_changes(
    repo: Path, first_repro: str, key: tuple[str, str], value: object, stale: set[str]
) -> None:
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params[key[0]][key[1]] = value
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        status = json.loads(dvc("status", "--json", cwd=repo))
    finally:
        (repo / "params.yaml").write_text(original)
    assert {stage for stage in status if ":" not in stage} == stale, status  # export/dvc.yaml's apart


def test_a_file_added_to_or_edited_in_the_local_data_folders_makes_fetch_stale(repo: Path, first_repro: str) -> None:
    sample = repo / "data/sample/finance_instruct_sample.jsonl"
    original = sample.read_bytes()
    row = json.dumps({"system": "", "user": "Added question?", "assistant": "Added answer."}) + "\n"
    for path, text in ((sample, original + row.encode()), (repo / "data/source/rows.jsonl", row.encode())):
        try:
            path.write_bytes(text)
            status = json.loads(dvc("status", "--json", cwd=repo))
        finally:
            path.write_bytes(original) if path == sample else path.unlink()
        assert {stage for stage in status if ":" not in stage} == {"fetch"}, (path, status)


def test_an_edited_benchmark_file_makes_only_the_benchmarks_stage_stale(repo: Path, first_repro: str) -> None:
    path = repo / "data/benchmarks/tfns/validation.jsonl"
    original = path.read_bytes()
    try:
        path.write_bytes(original + json.dumps({"text": "Stocks rally into the close", "label": 1}).encode() + b"\n")
        status = json.loads(dvc("status", "--json", cwd=repo))
    finally:
        path.write_bytes(original)
    assert {stage for stage in status if ":" not in stage} == {"benchmarks"}, status


def test_second_repro_runs_nothing(repo: Path, first_repro: str) -> None:
    output = dvc("repro", cwd=repo)
    assert ran_stages(output) == set()
    assert "Data and pipelines are up to date" in output


@pytest.fixture(scope="module")
def rank_8(repo: Path, first_repro: str) -> str:
    """The experiment `lora.r=8`, after the first repro's results were saved as the experiment `rank-4` (dvc.yaml's
    stages: export/dvc.yaml's outputs exist only where someone exported)."""
    dvc("exp", "save", "dvc.yaml", "-n", "rank-4", cwd=repo)
    return dvc("exp", "run", "-S", "lora.r=8", "-n", "rank-8", cwd=repo)


def test_experiment_with_rank_8_reruns_train_and_evaluate_only(repo: Path, rank_8: str) -> None:
    output = rank_8
    assert ran_stages(output) == {"train", "evaluate"}
    assert all(f"Stage '{stage}' didn't change, skipping" in output for stage in DATA_STAGES)
    assert json.loads((repo / "models/adapter/adapter_config.json").read_text())["r"] == 8
    first, second = runs(repo)
    assert (first.data.params["lora.r"], second.data.params["lora.r"]) == ("4", "8")
    assert second.info.run_name == "rank-8" and second.info.status == "FINISHED"
    assert "evaluate/tuned_loss" in second.data.metrics


@pytest.fixture(scope="module")
def mlflow_ui(repo: Path, rank_8: str) -> Iterator[str]:
    """`make mlflow-ui`'s command on a free loopback port; yields the runs page it prints."""
    import psutil

    log = repo / "mlflow-ui.log"
    port = free_port()
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "tools.mlflow_ui", "--port", str(port)],
            cwd=repo,
            env=clean_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # its GenAI job runner: 8 processes
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        # one server process (`--workers 1`): `mlflow ui` alone would start uvicorn with four workers under it
        serving = [process.cmdline()[1:3] for process in psutil.Process(server.pid).children(recursive=True)]
        assert serving == [["-m", "uvicorn"]], serving
        yield log.read_text().splitlines()[0].split(": ", 1)[1]
    finally:
        server.terminate()
        server.wait(timeout=30)


def screenshot(page: Any, name: str, tmp_path: Path) -> None:
    """Save a screenshot; `UI_SCREENSHOTS=docs/screenshots` refreshes those docs/experiments.md shows."""
    folder = Path(os.environ.get("UI_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"))


def test_mlflow_ui_shows_both_runs_their_rank_loss_chart_adapter_and_samples(
    repo: Path, mlflow_ui: str, browser: Any, tmp_path: Path
) -> None:
    first, second = runs(repo)
    assert first.info.run_name == f"repro-{first.data.tags['git_commit'][:7]}" and second.info.run_name == "rank-8"
    page = browser.new_page()

    # the runs table, opened as `make mlflow-ui` prints it: both runs by name, each with its r
    page.goto(mlflow_ui)
    for run_ in (first, second):
        page.get_by_role("link", name=run_.info.run_name).wait_for(timeout=60_000)
    # in the fine-tuning experiment's "Model training" view (runs, models), not the GenAI one (traces, sessions)
    experiment = mlflow.get_experiment(first.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "finetuning"
    sidebar = page.locator("aside").inner_text()
    assert "Model registry" in sidebar and "Sessions" not in sidebar, sidebar
    for run_, r in ((first, "4"), (second, "8")):
        cell = page.locator(f'.ag-row[row-id="{run_.info.run_id}"] [col-id="params.`lora.r`"]')
        assert cell.inner_text().strip() == r
        loss = page.locator(f'.ag-row[row-id="{run_.info.run_id}"] [col-id="metrics.`evaluate/tuned_loss`"]')
        assert float(loss.inner_text()) == pytest.approx(run_.data.metrics["evaluate/tuned_loss"], rel=1e-3)
    screenshot(page, "mlflow-runs", tmp_path)

    # the run's charts: the training loss among them
    page.get_by_role("link", name="rank-8").click()
    page.get_by_role("tab", name="Model metrics").click()
    page.get_by_placeholder("Search metric charts").fill("loss")
    for section in ("evaluate", "train"):  # fold the summary sections: the per-step curves come into view
        page.get_by_text(section, exact=True).first.click()
    for chart in ("loss", "eval_loss"):
        page.get_by_text(chart, exact=True).first.wait_for(timeout=30_000)
    screenshot(page, "mlflow-loss-charts", tmp_path)

    # its artifacts: the adapter's files, and the evaluation samples as a table
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("adapter", exact=True).first.click()
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        page.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
    page.get_by_text("evaluate_samples.json", exact=True).first.click()
    for column in ("prompt", "reference", "base", "tuned"):
        page.get_by_text(column, exact=True).first.wait_for(timeout=30_000)
    assert page.get_by_role("cell").count() >= 8 * 4  # the demo's 8 samples, prompt to tuned answer at least
    screenshot(page, "mlflow-artifacts-samples", tmp_path)


def test_plots_diff_draws_the_loss_curves_and_bars_of_two_experiments(repo: Path, rank_8: str) -> None:
    shown = json.loads(dvc("plots", "diff", "rank-4", "rank-8", "--json", cwd=repo))["data"]
    for plot in ("loss", "metrics/evaluate_bars.csv"):
        assert {point["rev"] for point in shown[plot][0]["content"]["data"]["values"]} == {"rank-4", "rank-8"}
    dvc("plots", "diff", "rank-4", "rank-8", "-o", "plots_diff", cwd=repo)
    page = (repo / "plots_diff" / "index.html").read_text(encoding="utf-8")
    assert "rank-4" in page and "rank-8" in page and "eval_loss" in page


def test_the_readmes_commands_after_an_experiment_print_no_error_or_warning(repo: Path, rank_8: str) -> None:
    # export/dvc.yaml's outputs (the merged model, metrics/export.json) trip none of them, exported or not
    output = dvc("exp", "apply", "rank-8", cwd=repo) + dvc("metrics", "show", cwd=repo)
    output += dvc("plots", "diff", "rank-8", "-o", "plots_applied", cwd=repo)
    assert not any(word in output for word in ("ERROR", "WARNING", "failed")), output
    assert "cdn.jsdelivr.net" not in (repo / "plots_applied/index.html").read_text(encoding="utf-8")


def adapter_tensors(repo: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(repo / "models/adapter/adapter_model.safetensors")


def test_a_training_killed_mid_run_resumes_from_its_last_complete_checkpoint(repo: Path, rank_8: str) -> None:
    import psutil
    import torch

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["lora"]["r"] = 4  # the demo's settings, whatever experiment the workspace holds
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the reference: the first repro's training, uninterrupted, of these settings and data (the hash-seed test shows
    # that training again gives it byte for byte)
    reference = FIRST_ADAPTER
    earlier_runs = {r.info.run_id for r in runs(repo)}

    # train again from scratch, and SIGKILL the training process once the step-20 checkpoint is complete
    with (repo / "killed.log").open("w") as log:
        dvc_process = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "train"],
            cwd=repo,
            env=clean_env(),
            stdout=log,
            stderr=log,
        )
    deadline = time.monotonic() + 600
    while not list((repo / "models/checkpoints").glob("*/checkpoint-20/complete.json")):
        assert dvc_process.poll() is None, (repo / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)

    # every process of the stage: DVC runs the command through $SHELL, else /bin/sh; Debian's dash (CI has no $SHELL)
    # stays the trainer's parent where bash execs it, and killing only the shell left the trainer running, orphaned
    stage = psutil.Process(dvc_process.pid).children(recursive=True)
    for process in reversed(stage):  # the deepest first: the trainer dies before its shell can report
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(stage, timeout=60)
    assert dvc_process.wait(timeout=120) != 0  # killed before it finished
    assert not (repo / "models/adapter/adapter_model.safetensors").exists()
    (folder,) = (repo / "models/checkpoints").glob("[!.]*")  # .gitkeep apart
    (folder / "checkpoint-30").mkdir(exist_ok=True)  # as a kill in the middle of a save leaves it: no complete.json
    (folder / "checkpoint-30" / "adapter_model.safetensors").write_bytes(b"half written")

    resumed = dvc("repro", "train", cwd=repo)
    assert "resuming from" in resumed and "checkpoint-20" in resumed
    tensors = adapter_tensors(repo)
    assert tensors.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(tensors[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert not folder.exists()  # trained: its checkpoints are deleted

    latest = runs(repo)[-1]
    assert latest.info.run_id not in earlier_runs and latest.info.status == "FINISHED"
    assert latest.data.tags["resumed_from"] == "checkpoint-20"
    assert all(r.info.status != "RUNNING" for r in runs(repo))
    losses = mlflow.MlflowClient().get_metric_history(latest.info.run_id, "loss")
    assert {m.step for m in losses} == set(range(1, 31))
    # the speed of this attempt: steps 21 to 30, 4 conversations each, in the time it took
    speed = json.loads((repo / "metrics/train.json").read_text())
    assert speed["global_step"] == 30
    assert speed["train_samples_per_second"] == pytest.approx(10 * 4 / speed["train_runtime"], rel=2e-3)


def test_training_again_under_another_hash_seed_writes_the_same_adapter(repo: Path, rank_8: str) -> None:
    # the same inputs, the same bytes: a set written in its iteration order (peft's target_modules) would come out
    # in another order under another PYTHONHASHSEED, and the adapter's hash would change with bitwise-equal weights
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["lora"]["r"] = 4  # the first repro's settings, whatever experiment the workspace holds
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = dvc("repro", "--force", "--single-item", "train", cwd=repo, env={"PYTHONHASHSEED": HASH_SEEDS[1]})
    assert ran_stages(output) == {"train"}
    assert trained(repo) == FIRST_TRAINED and "models/adapter" in FIRST_TRAINED
    config = json.loads((repo / "models/adapter/adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"])


def test_the_two_hash_seeds_order_the_target_modules_apart() -> None:
    # the hash-seed test means something only if the seeds' set orders differ
    code = "print(list({'q_proj', 'k_proj', 'v_proj', 'o_proj'}))"
    orders = {s: run([sys.executable, "-c", code], Path.cwd(), {"PYTHONHASHSEED": s}) for s in HASH_SEEDS}
    assert orders[HASH_SEEDS[0]] != orders[HASH_SEEDS[1]], orders


def test_a_full_disk_fails_the_training_clearly_with_its_run_failed_and_dvc_lock_unchanged(
    repo: Path, rank_8: str
) -> None:
    lock, settings = (repo / "dvc.lock").read_bytes(), (repo / "params.yaml").read_text()
    earlier = {r.info.run_id for r in runs(repo)}
    params = yaml.safe_load(settings)
    params["train"]["save_steps"] = 1  # the first checkpoint after one step, not twenty
    # the checkpoints' folder on a 64 KiB tmpfs, mounted in a mount namespace of this command alone (the user
    # namespace maps this user to root there, so that it may mount): the first checkpoint fills it
    script = 'mount -t tmpfs -o size=64k tmpfs models/checkpoints && exec "$0" -m dvc repro --force --single-item train'
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, sys.executable]
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        result = subprocess.run(command, cwd=repo, env=clean_env(), capture_output=True, text=True, check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output[-3000:]
        assert "OSError: [Errno 28] a disk is full" in output, output[-3000:]
        assert re.search(r"models/checkpoints/\w+: 0 bytes free", output), output[-3000:]  # the folder, its space
        assert (repo / "dvc.lock").read_bytes() == lock
        (failed,) = [r for r in runs(repo) if r.info.run_id not in earlier]
        assert failed.info.status == "FAILED" and "adapter_sha256" not in failed.data.tags
        assert not (repo / "models/adapter").exists()
    finally:
        (repo / "params.yaml").write_text(settings)
        dvc("checkout", "train", cwd=repo)  # the outputs DVC removed before it ran the stage (docs/troubleshooting.md)
