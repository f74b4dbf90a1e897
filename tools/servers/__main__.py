"""`python -m tools.servers mlflow | add-user | local`: see `tools.servers`."""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys
from pathlib import Path

import tools.servers
from tools.servers.mlflow_server import add_user, start_mlflow
from tools.servers.process import LOOPBACK, wait_for_interrupt
from tools.servers.team import local_team, team_environment


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.servers", description=tools.servers.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("mlflow", help="the MLflow server on PostgreSQL and S3, with basic auth")
    server.add_argument("--host", default=LOOPBACK, help="the interface to listen on; 0.0.0.0 = every one")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--workers", type=int, default=2)
    server.add_argument("--folder", type=Path, default=Path(".mlflow-server"), help="the auth config and the log")
    user = commands.add_parser("add-user", help="a user of the tracking server (password on stdin), as its admin")
    user.add_argument("username")
    local = commands.add_parser("local", help="SeaweedFS, PostgreSQL and the MLflow server on this machine")
    local.add_argument("--folder", type=Path, default=Path(".team"), help="their data and logs, emptied first")
    local.add_argument("--port", type=int, default=5000, help="the MLflow server's")
    local.add_argument("--s3-port", type=int, default=8333)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the services as Ctrl-C does

    if args.command == "mlflow":
        service = start_mlflow(os.environ, args.folder, args.host, args.port, args.workers)
        print(f"MLflow server on http://{args.host}:{args.port} (log: {service.log})", flush=True)
        wait_for_interrupt(service)
    elif args.command == "add-user":
        uri = os.environ.get("MLFLOW_TRACKING_URI") or sys.exit("set MLFLOW_TRACKING_URI to the server's address")
        password = getpass.getpass(f"{args.username}'s password: ") if sys.stdin.isatty() else sys.stdin.readline()
        add_user(uri, args.username, password.rstrip("\n"))
        print(f"user {args.username} created on {uri}", flush=True)
    else:
        with local_team(args.folder.resolve(), args.port, args.s3_port) as team:
            env_file = args.folder / "env"
            env_file.touch(mode=0o600)
            exports = team_environment(team, *team.admin)
            env_file.write_text("".join(f"export {key}={value}\n" for key, value in exports.items()), encoding="utf-8")
            print(f"Running; Ctrl-C stops them. In a clone: . {env_file.resolve()}   (the admin's keys)", flush=True)
            wait_for_interrupt(team.services[-1])


if __name__ == "__main__":
    main()
