"""The evaluate pod gets the size the config gives it, as a KFP backend's driver resolves it.

configure hands the evaluate pod's size to the driver through resource placeholders; the
driver reads each as a string (``tests/harness/kfp_driver.py`` models the Go code). An output
declared as an integer resolves to nothing there, and a GPU preset's evaluate pod would get no
GPU and crash asking for CUDA. Checked for the backend of each supported Kubeflow release
(manifests/releases.yaml), whose driver code the model was compared with.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ldm_core import stages
from tests.harness import kfp_driver
from tests.harness.kfp_driver import pod_resources, resolve, text_to_value
from tests.harness.releases import RELEASES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipelines" / "brain_ldm.yaml"


@pytest.fixture(scope="module")
def spec() -> dict:
    pipeline_spec, _ = yaml.safe_load_all(PACKAGE.read_text())
    return pipeline_spec


def _evaluate_inputs(spec: dict, configured: stages.Configured) -> dict:
    """The evaluate task's executor input parameters as the backend builds them from
    configure's output files: each output's text converted by its declared type."""
    declared = spec["components"]["comp-configure"]["outputDefinitions"]["parameters"]
    task = spec["root"]["dag"]["tasks"]["evaluate"]["inputs"]["parameters"]
    values = {}
    for channel, source in task.items():
        producer = source.get("taskOutputParameter")
        if not producer or producer["producerTask"] != "configure":
            continue
        key = producer["outputParameterKey"]
        if not key.startswith("evaluate_"):
            continue  # the overrides lists: not pod resources
        text = str(getattr(configured, key))  # what the SDK's executor writes for a scalar
        values[channel] = text_to_value(text, declared[key]["parameterType"])
    return values


@pytest.mark.parametrize(
    "preset, overrides, expected",
    [
        ("gpu-16g", [], {"cpu": "4", "memory": "16Gi", "gpus": "1"}),
        ("tiny-cpu", [], {"cpu": "2", "memory": "8Gi", "gpus": "0"}),
        ("multi-gpu", ["cluster.evaluate.cpu=6"], {"cpu": "6", "memory": "64Gi", "gpus": "1"}),
    ],
)
@pytest.mark.parametrize("release", RELEASES, ids=str)
def test_the_driver_gives_the_evaluate_pod_the_configured_size(
    spec, release, preset, overrides, expected
):
    assert kfp_driver.sources(release.kfp_backend)  # the model follows this backend's code
    configured = stages.configure_stage(preset, overrides)
    container = spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"]
    got = pod_resources(container["resources"], _evaluate_inputs(spec, configured))
    assert got["requests"] == {"cpu": expected["cpu"], "memory": expected["memory"]}
    assert got["limits"] == {"memory": expected["memory"], "nvidia.com/gpu": expected["gpus"]}


def test_the_driver_model_drops_a_number_as_the_go_code_does():
    """The model itself: a placeholder whose value is a number resolves to "" (Go's
    ``GetStringValue`` on a number value), so no limit is set; a string resolves."""
    channel = "{{$.inputs.parameters['pipelinechannel--n']}}"
    assert resolve(channel, {"pipelinechannel--n": text_to_value("1", "NUMBER_INTEGER")}) == ""
    assert resolve(channel, {"pipelinechannel--n": text_to_value("1", "STRING")}) == "1"
    resources = {"accelerator": {"resourceType": "nvidia.com/gpu", "resourceCount": channel}}
    number = {"pipelinechannel--n": text_to_value("1", "NUMBER_INTEGER")}
    assert pod_resources(resources, number)["limits"] == {}


def test_the_model_refuses_a_backend_whose_driver_was_not_read():
    with pytest.raises(LookupError, match="2.99.0"):
        kfp_driver.sources("2.99.0")


def test_a_cpu_or_memory_placeholder_that_resolves_to_nothing_fails_the_task():
    """``getPodResource`` parses what the placeholder resolved to: "" (a number value) is no
    quantity, so the driver fails the task instead of leaving the request out."""
    channel = "{{$.inputs.parameters['pipelinechannel--cpu']}}"
    number = {"pipelinechannel--cpu": text_to_value("2", "NUMBER_INTEGER")}
    with pytest.raises(ValueError, match="failed to init podSpecPatch"):
        pod_resources({"resourceCpuRequest": channel}, number)
    text = {"pipelinechannel--cpu": text_to_value("500m", "STRING")}
    assert pod_resources({"resourceCpuRequest": channel}, text)["requests"] == {"cpu": "500m"}
