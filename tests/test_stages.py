"""ldm_core.stages: backend choice, and restart-safe training on the cluster-style path
(inputs staged on the shared volume, run dir reused when inputs and config match)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm_core import stages
from ldm_core.config import ConfigError
from ldm_core.launcher import LaunchError, LocalLauncher
from tests.harness.configs import TINY_OVERRIDES, tiny_config
from tests.harness.data import tiny_cache
from tests.harness.kube import KubeApi

TRAIN = [
    *TINY_OVERRIDES,
    "train.autoencoder.steps=2",
    "train.autoencoder.batch_size=2",
    "train.val_every=2",
    "train.checkpoint_every=2",
    "train.log_every=1",
]


# --------------------------------------------------------------------------- backend choice


def test_unknown_backend_is_rejected_by_name():
    with pytest.raises(
        stages.StageError, match="backend: 'k8s' is not one of auto, local, kubeflow"
    ):
        stages.choose_backend("k8s")


def test_auto_outside_a_cluster_trains_locally(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert stages.choose_backend("auto") == "local"
    assert stages.choose_backend("kubeflow") == "kubeflow"


PROBE_PATH = "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs/ldm-backend-probe"


def _in_a_pod_with_kubeconfig(monkeypatch, tmp_path, url: str) -> None:
    """KUBERNETES_SERVICE_HOST set (as in a pod), the API reached through a kubeconfig
    whose context names namespace team-a."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "t",
                "clusters": [{"name": "t", "cluster": {"server": url}}],
                "users": [{"name": "t", "user": {"token": "x"}}],
                "contexts": [
                    {"name": "t", "context": {"cluster": "t", "user": "t", "namespace": "team-a"}}
                ],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    # The kubernetes client reads $KUBECONFIG once, at import (maybe in an earlier test).
    monkeypatch.setattr(
        "kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig)
    )
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")


def test_auto_in_a_cluster_uses_pytorchjobs_when_the_api_is_served(tmp_path, monkeypatch):
    with KubeApi({"kubeflow.org/v1/pytorchjobs": "PyTorchJob"}) as api:
        _in_a_pod_with_kubeconfig(monkeypatch, tmp_path, api.url)
        assert stages.choose_backend("auto") == "kubeflow"
        assert [str(r.url.path) for r in api.requests()] == [PROBE_PATH]


TRAINJOB_PROBE_PATH = (
    "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs/ldm-backend-probe"
)


def test_auto_in_a_cluster_with_only_trainer_v2_uses_trainjobs(tmp_path, monkeypatch):
    with KubeApi({"trainer.kubeflow.org/v1alpha1/trainjobs": "TrainJob"}) as api:
        _in_a_pod_with_kubeconfig(monkeypatch, tmp_path, api.url)
        assert stages.choose_backend("auto") == "trainjob"
        assert [str(r.url.path) for r in api.requests()] == [PROBE_PATH, TRAINJOB_PROBE_PATH]


def test_auto_in_a_cluster_without_a_training_job_api_fails_naming_both(tmp_path, monkeypatch):
    """Never train inside the 1-CPU pipeline pod by surprise: neither CRD
    installed, each path answers the apiserver's plain-text "404 page not found"."""
    with KubeApi() as api:
        _in_a_pod_with_kubeconfig(monkeypatch, tmp_path, api.url)
        with pytest.raises(stages.StageError) as err:
            stages.choose_backend("auto")
        assert [str(r.url.path) for r in api.requests()] == [PROBE_PATH, TRAINJOB_PROBE_PATH]
    text = str(err.value)
    assert "PyTorchJob (kubeflow.org/v1" in text and "API answered 404" in text
    assert "TrainJob (trainer.kubeflow.org/v1alpha1" in text
    assert "brain-ldm-pipeline-runner" in text and "backend=local" in text


def test_auto_in_a_cluster_whose_api_refuses_the_probes_fails_naming_the_rbac(
    tmp_path, monkeypatch
):
    """No permission to read either job kind is no way to run them: fail, say which grant."""
    with KubeApi(
        {
            "kubeflow.org/v1/pytorchjobs": "PyTorchJob",
            "trainer.kubeflow.org/v1alpha1/trainjobs": "TrainJob",
        }
    ) as api:
        api.emulator["get", PROBE_PATH] << 403
        api.emulator["get", TRAINJOB_PROBE_PATH] << 403
        _in_a_pod_with_kubeconfig(monkeypatch, tmp_path, api.url)
        with pytest.raises(stages.StageError, match="answered 403.*answered 403.*Role"):
            stages.choose_backend("auto")


def test_auto_in_a_pod_without_any_credentials_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setattr(
        "kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "missing")
    )
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    with pytest.raises(stages.StageError, match="no Kubernetes configuration"):
        stages.choose_backend("auto")


def test_backends_named_explicitly_are_used_without_probing(monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")  # probing would fail here
    for backend in ("local", "kubeflow", "trainjob"):
        assert stages.choose_backend(backend) == backend


# --------------------------------------------------------------------------- training


class CountingLauncher(LocalLauncher):
    """The local launcher, counting launches: the stage under test decides whether to launch."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def run(self, task) -> None:
        self.names.append(task.name)
        super().run(task)


@pytest.mark.parametrize("backend", ["kubeflow", "local"])
def test_training_reuses_a_finished_run_with_the_same_inputs(tmp_path, monkeypatch, backend):
    """kubeflow: inputs staged on the PVC (cluster.workdir), run dir there. local with a
    local_workdir: run dir under it. Either way a retry with the same inputs copies the finished run, and only a
    change that matters to training starts a new one."""
    cache = tiny_cache(tmp_path / "cache")
    workdir = tmp_path / ("pvc" if backend == "kubeflow" else "work")
    launcher = CountingLauncher()
    # On the kubeflow path the PyTorchJob launcher is replaced by torchrun on this machine;
    # everything around it (staging, run dir on the volume, copy out) is the real path.
    monkeypatch.setattr(stages, "_launcher", lambda chosen, cfg, stage: launcher)

    def train(out: str, overrides: list[str]) -> dict:
        return stages.train_autoencoder_stage(
            cache,
            tmp_path / out,
            "",
            [*overrides, f"cluster.workdir={workdir}"],
            backend=backend,
            local_workdir=str(workdir),
        )

    info = train("artifact1", TRAIN)
    assert info["backend"] == backend and not info["reused"]
    run_dir = Path(info["run_dir"])
    runs = workdir / ("brain-ldm/runs" if backend == "kubeflow" else "runs")
    assert run_dir == runs / info["job"]
    assert (run_dir / "autoencoder.pt").is_file() and (
        tmp_path / "artifact1" / "autoencoder.pt"
    ).is_file()
    assert json.loads((tmp_path / "artifact1" / "stage.json").read_text())["job"] == info["job"]
    # Resume state stays in the run dir; the artifact gets the model, config and curves.
    assert (run_dir / "checkpoints").is_dir() and not (
        tmp_path / "artifact1" / "checkpoints"
    ).exists()
    assert (tmp_path / "artifact1" / "metrics.jsonl").is_file()
    staged = workdir / "brain-ldm" / "inputs" / f"{info['job']}-data" / "manifest.json"
    assert staged.is_file() is (backend == "kubeflow")

    # Same inputs, plus a change training does not depend on: no new run, the finished one is copied.
    again = train("artifact2", [*TRAIN, "evaluation.num_samples=3"])
    assert again["reused"] and again["job"] == info["job"]
    assert (tmp_path / "artifact2" / "autoencoder.pt").read_bytes() == (
        run_dir / "autoencoder.pt"
    ).read_bytes()
    assert launcher.names == [info["job"]]

    if backend == "local":
        return  # the key is the same code on both paths; one more training is enough
    # A change training does depend on is a new run.
    changed = train("artifact3", [*TRAIN, "train.autoencoder.steps=1"])
    assert changed["job"] != info["job"] and not changed["reused"]
    assert launcher.names == [info["job"], changed["job"]]


def test_kubeflow_backend_needs_an_image_and_a_volume(tmp_path):
    """The training image and the shared PVC are config (cluster.image, cluster.pvc_name):
    a run without them fails while its config resolves, naming the field."""
    with pytest.raises(ConfigError, match="cluster.image: must name the training image"):
        tiny_config("cluster.image=")
    with pytest.raises(ConfigError, match="cluster.pvc_name"):
        tiny_config("cluster.pvc_name=")


def test_trainjob_backend_runs_training_as_a_trainjob(tmp_path, monkeypatch):
    from ldm_core.kube.trainjob import TrainJobLauncher

    _in_a_pod_with_kubeconfig(monkeypatch, tmp_path, "http://127.0.0.1:9")
    launcher = stages._launcher("trainjob", tiny_config(), "train_autoencoder")
    assert isinstance(launcher, TrainJobLauncher) and launcher.namespace == "team-a"


class _Launched(Exception):
    pass


def test_nproc_and_nnodes_reach_the_training_task_and_key_the_run(tmp_path, monkeypatch):
    """Processes and nodes (train.nproc, train.nnodes) change the world size and so the
    effective batch: they are part of the task the launcher gets and of the run's key; the
    local backend refuses more than one node."""
    cache = tiny_cache(tmp_path / "cache")
    tasks = []

    class Recording:
        def run(self, task) -> None:
            tasks.append(task)
            raise _Launched

    monkeypatch.setattr(stages, "_launcher", lambda chosen, cfg, stage: Recording())
    worlds = [(4, 1), (4, 2), (2, 2)]
    for nproc, nnodes in worlds:
        with pytest.raises(_Launched):
            stages.train_autoencoder_stage(
                cache,
                tmp_path / f"out{nproc}x{nnodes}",
                "",
                [
                    *TRAIN,
                    f"cluster.workdir={tmp_path / 'pvc'}",
                    f"train.nproc={nproc}",
                    f"train.nnodes={nnodes}",
                ],
                backend="kubeflow",
            )
    assert [(t.nproc_per_node, t.nnodes) for t in tasks] == worlds
    assert len({t.name for t in tasks}) == len(worlds)

    monkeypatch.undo()
    with pytest.raises(LaunchError, match="the local launcher runs on one node; got nnodes=2"):
        stages.train_autoencoder_stage(
            cache,
            tmp_path / "local",
            "",
            [*TRAIN, "train.nnodes=2"],
            backend="local",
        )
