"""All three stores on this machine (`python -m tools.servers local`, and the tests): fresh keys and passwords,
empty stores, stopped together; what a clone's shell needs to use them."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tools.servers.mlflow_server import start_mlflow
from tools.servers.postgres import Postgres, start_postgres
from tools.servers.process import LOOPBACK, Service, free_port
from tools.servers.s3 import BUCKET, S3, start_s3


@dataclass
class Team:
    """The running services and what a clone needs to use them."""

    services: list[Service]
    s3: S3
    postgres: Postgres
    mlflow_url: str
    admin: tuple[str, str]


@contextlib.contextmanager
def local_team(folder: Path, mlflow_port: int, s3_port: int, host: str = LOOPBACK) -> Iterator[Team]:
    """SeaweedFS, PostgreSQL and the MLflow server on this machine, with fresh random keys and passwords and empty
    stores (what an earlier start left in `folder` is deleted); all stopped on exit."""
    for part in ("s3", "postgres", "mlflow"):
        shutil.rmtree(folder / part, ignore_errors=True)
    services: list[Service] = []
    try:
        s3_service, s3 = start_s3(folder / "s3", s3_port, secrets.token_hex(10), secrets.token_hex(20))
        services.append(s3_service)
        pg_service, postgres = start_postgres(
            folder / "postgres", free_port(), "mlflow", secrets.token_hex(16), ("mlflow", "mlflow_auth")
        )
        services.append(pg_service)
        admin = ("admin", secrets.token_hex(16))
        environ = dict(os.environ) | {
            "MLFLOW_BACKEND_STORE_URI": postgres.uri("mlflow"),
            "MLFLOW_AUTH_DATABASE_URI": postgres.uri("mlflow_auth"),
            "PGPASSWORD": postgres.password,
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow",
            "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "MLFLOW_AUTH_ADMIN_USERNAME": admin[0],
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        }
        services.append(start_mlflow(environ, folder / "mlflow", host, mlflow_port, workers=1))
        yield Team(services, s3, postgres, f"http://{LOOPBACK}:{mlflow_port}", admin)
    finally:
        for service in reversed(services):
            service.stop()


def team_environment(team: Team, username: str, password: str) -> dict[str, str]:
    """What a clone's shell needs for the team's stores: the S3_ENDPOINT of docs/team.md, the bucket's keys (DVC and
    boto3 read AWS_*), and the tracking server with one user's credentials."""
    return {
        "S3_ENDPOINT": team.s3.endpoint,
        "AWS_ACCESS_KEY_ID": team.s3.access_key,
        "AWS_SECRET_ACCESS_KEY": team.s3.secret_key,
        "MLFLOW_TRACKING_URI": team.mlflow_url,
        "MLFLOW_TRACKING_USERNAME": username,
        "MLFLOW_TRACKING_PASSWORD": password,
    }
