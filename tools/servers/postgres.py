"""PostgreSQL: a cluster of its own (Debian's binaries), on a free port, in a temporary folder."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tools.servers.process import LOOPBACK, Service, ServiceError, listening, start


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
