"""tools/compare.py: `dvc exp show --json` as a table of changed settings and key results that fits 160 columns."""

from __future__ import annotations

from typing import Any

import pytest

from tools.compare import WIDTH, best, flatten, lower_is_better, table, unread


def revision(name: str | None, timestamp: str, r: int, steps: int, loss: float | None) -> dict[str, Any]:
    params = {"lora": {"r": r, "target_modules": ["q_proj", "v_proj"]}, "train": {"max_steps": steps}}
    params["model"] = {"model_name": f"models/{'x' * 40}"}  # a long value, cut in the table
    metrics: dict[str, Any] = {"metrics/export.json": {"error": {"type": "FileNotFoundError"}}}
    if loss is not None:
        metrics["metrics/evaluate.json"] = {
            "data": {
                "base_loss": 2.0,
                "tuned_loss": loss,
                "loss_change_pct": 100 * (loss - 2) / 2,
                "tuned_rouge_l": 0.25,
            }
        }
        metrics["metrics/train.json"] = {"data": {"tokens_per_second": 12440.4, "train_loss": 1.0}}
    data = {"timestamp": timestamp, "params": {"params.yaml": {"data": params}}, "metrics": metrics}
    return {"rev": "0123456789abcdef", "name": name, "data": data}


def test_flatten_dots_nested_settings_and_keeps_lists() -> None:
    assert flatten({"lora": {"r": 8, "target_modules": ["q"]}, "a": 1}) == {
        "lora.r": 8,
        "lora.target_modules": ["q"],
        "a": 1,
    }


def test_the_table_shows_what_tells_experiments_apart_and_the_key_results() -> None:
    workspace = revision(None, "", 4, 60, None) | {"rev": "workspace"}
    experiments = [
        revision("rank-16", "2026-11-30T10:05:00", 16, 30, 1.2),
        revision("rank-8", "2026-11-30T10:00:00", 8, 30, 1.5),
    ]
    shown = [workspace, revision("main", "2026-11-29T09:00:00", 4, 60, None) | {"experiments": [{"revs": experiments}]}]
    lines = table(shown).splitlines()
    assert lines[0] == "Changed settings (as in the last experiment): train.max_steps=30"
    header, first, second = lines[1:]
    assert header.split() == ["experiment", "lora.r", "base", "loss", "tuned", "loss", "change", "ROUGE-L", "tokens/s"]
    assert first.split() == ["rank-8", "8", "2.0000", "1.5000", "-25.0", "%", "0.250", "12,440"]  # oldest first
    assert second.split()[:2] == ["rank-16", "16"]
    assert max(map(len, lines)) <= WIDTH


def test_settings_that_do_not_fit_move_above_the_table() -> None:
    def experiment(i: int) -> dict[str, Any]:
        exp = revision(f"e{i}", f"2026-11-30T10:0{i}:00", i, 30 + i, 1.0)
        exp["data"]["params"]["params.yaml"]["data"]["model"]["model_name"] = f"models/{i}{'y' * 40}"
        exp["data"]["params"]["params.yaml"]["data"]["lora"]["target_modules"] = [f"{'z' * 30}{i}"]
        return exp

    baseline = revision("main", "", 4, 60, None) | {"experiments": [{"revs": [experiment(i) for i in range(1, 4)]}]}
    lines = table([baseline], width=90).splitlines()
    assert max(map(len, lines)) <= 90
    assert "experiment" in lines[-4] and [line.split()[0] for line in lines[-3:]] == ["e1", "e2", "e3"]
    assert "model.model_name=" in " ".join(lines[:-4])


def test_the_workspace_is_named_whole() -> None:
    workspace = revision(None, "", 4, 60, 1.4) | {"rev": "workspace"}
    assert table([workspace]).splitlines()[-1].split()[0] == "workspace"


def test_no_results_yet_says_what_to_run() -> None:
    assert "make demo" in table([revision(None, "", 4, 60, None) | {"rev": "workspace"}])


def sweep() -> list[dict[str, Any]]:
    """A commit and three experiments of a sweep over lora.r, tuned losses 1.5, 1.2 and 1.8 (ROUGE-L 0.2 to 0.4)."""
    experiments = [
        revision(f"rank-{r}", f"2026-11-30T10:0{i}:00", r, 30, loss) for i, (r, loss) in enumerate([(4, 1.5), (8, 1.2)])
    ]
    experiments.append(revision("rank-16", "2026-11-30T10:09:00", 16, 30, 1.8))
    for exp, rouge in zip(experiments, (0.2, 0.4, 0.3), strict=True):
        exp["data"]["metrics"]["metrics/evaluate.json"]["data"]["tuned_rouge_l"] = rouge
        exp["data"]["metrics"]["metrics/train.json"]["data"]["train_loss"] = rouge  # a key of another file
    return [revision("main", "2026-11-29T09:00:00", 4, 60, None) | {"experiments": [{"revs": experiments}]}]


def test_sort_puts_the_best_first_lowest_for_a_loss_highest_for_a_score() -> None:
    by_loss = [line.split()[0] for line in table(sweep(), sort="tuned_loss").splitlines()[-3:]]
    assert by_loss == ["rank-8", "rank-4", "rank-16"]
    by_rouge = [line.split()[0] for line in table(sweep(), sort="tuned_rouge_l").splitlines()[-3:]]
    assert by_rouge == ["rank-8", "rank-16", "rank-4"]
    lines = table(sweep(), sort="metrics/train.json:train_loss").splitlines()  # not a column yet: it gets one
    assert lines[-4].split()[-1] == "metrics/train.json:train_loss"
    assert [line.split()[0] for line in lines[-3:]] == ["rank-4", "rank-16", "rank-8"]


def test_best_names_the_experiment_its_settings_and_the_command_that_applies_it() -> None:
    assert best(sweep(), "tuned_loss").splitlines() == [
        "Best of 3 experiments by tuned_loss (lowest): rank-8, tuned_loss = 1.2",
        "Its settings: lora.r=8, train.max_steps=30",
        "Apply it: dvc exp apply rank-8",
    ]
    assert best(sweep(), "tuned_rouge_l").splitlines()[0].endswith("(highest): rank-8, tuned_rouge_l = 0.4")
    assert "No experiment has tuned_loss yet" in best([revision("main", "", 4, 60, None)], "tuned_loss")


def test_an_unknown_or_ambiguous_metric_is_named_with_the_choices() -> None:
    with pytest.raises(
        ValueError,
        match=r"metric 'tuned_los'; those of metrics/evaluate.json and metrics/train.json"
        r" are: base_loss, loss_change_pct, tokens_per_second, train_loss, tuned_loss, tuned_rouge_l ",
    ):
        best(sweep(), "tuned_los")
    shown = sweep()
    shown[0]["experiments"][0]["revs"][0]["data"]["metrics"]["metrics/train.json"]["data"]["tuned_loss"] = 1.0
    with pytest.raises(ValueError, match=r"in metrics/evaluate.json and metrics/train.json: name one"):
        table(shown, sort="tuned_loss")
    assert lower_is_better("evaluate_seconds") and not lower_is_better("metrics/train.json:tokens_per_second")
    lower = ("finqa_tuned_extraction_failure_rate", "padding_share", "fpb_contaminated_share", "tuned_perplexity")
    higher = ("tuned_eos_rate", "fpb_tuned_clean_accuracy", "finqa_tuned_macro_f1", "tuned_token_f1")
    assert all(map(lower_is_better, lower)) and not any(map(lower_is_better, higher))


def test_a_revision_dvc_could_not_read_is_left_out_and_named() -> None:
    """`dvc exp show --json` gives a revision it failed to collect as `"data": null` beside an `"error"` (dvc's
    `ExpState`); the table and the best leave it out, and `unread` says which and why."""
    broken = {"rev": "fedcba9876543210", "name": None, "data": None, "experiments": None}
    broken["error"] = {
        "msg": "unable to read: 'params.yaml', YAML file structure is corrupted",
        "type": "YAMLFileCorrupted",
    }
    shown = sweep()
    shown[0]["experiments"][0]["revs"].append(broken | {"name": "rank-32"})
    shown[0]["experiments"].append({"revs": [broken | {"error": None}], "executor": None, "name": None})
    shown.insert(0, broken)  # a baseline too: its experiments still count
    assert unread(shown) == [
        "fedcba9: DVC could not read it (unable to read: 'params.yaml', YAML file structure is corrupted), left out",
        "rank-32: DVC could not read it (unable to read: 'params.yaml', YAML file structure is corrupted), left out",
        "fedcba9: DVC could not read it (no data), left out",
    ]
    assert [line.split()[0] for line in table(shown, sort="tuned_loss").splitlines()[-3:]] == [
        "rank-8",
        "rank-4",
        "rank-16",
    ]
    assert best(shown, "tuned_loss").splitlines()[0].startswith("Best of 3 experiments by tuned_loss (lowest): rank-8")
    assert unread(sweep()) == []
