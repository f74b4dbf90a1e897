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


# the same table with the runs grouped by their sweep: the tag `sweep`, the commit DVC's experiments ran from
# (`finetune.tracking.training_run`); each group's row shows its best (lowest) numbers
SWEEPS_VIEW = "sweeps"
SWEEP_GROUPS = {"aggregateFunction": "min", "groupByKeys": [{"mode": "tag", "groupByData": "sweep"}]}


def runs_view_state(grouped: bool = False) -> str:
    """A shared view's state, as the UI reads it from the tag `mlflow.sharedViewState.<name>`: the runs table with
    `RUNS_VIEW_COLUMNS`, `grouped` by sweep or not."""
    state = {
        "searchFilter": "",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": list(RUNS_VIEW_COLUMNS),
    }
    return json.dumps(state | ({"groupBy": SWEEP_GROUPS, "groupsExpanded": {}} if grouped else {}))


def save_runs_view(experiment_id: str) -> None:
    """Store the views `RUNS_VIEW` and `SWEEPS_VIEW` on the experiment (in the store MLflow points at), unless it
    holds them already."""
    import mlflow

    tags = mlflow.get_experiment(experiment_id).tags
    for name, state in ((RUNS_VIEW, runs_view_state()), (SWEEPS_VIEW, runs_view_state(grouped=True))):
        if tags.get(f"mlflow.sharedViewState.{name}") != state:
            mlflow.MlflowClient().set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{name}", state)


def runs_page(base_url: str, experiment_id: str, view: str = RUNS_VIEW) -> str:
    """The UI address of an experiment's runs table, in the Model training view, with the LoRA settings and key
    results as columns (`view`: `SWEEPS_VIEW` groups the runs by sweep).

    `runs_page("http://127.0.0.1:5000", "1")`
    -> `'http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=lora-and-results&workflowType=machine_learning'`
    """
    return f"{base_url}/#/experiments/{experiment_id}/runs?viewStateShareKey={view}&workflowType={WORKFLOW}"
