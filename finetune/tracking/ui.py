"""The MLflow UI's runs table as this project opens it: one column per LoRA setting and key result.

Only the UI launcher (`tools/mlflow_ui.py`) uses this file, so a change of columns reruns no stage. The view is
stored as an experiment tag, where the UI's own "share view" stores it, and the UI opens it with
`?viewStateShareKey=<RUNS_VIEW>` (the UI keeps a user's own picks in the browser only).
"""

from __future__ import annotations

import json

RUNS_VIEW = "lora-and-results"
RUNS_VIEW_COLUMNS = (
    "params.`lora.r`",
    "params.`lora.lora_alpha`",
    "params.`lora.target_modules`",
    "params.`train.learning_rate`",
    "params.`train.max_steps`",
    "metrics.`train/train_loss`",
    "metrics.`evaluate/base_loss`",
    "metrics.`evaluate/tuned_loss`",
    "metrics.`evaluate/loss_change_pct`",
    "metrics.`evaluate/tuned_rouge_l`",
)
# MLflow 3.17's UI shows the view its GenAI / Model training switch (or the address's `workflowType`) asks for
WORKFLOW = "machine_learning"  # the UI's workflow of the finetuning kind: its "Model training" view


def runs_view_state() -> str:
    """The shared view's state, as the UI reads it from the tag `mlflow.sharedViewState.<RUNS_VIEW>`."""
    return json.dumps(
        {
            "searchFilter": "",
            "orderByKey": "attributes.start_time",
            "orderByAsc": False,
            "startTime": "ALL",
            "lifecycleFilter": "Active",
            "datasetsFilter": [],
            "modelVersionFilter": "All Runs",
            "selectedColumns": list(RUNS_VIEW_COLUMNS),
        }
    )


def save_runs_view(experiment_id: str) -> None:
    """Store the view `RUNS_VIEW` on the experiment (in the store MLflow points at), unless it holds it already."""
    import mlflow

    tag, state = f"mlflow.sharedViewState.{RUNS_VIEW}", runs_view_state()
    if mlflow.get_experiment(experiment_id).tags.get(tag) != state:
        mlflow.MlflowClient().set_experiment_tag(experiment_id, tag, state)


def runs_page(base_url: str, experiment_id: str) -> str:
    """The UI address of an experiment's runs table, in the Model training view, with the LoRA settings and key
    results as columns.

    `runs_page("http://127.0.0.1:5000", "1")`
    -> `'http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=lora-and-results&workflowType=machine_learning'`
    """
    return f"{base_url}/#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW}&workflowType={WORKFLOW}"
