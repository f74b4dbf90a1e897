"""End to end: the real `dvc repro` of the demo configuration in a fresh git repo, then `dvc exp run -S lora.r=8`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from datasets import Dataset

from demo.run import apply_overrides

pytestmark = pytest.mark.e2e

DATA_STAGES = ("fetch", "to_sharegpt", "standardize")
OUTPUTS = [
    "data/raw/train.parquet",
    "data/raw/eval.parquet",
    "data/sharegpt/train.parquet",
    "data/sharegpt/eval.parquet",
    "data/standardized/train.parquet",
    "data/standardized/eval.parquet",
    "models/adapter/adapter_model.safetensors",
    "models/adapter/adapter_config.json",
    "models/adapter/tokenizer.json",
    "metrics/fetch.json",
    "metrics/to_sharegpt.json",
    "metrics/standardize.json",
    "metrics/train.json",
    "metrics/train_loss.csv",
    "metrics/eval_loss.csv",
    "metrics/evaluate.json",
    "metrics/evaluate_samples.json",
    "metrics/evaluate_bars.csv",
]


def run(command: list[str], cwd: Path) -> str:
    """Run a command with this interpreter's environment first on PATH; return its output, failing loudly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-6000:]}"
    return output


def dvc(*args: str, cwd: Path) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd)


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def runs(repo: Path) -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.search_runs(
        experiment_names=["finance-deepseek"], order_by=["attributes.start_time ASC"], output_format="list"
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, root: Path) -> Path:
    """A fresh git repo holding the project's files, with the demo's settings in params.yaml."""
    repo = tmp_path_factory.mktemp("project")
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], root).split()
    for name in files:
        if (root / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_bytes((root / name).read_bytes())
    params = apply_overrides(
        yaml.safe_load((repo / "params.yaml").read_text()), yaml.safe_load((repo / "demo/params.yaml").read_text())
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(
        [sys.executable, "-m", "demo.tiny_model", "data/sample/finance_instruct_sample.jsonl", "models/tiny-deepseek"],
        repo,
    )
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.name", "Test"], repo)
    run(["git", "config", "user.email", "test@example.com"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "project with the demo settings"], repo)
    return repo


@pytest.fixture(scope="module")
def first_repro(repo: Path) -> str:
    return dvc("repro", cwd=repo)


def test_repro_runs_every_stage_and_writes_its_outputs(repo: Path, first_repro: str) -> None:
    assert ran_stages(first_repro) == {"fetch", "to_sharegpt", "standardize", "train", "evaluate"}
    missing = [name for name in OUTPUTS if not (repo / name).is_file()]
    assert not missing
    adapter = json.loads((repo / "models/adapter/adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 16
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert evaluation["eval_rows"] == 40 and evaluation["eval_tokens"] > 0
    assert evaluation["tuned_loss"] < evaluation["base_loss"]
    assert evaluation["generated_samples"] == 8 and 0 <= evaluation["tuned_rouge_l"] <= 1
    assert evaluation["sentiment_rows"] == 30 and 0 <= evaluation["sentiment_tuned_macro_f1"] <= 1
    lengths = json.loads((repo / "metrics/to_sharegpt.json").read_text())
    assert 0 < lengths["train_tokens_p50"] <= lengths["train_tokens_p95"] <= lengths["train_tokens_max"]
    assert lengths["train_tokens_over_max_seq_length"] == 0  # the sample fits the demo's 512 tokens


def test_mlflow_holds_the_finished_run_with_params_curve_metrics_and_adapter(repo: Path, first_repro: str) -> None:
    (run_,) = runs(repo)
    assert run_.info.status == "FINISHED"
    assert run_.data.params["lora.r"] == "4"
    assert run_.data.params["lora.target_modules"] == str(["q_proj", "k_proj", "v_proj", "o_proj"])
    history = mlflow.MlflowClient().get_metric_history(run_.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 31))
    assert {"evaluate/base_loss", "evaluate/tuned_loss", "evaluate/tuned_rouge_l"} <= set(run_.data.metrics)
    eval_history = mlflow.MlflowClient().get_metric_history(run_.info.run_id, "eval_loss")
    assert [m.step for m in eval_history] == [10, 20, 30]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= artifacts
    assert run_.data.tags["git_commit"] == run(["git", "rev-parse", "HEAD"], repo).strip()


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
    assert ran_stages(dvc("repro", "--force", "standardize", cwd=repo)) == set(DATA_STAGES)
    assert data_hashes() == before


def test_plots_show_draws_both_loss_curves_and_the_bars(repo: Path, first_repro: str) -> None:
    shown = json.loads(dvc("plots", "show", "--json", cwd=repo))["data"]
    assert set(shown) == {"loss", "metrics/evaluate_bars.csv"}
    points = shown["loss"][0]["content"]["data"]["values"]
    assert {p["filename::field"] for p in points} == {"train_loss.csv::loss", "eval_loss.csv::eval_loss"}
    bars = {p["measure"] for p in shown["metrics/evaluate_bars.csv"][0]["content"]["data"]["values"]}
    assert {"loss · base", "loss · tuned", "sentiment accuracy · tuned"} <= bars
    html = dvc("plots", "show", "-o", "plots", cwd=repo)
    page = (repo / "plots" / "index.html").read_text(encoding="utf-8")
    assert "index.html" in html and "eval_loss" in page and "tuned" in page


def test_second_repro_runs_nothing(repo: Path, first_repro: str) -> None:
    output = dvc("repro", cwd=repo)
    assert ran_stages(output) == set()
    assert "Data and pipelines are up to date" in output


def test_experiment_with_rank_8_reruns_train_and_evaluate_only(repo: Path, first_repro: str) -> None:
    output = dvc("exp", "run", "-S", "lora.r=8", "-n", "rank-8", cwd=repo)
    assert ran_stages(output) == {"train", "evaluate"}
    assert all(f"Stage '{stage}' didn't change, skipping" in output for stage in DATA_STAGES)
    assert json.loads((repo / "models/adapter/adapter_config.json").read_text())["r"] == 8
    first, second = runs(repo)
    assert (first.data.params["lora.r"], second.data.params["lora.r"]) == ("4", "8")
    assert second.info.run_name == "rank-8" and second.info.status == "FINISHED"
    assert "evaluate/tuned_loss" in second.data.metrics
