"""The compiled pipeline: checked in and current, configure then six tasks wired as designed,
deploy gated, and the cluster settings (PVC, secret, GPU) present in the platform spec."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "pipelines" / "brain_ldm.yaml"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    """Compile exactly as ``make compile`` does, in a clean process."""
    out = tmp_path_factory.mktemp("compile") / "brain_ldm.yaml"
    subprocess.run(
        [sys.executable, "-m", "pipelines.brain_ldm", "--output", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return out


@pytest.fixture(scope="module")
def docs(compiled) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(compiled.read_text())
    return spec, platform


def test_checked_in_yaml_is_current(compiled):
    assert compiled.read_text() == CHECKED_IN.read_text(), (
        "pipelines/brain_ldm.yaml is stale: run 'make compile' and commit it"
    )


def test_configure_then_six_tasks_and_their_dependencies(docs):
    spec, _ = docs
    root = spec["root"]["dag"]["tasks"]
    gate = [name for name, t in root.items() if "triggerPolicy" in t]
    assert len(gate) == 1
    inner = spec["components"][root[gate[0]]["componentRef"]["name"]]["dag"]["tasks"]
    deps = {
        name: sorted(t.get("dependentTasks", []))
        for name, t in {**root, **inner}.items()
        if name not in gate
    }
    # Every step takes its overrides from configure (the one place parameters meet the config).
    assert deps == {
        "configure": [],
        "download": ["configure"],
        "preprocess": ["configure", "download"],
        "train-autoencoder": ["configure", "preprocess"],
        "train-diffusion": ["configure", "preprocess", "train-autoencoder"],
        "evaluate": ["configure", "preprocess", "train-autoencoder", "train-diffusion"],
        "deploy": [],  # inside the gate; the gate itself waits for evaluate
    }
    assert sorted(root[gate[0]]["dependentTasks"]) == ["configure", "evaluate", "train-diffusion"]
    condition = root[gate[0]]["triggerPolicy"]["condition"]
    assert "pipelinechannel--evaluate-Output" in condition and condition.endswith("== true")
    # Artifacts flow along the edges: bundle from train-diffusion to evaluate and deploy.
    ev_in = root["evaluate"]["inputs"]["artifacts"]
    assert ev_in["bundle"]["taskOutputArtifact"] == {
        "outputArtifactKey": "bundle",
        "producerTask": "train-diffusion",
    }
    assert ev_in["cache"]["taskOutputArtifact"]["producerTask"] == "preprocess"


def test_parameters_users_set(docs):
    spec, _ = docs
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in (
        "source",
        "preset",
        "overrides",
        "nproc",
        "backend",
        "image",
        "eval_steps",
        "eval_samples",
        "gate_max_mmd",
        "gate_min_mask_dice",
    ):
        assert name in params, name
    assert params["preset"]["defaultValue"] == "tiny-cpu"
    assert params["backend"]["defaultValue"] == "auto"


def test_image_given_at_compile_time_is_the_image_parameters_default(tmp_path):
    """``--image`` (``make compile IMAGE=...``) replaces the default every task and training
    pod runs, in the compiled parameter itself: no environment variable decides it."""
    out = tmp_path / "brain_ldm.yaml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.brain_ldm",
            "--output",
            str(out),
            "--image",
            "registry.example/brain-ldm-training:2.0",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    spec, _ = yaml.safe_load_all(out.read_text())
    image = spec["root"]["inputDefinitions"]["parameters"]["image"]
    assert image["defaultValue"] == "registry.example/brain-ldm-training:2.0"


def test_cluster_settings_are_in_the_platform_spec(docs):
    spec, platform = docs
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # In the fields every backend from 2.4 on reads (pipelines/kfp_compat.py): the PVC from
    # the pvc_name parameter, the S3 Secret by its constant name, required.
    for name in ("exec-train-autoencoder", "exec-train-diffusion"):
        (mount,) = executors[name]["pvcMount"]
        assert mount == {"componentInputParameter": "pvc_name", "mountPath": "/workspace"}
    for name in ("exec-download", "exec-deploy"):
        (secret,) = executors[name]["secretAsEnv"]
        assert secret["secretName"] == "brain-ldm-s3" and "optional" not in secret, name
        assert {k["envVar"] for k in secret["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "S3_ENDPOINT",
        }
    assert executors["exec-evaluate"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    containers = spec["deploymentSpec"]["executors"]
    assert (
        containers["exec-evaluate"]["container"]["resources"]["accelerator"]["resourceType"]
        == "nvidia.com/gpu"
    )
    for name, ex in containers.items():
        # Evaluate (it may drive a GPU) runs the CUDA image, every other step the CPU build;
        # each image carries kfp (no pip install at run time).
        param = "image" if name == "exec-evaluate" else "step_image"
        assert (
            ex["container"]["image"] == f"{{{{$.inputs.parameters['pipelinechannel--{param}']}}}}"
        ), name
        assert "pip install" not in " ".join(ex["container"]["command"]), name
