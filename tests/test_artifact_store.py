"""The S3 paths of a run against the artifact store of each Kubeflow release, with the
credentials a profile gets there.

Kubeflow 1.10 (MinIO; moto stands in): the profile's Secret holds the root keys, everything is
allowed. Kubeflow 1.11 (the real SeaweedFS, tests/harness/seaweedfs.py): the profile's user
may read, write and list only under ``mlpipeline/{artifacts,shared}/`` and
``mlpipeline/{private,private-artifacts}/<namespace>/``, and create no bucket. On both: the
pipeline's default ``storage_prefix`` takes the deploy's bundle, KServe's storage
initializer reads it back with the same keys, ``ldm download --source s3://`` reads data;
on 1.11 a write elsewhere fails with an error naming where the keys may write.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from minio.error import S3Error

from ldm_core import storage
from ldm_core.bundle import digest as bundle_digest
from ldm_core.cli import main
from ldm_core.errors import LdmError, StorageError
from ldm_core.kube import client as kube_client
from ldm_core.stages import deploy_stage
from tests.harness.configs import MODEL, SERVE_OVERRIDES, serve_config
from tests.harness.data import random_bundle
from tests.harness.s3 import kserve_storage_initializer, moto_store, raw_client, s3_server
from tests.harness.seaweedfs import (
    BUCKET,
    NAMESPACE,
    identity_actions,
    profile_policy,
    seaweedfs_server,
    weed_or_skip,
)

ROOT = Path(__file__).resolve().parents[1]
COMPILED = ROOT / "pipelines" / "brain_ldm.yaml"
RELEASE_OF = {"moto": "1.10 (MinIO)", "seaweedfs": "1.11 (SeaweedFS)"}


@pytest.fixture(scope="module")
def moto_endpoint():
    with s3_server() as url:
        yield url


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory):
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs"), weed_or_skip()) as store:
        yield store


@pytest.fixture(params=list(RELEASE_OF), ids=list(RELEASE_OF.values()))
def store(request, monkeypatch):
    """The artifact store of one release, the run's environment holding the profile's keys."""
    if request.param == "moto":
        chosen = moto_store(request.getfixturevalue("moto_endpoint"))
    else:
        chosen = request.getfixturevalue("seaweedfs")
    chosen.env(monkeypatch)
    return chosen


@pytest.fixture
def pipeline_pod(tmp_path, monkeypatch):
    """What a pipeline step's pod knows of itself: its namespace, in the file the kubelet
    mounts beside the service-account token; no API server is reachable here."""
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "namespace").write_text(NAMESPACE)
    monkeypatch.setattr(kube_client, "SERVICE_ACCOUNT_DIR", account)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != storage.COMPLETE_MARKER
    }


def _default_storage_prefix() -> str:
    """``storage_prefix`` as the checked-in pipeline offers it in the Kubeflow UI."""
    spec = next(yaml.safe_load_all(COMPILED.read_text()))
    return spec["root"]["inputDefinitions"]["parameters"]["storage_prefix"]["defaultValue"]


# --------------------------------------------------------------------------- the profile's scope


def test_the_profile_policy_becomes_seaweedfs_identity_actions():
    """As SeaweedFS's IAM API stores Kubeflow 1.11's policy: one action per (resource, action),
    each scoped to its path; nothing bucket-wide, no Admin."""
    actions = identity_actions(profile_policy("team-a"))
    paths = [
        "mlpipeline/artifacts/*",
        "mlpipeline/private-artifacts/team-a/*",
        "mlpipeline/private/team-a/*",
        "mlpipeline/shared/*",
    ]
    assert sorted(actions) == sorted(f"{a}:{p}" for p in paths for a in ("Write", "Read", "List"))
    everywhere = {
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::*"}]
    }
    assert identity_actions(everywhere) == ["Admin"]
    with pytest.raises(ValueError, match="only Allow"):
        identity_actions({"Statement": [{**everywhere["Statement"][0], "Effect": "Deny"}]})
    with pytest.raises(ValueError, match="not a valid action"):
        identity_actions({"Statement": [{**everywhere["Statement"][0], "Action": "s3:Delete*"}]})


def test_the_profile_user_reaches_only_its_prefixes(seaweedfs, tmp_path):
    """The real server enforces that scope: the profile's user writes under its private
    prefix and the shared one, not in another profile's or KFP's default root, and makes no
    bucket."""
    src = tmp_path / "a.bin"
    src.write_bytes(b"payload")
    client = raw_client(seaweedfs.endpoint, seaweedfs.user)
    client.fput_object(BUCKET, f"private/{NAMESPACE}/x/a.bin", str(src))
    client.fput_object(BUCKET, "shared/x/a.bin", str(src))
    for key in ("private/other-team/a.bin", "v2/artifacts/a.bin"):
        with pytest.raises(S3Error) as err:
            client.fput_object(BUCKET, key, str(src))
        assert err.value.code == "AccessDenied"
    with pytest.raises(S3Error) as err:
        client.make_bucket("brain-ldm")
    assert err.value.code == "AccessDenied"


def test_the_namespace_placeholder():
    assert (
        storage.fill_namespace("s3://mlpipeline/private/{namespace}/models", "team-a")
        == "s3://mlpipeline/private/team-a/models"
    )
    assert storage.fill_namespace("s3://my-bucket/models", "team-a") == "s3://my-bucket/models"
    with pytest.raises(StorageError, match=r"storage_prefix .*\{ns\}.*\{namespace\}"):
        storage.fill_namespace("s3://mlpipeline/private/{ns}/models", "team-a")


# --------------------------------------------------------------------------- deploy and serve


def test_the_default_storage_prefix_takes_the_deployed_bundle_and_kserve_reads_it(
    store, pipeline_pod, tmp_path, caplog
):
    """The deploy stage, with the pipeline's default storage_prefix, puts the bundle where the
    profile's keys may write on every release (the run's namespace filled in from the pod),
    without asking to create a bucket; a second deploy of the same bundle sends nothing
    again; KServe's storage initializer, with the same keys, gets every file back."""
    bundle = random_bundle(tmp_path / "bundle", serve_config())
    caplog.set_level(logging.DEBUG, logger="urllib3.connectionpool")
    for _ in range(2):  # the rollout needs an API server, which this test has none of
        with pytest.raises(LdmError, match="pass an explicit API host"):
            deploy_stage(
                bundle,
                tmp_path / "deployment",
                overrides=SERVE_OVERRIDES,
                backend="kubeflow",
                storage_prefix=_default_storage_prefix(),
            )
    # <storage_prefix>/<model>/<sha256[:16]>, the prefix the deploy names by the bundle's digest
    key = f"private/{NAMESPACE}/models/{MODEL}/{bundle_digest(bundle)[:16]}"
    uri = f"s3://{BUCKET}/{key}"
    assert store.admin_client().stat_object(BUCKET, f"{key}/{storage.COMPLETE_MARKER}")
    sent = [r.getMessage() for r in caplog.records if r.name == "urllib3.connectionpool"]
    assert not [m for m in sent if f'"PUT /{BUCKET} HTTP' in m]  # no CreateBucket
    puts = [m for m in sent if f'"PUT /{BUCKET}/{key}/unet.pt HTTP' in m]
    assert len(puts) == 1, "the second deploy uploaded unet.pt again"

    fetched = kserve_storage_initializer(
        uri, tmp_path / "mnt" / "models", store.endpoint, store.user
    )
    assert f"{key}/bundle.json" in fetched
    assert _tree(tmp_path / "mnt" / "models") == _tree(bundle)
    # ... and what the deploy itself reads back: the marker lists exactly the bundle's files.
    assert set(storage.read_manifest(uri)) == set(_tree(bundle))


def test_ldm_download_reads_a_dataset_from_the_profile_prefix(store, tmp_path, capsys):
    """A folder of NIfTI scans uploaded under the profile's prefix, read back by the CLI."""
    raw = tmp_path / "scans"
    raw.mkdir()
    for i in (1, 2):
        volume = np.random.default_rng(i).random((6, 6, 6)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), raw / f"sub-{i}.nii.gz")
    uri = f"{store.fresh_root()}/datasets/scans"
    storage.upload_dir(raw, uri)
    out = tmp_path / "raw"
    assert main(["download", "--source", uri, "--output", str(out)]) == 0, capsys.readouterr().err
    assert {k: v for k, v in _tree(out).items() if k.endswith(".nii.gz")} == _tree(raw)


# --------------------------------------------------------------------------- outside the scope


@pytest.mark.parametrize(
    "uri",
    [
        "s3://brain-ldm/models/brain-ldm/0123456789abcdef",  # the pipeline's former default
        f"s3://{BUCKET}/v2/artifacts/bundle",  # KFP's own default pipeline root on 1.10
        f"s3://{BUCKET}/private/other-team/models",  # another profile's
    ],
)
def test_a_write_outside_the_profile_prefixes_names_where_it_may_write(
    seaweedfs, monkeypatch, tmp_path, uri
):
    seaweedfs.env(monkeypatch)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bundle.json").write_text("{}")
    with pytest.raises(StorageError) as err:
        storage.upload_dir(tmp_path / "src", uri)
    message = str(err.value)
    assert message.startswith(f"upload to {uri} failed: access refused (AccessDenied): ")
    assert "Kubeflow 1.11" in message
    assert f"s3://{BUCKET}/private/<namespace>/" in message
    assert seaweedfs.user.secret not in message


def test_a_read_outside_the_profile_prefixes_names_them_too(seaweedfs, monkeypatch, tmp_path):
    seaweedfs.env(monkeypatch)
    uri = f"s3://{BUCKET}/v2/artifacts/x/model.pt"
    with pytest.raises(StorageError, match=f"s3://{BUCKET}/private/<namespace>/"):
        storage.download_file(uri, tmp_path / "model.pt")


def test_a_missing_object_inside_the_profile_prefix_is_called_missing(
    seaweedfs, monkeypatch, tmp_path
):
    """The profile's keys may not look at the bucket (HeadBucket is refused), which must not
    turn "no such object" into "access refused"."""
    seaweedfs.env(monkeypatch)
    uri = f"{seaweedfs.fresh_root()}/missing.pt"
    with pytest.raises(StorageError, match=f"{uri} failed: no such object"):
        storage.download_file(uri, tmp_path / "m.pt")
    assert not storage.exists(uri)
    with pytest.raises(StorageError, match="not a complete directory"):
        storage.download_dir(seaweedfs.fresh_root(), tmp_path / "d")
