"""The supported Kubeflow releases (manifests/releases.yaml) as objects tests parametrise over.

Users run releases, not the newest upstream: each :class:`Release` says which KFP backend,
training API, KServe and artifact store a Kubeflow release installs, which CRD files its API
server serves, and which Pod Security level its profile namespaces enforce.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "manifests" / "releases.yaml"


@dataclass(frozen=True)
class Release:
    """One Kubeflow release, as its single-command install sets it up."""

    name: str
    entries: dict[str, Any]

    def __str__(self) -> str:
        return self.name

    @property
    def kfp_backend(self) -> str:
        return self.entries["kfp_backend"]["version"]

    @property
    def training_api(self) -> str:
        """What the pipeline's ``backend=auto`` finds: PyTorchJob where the Training Operator
        is installed, else TrainJob where only Trainer v2 is."""
        if self.entries["training_operator"]["version"]:
            return "PyTorchJob"
        if self.entries["trainer"]["version"]:
            return "TrainJob"
        raise ValueError(f"Kubeflow {self.name} installs no training API")

    @property
    def pod_security(self) -> str:
        """The level profile namespaces enforce; "privileged" where they carry no label."""
        return self.entries["pod_security"]["profile_namespaces"] or "privileged"

    @property
    def crd_files(self) -> tuple[Path, ...]:
        """Every CRD the release's API server serves for a kind we emit."""
        paths = [
            *self.entries["training_operator"].get("crds", []),
            *self.entries["trainer"].get("crds", []),
            *self.entries["kserve"]["crds"],
            *_table()["cluster_crds"]["crds"],
        ]
        return tuple(ROOT / p for p in paths)


@functools.cache
def _table() -> dict[str, Any]:
    return yaml.safe_load(TABLE.read_text())


def releases() -> tuple[Release, ...]:
    return tuple(Release(name, entries) for name, entries in _table()["releases"].items())


RELEASES = releases()
