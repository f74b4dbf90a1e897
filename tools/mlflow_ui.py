"""Start the MLflow UI on this project's store and print the address of its runs table.

    python -m tools.mlflow_ui [--port 5000] [--workers 1]     # what `make mlflow-ui` runs

Not a pipeline stage: it lives outside `stages/`, so changing it reruns nothing. The table opens on the view
`lora-and-results` (`finetune.tracking.ui.RUNS_VIEW`): one column per LoRA setting and key result; the second address
it prints opens the same table with the runs grouped by sweep (`SWEEPS_VIEW`).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from pathlib import Path

from finetune.config.params import load
from finetune.tracking.store import TrackingConfig, is_tracking_server, open_store, store_root, tracking_uri
from finetune.tracking.ui import SWEEPS_VIEW, runs_page, save_runs_view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    # one person's viewer: one worker starts in ~6 s and holds ~0.5 GB, where `mlflow ui`'s default of four starts
    # four copies of the server (~9 s on 2 idle cores, ~1.3 GB in 7 processes)
    parser.add_argument("--workers", type=int, default=1, help="server processes (mlflow ui's default: 4)")
    args = parser.parse_args()

    experiment_id = open_store(load(TrackingConfig, args.params, "tracking"), os.environ, Path.cwd())
    save_runs_view(experiment_id)
    uri = tracking_uri(os.environ, store_root(os.environ, Path.cwd()))
    if is_tracking_server(uri):  # a tracking server (MLFLOW_TRACKING_URI) is its own UI
        parts = urllib.parse.urlsplit(uri)
        server = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}".rstrip("/")  # no user:password@
        print(f"MLflow UI: the tracking server's own (log in there): {runs_page(server, experiment_id)}")
        print(f"  the runs grouped by sweep: {runs_page(server, experiment_id, SWEEPS_VIEW)}")
        return
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {uri}: {runs_page(base, experiment_id)}", flush=True)
    print(f"  the runs grouped by sweep: {runs_page(base, experiment_id, SWEEPS_VIEW)}", flush=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host]
    os.execv(sys.executable, [*command, "--port", str(args.port), "--workers", str(args.workers)])


if __name__ == "__main__":
    main()
