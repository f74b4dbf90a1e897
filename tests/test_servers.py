"""tools.servers: the MLflow server is configured by the environment; a service that cannot start says why."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tools.servers import LOOPBACK, ServiceError, server_environment, start_postgres

pytestmark = pytest.mark.slow  # a model, unsloth, a subprocess or a server: not in make test-fast

SERVER = {
    "MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow@db.example.com:5432/mlflow",
    "MLFLOW_AUTH_DATABASE_URI": "postgresql://mlflow@db.example.com:5432/mlflow_auth",
    "MLFLOW_ARTIFACTS_DESTINATION": "s3://finance-deepseek/mlflow",
    "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key",
}


def test_the_server_gets_its_auth_config_from_the_environment_and_no_secret_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.server.auth.config import read_auth_config

    env = server_environment(SERVER, tmp_path)
    config = Path(env["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
    assert "admin-password" not in config and "csrf-key" not in config
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", env["MLFLOW_AUTH_CONFIG_PATH"])
    read = read_auth_config()  # as the server's auth app reads it
    assert read.database_uri == "postgresql://mlflow@db.example.com:5432/mlflow_auth"
    assert read.default_permission == "EDIT"
    assert read.authorization_function == "mlflow.server.auth:authenticate_request_basic_auth"
    assert read.auth_cache_ttl_seconds == 60  # a checked user and password trusted for a minute, not hashed again


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": ""}, "set MLFLOW_AUTH_ADMIN_PASSWORD"),
        ({"MLFLOW_BACKEND_STORE_URI": "sqlite:///mlflow.db"}, "must be a postgresql:// URI"),
        ({"MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow:pw@db/mlflow"}, "holds a password: put it in PGPASSWORD"),
    ],
)
def test_the_server_refuses_missing_settings_other_stores_and_passwords_in_uris(
    tmp_path: Path, change: dict[str, str], message: str
) -> None:
    with pytest.raises(ServiceError, match=message) as refused:
        server_environment(SERVER | change, tmp_path)
    assert "pw" not in str(refused.value)


def test_a_service_that_cannot_start_raises_with_its_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        with pytest.raises(ServiceError, match="PostgreSQL exited") as failed:
            start_postgres(tmp_path, taken.getsockname()[1], "mlflow", "secret", ("mlflow",))
    assert "could not bind" in str(failed.value) or "could not create" in str(failed.value), failed.value
