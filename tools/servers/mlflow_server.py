"""The MLflow tracking server: runs in PostgreSQL, artifacts proxied to the object store, MLflow's basic-auth app;
every address and secret from the environment."""

from __future__ import annotations

import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from tools.servers.process import LOOPBACK, Service, ServiceError, start

# every user may read and write every experiment and registered model: the team shares one experiment
DEFAULT_PERMISSION = "EDIT"

# how long a worker of the server trusts a user and password it has checked: each check is a scrypt hash, ~0.13
# CPU-s, and every request of a training (its metrics each step, its system metrics, each artifact) carries them;
# a changed password or a deleted user is refused at once by the worker that made the change, by the others after
# at most this long (MLflow's `auth_cache_ttl_seconds`)
AUTH_CACHE_SECONDS = 60

AUTH_CONFIG = """[mlflow]
default_permission = {permission}
database_uri = {database_uri}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = {cache_seconds}
"""


def mlflow_server_command(host: str, port: int, workers: int) -> list[str]:
    """`mlflow server` with the basic-auth app; the stores come from MLFLOW_BACKEND_STORE_URI and
    MLFLOW_ARTIFACTS_DESTINATION in its environment."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--app-name",
        "basic-auth",
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


REQUIRED = (
    "MLFLOW_BACKEND_STORE_URI",
    "MLFLOW_AUTH_DATABASE_URI",
    "MLFLOW_ARTIFACTS_DESTINATION",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)


def server_environment(environ: Mapping[str, str], folder: Path) -> dict[str, str]:
    """`environ` with the auth app's config file (written to `folder`, no secret in it) named in it.

    Raises `ServiceError` naming every required variable that is missing; the password belongs in
    PGPASSWORD (or ~/.pgpass), not in MLFLOW_BACKEND_STORE_URI, whose value the server may print.
    """
    missing = [name for name in REQUIRED if not environ.get(name)]
    if missing:
        raise ServiceError(f"set {', '.join(missing)} for the MLflow server (see docs/team.md, 'Working as a team')")
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI"):
        uri = urllib.parse.urlsplit(environ[name])
        if not uri.scheme.startswith("postgresql"):
            raise ServiceError(f"{name} must be a postgresql:// URI (PostgreSQL holds the team's runs)")
        if uri.password is not None:
            raise ServiceError(f"{name} holds a password: put it in PGPASSWORD (or ~/.pgpass) instead")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "basic_auth.ini"
    config.write_text(
        AUTH_CONFIG.format(
            permission=DEFAULT_PERMISSION,
            database_uri=environ["MLFLOW_AUTH_DATABASE_URI"],
            cache_seconds=AUTH_CACHE_SECONDS,
        ),
        encoding="utf-8",
    )
    return dict(environ) | {"MLFLOW_AUTH_CONFIG_PATH": str(config)}


def start_mlflow(environ: Mapping[str, str], folder: Path, host: str, port: int, workers: int = 2) -> Service:
    """The MLflow tracking server on `host:port`, configured by `environ` (see `server_environment`); returns
    once it answers /health."""
    env = server_environment(environ, folder)
    service = start("MLflow server", mlflow_server_command(host, port, workers), folder / "mlflow-server.log", env)
    service.wait_until(lambda: _healthy(f"http://{LOOPBACK if host == '0.0.0.0' else host}:{port}"), timeout=180)
    return service


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def add_user(tracking_uri: str, username: str, password: str) -> None:
    """Create a user of the server's basic-auth app, as the admin that MLFLOW_TRACKING_USERNAME/PASSWORD name."""
    from mlflow.server import get_app_client

    get_app_client("basic-auth", tracking_uri=tracking_uri).create_user(username=username, password=password)
