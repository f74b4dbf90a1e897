"""Start the MLflow UI on this project's store and print the address of its runs table.

    python -m tools.mlflow_ui [--port 5000]      # what `make mlflow-ui` runs

Not a pipeline stage: it lives outside `stages/`, so changing it reruns nothing. The table opens on the view
`lora-and-results` (`stages.tracking.RUNS_VIEW`): one column per LoRA setting and key result.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stages import params
from stages.tracking import TrackingConfig, runs_page, store_root, tracking_uri, use_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()

    config = params.load(TrackingConfig, args.params, "tracking")
    root = store_root(os.environ, Path.cwd())
    uri = tracking_uri(os.environ, root)
    experiment_id = use_experiment(uri, config.experiment_name, root / "mlartifacts")
    print(f"MLflow UI on {uri}: {runs_page(f'http://{args.host}:{args.port}', experiment_id)}", flush=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host]
    os.execv(sys.executable, [*command, "--port", str(args.port)])


if __name__ == "__main__":
    main()
