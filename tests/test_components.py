"""The KFP components: built for the project image (no pip install at run time), typed
I/O, and a body that connects KFP artifacts to ``ldm_core.stages`` correctly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp import dsl

import components
from tests.harness.configs import GATE_OFF_OVERRIDES, TINY_OVERRIDES, tiny_config
from tests.harness.data import random_bundle, tiny_cache

ALL = {
    "configure": components.configure,
    "download": components.download,
    "preprocess": components.preprocess,
    "train_autoencoder": components.train_autoencoder,
    "train_diffusion": components.train_diffusion,
    "evaluate": components.evaluate,
    "deploy": components.deploy,
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_component_runs_in_the_project_image_without_installing_anything(name):
    comp = ALL[name]
    container = comp.component_spec.implementation.container
    assert container.image == components.base.BASE_IMAGE
    assert "pip install" not in " ".join(container.command)
    # The body delegates to ldm_core.stages (importable only inside the image / venv).
    assert "from ldm_core.stages import" in " ".join(container.command)


def test_typed_inputs_and_outputs():
    spec = {name: c.component_spec for name, c in ALL.items()}
    out = {n: {k: v.type for k, v in (s.outputs or {}).items()} for n, s in spec.items()}
    assert out["download"] == {"raw_data": "system.Dataset@0.0.1"}
    assert out["preprocess"] == {"cache": "system.Dataset@0.0.1"}
    assert out["train_autoencoder"] == {"autoencoder": "system.Model@0.0.1"}
    assert out["train_diffusion"] == {
        "diffusion": "system.Model@0.0.1",
        "bundle": "system.Model@0.0.1",
    }
    assert out["evaluate"] == {
        "evaluation": "system.Artifact@0.0.1",
        "metrics": "system.Metrics@0.0.1",
        "report": "system.HTML@0.0.1",
        "Output": "Boolean",
    }
    assert out["deploy"] == {"deployment": "system.Artifact@0.0.1", "Output": "String"}
    # configure hands every later step its overrides and sizes the evaluate pod.
    assert out["configure"] == {
        "config": "system.Artifact@0.0.1",
        "overrides": "List",
        "data_overrides": "List",
        "training_overrides": "List",
        "evaluate_cpu": "String",
        "evaluate_memory": "String",
        "evaluate_gpus": "String",
    }
    assert spec["train_diffusion"].inputs["autoencoder"].type == "system.Model@0.0.1"
    for name in ALL:
        assert spec[name].inputs["overrides"].type == "List", name


@pytest.mark.parametrize("strict", [False, True])
def test_evaluate_body_fills_metrics_report_and_returns_the_gate(tmp_path, strict):
    """The component function itself, as the executor calls it, on a random-weight bundle."""
    cfg = tiny_config()
    bundle_dir = random_bundle(tmp_path / "bundle", cfg)
    cache = tiny_cache(tmp_path / "cache")

    def artifact(cls, name):
        return cls(name=name, uri=str(tmp_path / "outputs" / name))

    evaluation, metrics, report = (
        artifact(dsl.Artifact, "evaluation"),
        artifact(dsl.Metrics, "metrics"),
        artifact(dsl.HTML, "report"),
    )
    passed = components.evaluate.python_func(
        bundle=dsl.Model(name="bundle", uri=str(bundle_dir)),
        cache=dsl.Dataset(name="cache", uri=str(cache)),
        autoencoder=dsl.Model(name="ae", uri=str(tmp_path / "no-run")),
        diffusion=dsl.Model(name="ldm", uri=str(tmp_path / "no-run")),
        preset="",
        overrides=[
            *TINY_OVERRIDES,
            *GATE_OFF_OVERRIDES,
            "sampling.steps=2",
            "evaluation.num_samples=2",
            "evaluation.steps=2",
            "evaluation.gate_min_ms_ssim_ratio=0",
            "evaluation.gate_max_mmd=1e9",
            "evaluation.gate_max_hist_distance=1e9",
            f"evaluation.gate_min_mask_dice={1.01 if strict else 0.0}",
        ],
        evaluation=evaluation,
        metrics=metrics,
        report=report,
    )
    assert passed is (not strict)
    assert set(metrics.metadata) >= {"mmd", "mask_dice", "hist_distance", "ms_ssim_ratio"}
    assert (
        json.loads(Path(metrics.path).read_text()) == metrics.metadata
    )  # a file: cacheable locally
    assert "<img" in Path(report.path).read_text()
    assert evaluation.metadata["gate_passed"] is (not strict)
    assert ("gate_min_mask_dice" in evaluation.metadata["gate_reason"]) is strict
    assert (Path(evaluation.path) / "metrics.json").is_file()


def test_configure_body_returns_what_the_executor_reads(tmp_path):
    """The component function as the executor calls it: its return value is read field by
    field (the NamedTuple's names), and the resolved config lands in the artifact."""
    config = dsl.Artifact(name="config", uri=str(tmp_path / "config"))
    out = components.configure.python_func(
        preset="gpu-16g",
        overrides=["cluster.evaluate.cpu=3", "train.device=auto"],
        mount_path="/workspace",
        image="registry.example/ldm:1",
        step_image="",
        pvc_name="brain-ldm-data",
        nproc=1,
        nnodes=1,
        eval_samples=0,
        eval_steps=0,
        eval_gpus=0,
        gate_min_ms_ssim_ratio=-1.0,
        gate_max_mmd=-1.0,
        gate_min_mask_dice=0.6,
        gate_max_hist_distance=-1.0,
        deployment_mode="",
        min_replicas=-1,
        max_replicas=-1,
        config=config,
    )
    fields = ("overrides", "evaluate_cpu", "evaluate_memory", "evaluate_gpus")
    got = {name: getattr(out, name) for name in fields}
    assert out.data_overrides == []
    assert out.training_overrides == [
        "cluster.image=registry.example/ldm:1",
        "cluster.pvc_name=brain-ldm-data",
        "train.nproc=1",
        "train.nnodes=1",
        "cluster.evaluate.gpus=0",
        "cluster.evaluate.cpu=3",
        "train.device=auto",
    ]
    assert got == {
        "overrides": [
            "cluster.image=registry.example/ldm:1",
            "cluster.pvc_name=brain-ldm-data",
            "train.nproc=1",
            "train.nnodes=1",
            "cluster.evaluate.gpus=0",
            "evaluation.gate_min_mask_dice=0.6",
            "cluster.evaluate.cpu=3",
            "train.device=auto",
        ],
        "evaluate_cpu": "3",
        "evaluate_memory": "16Gi",
        "evaluate_gpus": "0",
    }
    assert "registry.example/ldm:1" in (Path(config.path) / "config.yaml").read_text()
