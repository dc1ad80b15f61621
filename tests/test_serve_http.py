"""The predictor over real HTTP: a real KServe ModelServer process on 127.0.0.1 serving a
tiny random bundle, called the way clients call it (V2 JSON, V2 binary extension, V1)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
import struct
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ldm_core.bundle import load as load_bundle
from ldm_core.deploy import deploy, stop_local
from tests.harness.configs import MODEL, serve_config
from tests.harness.data import random_bundle
from tests.harness.serving import v2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server for the module: (base_url, bundle_dir, log_file)."""
    root = tmp_path_factory.mktemp("serve")
    cfg = serve_config()
    bundle = random_bundle(root / "bundle", cfg)
    result = deploy(cfg, bundle, backend="local", state_dir=root / "state", ready_timeout_s=240)
    try:
        yield result["url"], Path(bundle), Path(result["log_file"])
    finally:
        stop_local(result)


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=120) as client:
        yield client


def infer(http, url, body, headers=None):
    return http.post(f"{url}/v2/models/{MODEL}/infer", json=body, headers=headers)


def split_binary(r: httpx.Response) -> tuple[dict, bytes]:
    n = int(r.headers["inference-header-content-length"])
    return json.loads(r.content[:n]), r.content[n:]


def test_health_and_metadata_describe_the_bundle(served, http):
    url, bundle, _ = served
    assert http.get(f"{url}/v2/health/live").status_code == 200
    assert http.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert http.get(f"{url}/v2/models/{MODEL}/ready").status_code == 200
    meta = http.get(f"{url}/v2/models/{MODEL}").json()
    assert meta["inputs"] == [{"name": "seed", "datatype": "INT64", "shape": [-1]}]
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["volume"] == {"name": "volume", "datatype": "FP32", "shape": [-1, 1, 16, 16, 16]}
    assert outputs["affine"]["shape"] == [4, 4]
    assert outputs["nifti"]["datatype"] == outputs["png"]["datatype"] == "BYTES"


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses listening on ``port``, from the kernel's socket table."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            out.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return out


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_a_local_server_listens_on_loopback_only(served):
    url, _, _ = served
    assert _listening_addresses(int(url.rsplit(":", 1)[1])) == {"127.0.0.1"}


def test_v2_nifti_has_shape_affine_and_matches_the_volume_output(served, http):
    url, bundle, _ = served
    affine = load_bundle(bundle, "cpu").affine
    r = infer(http, url, v2([5, 7], output="nifti", steps=3))
    assert r.status_code == 200, r.text
    out = r.json()["outputs"]
    assert [o["name"] for o in out] == ["nifti"]
    assert out[0]["shape"] == [2] and out[0]["parameters"]["encoding"] == "base64"
    images = [
        nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(s))) for s in out[0]["data"]
    ]
    for img in images:
        assert img.shape == (16, 16, 16)
        np.testing.assert_allclose(img.affine, affine)
        assert img.header.get_zooms() == (2.0, 3.0, 4.0)
    # The same seed as a raw tensor gives the same voxels: one generation path for both.
    r = infer(http, url, v2([7], output="volume", steps=3))
    assert r.status_code == 200, r.text
    tensors = {o["name"]: o for o in r.json()["outputs"]}
    assert (
        tensors["volume"]["shape"] == [1, 1, 16, 16, 16] and tensors["volume"]["datatype"] == "FP32"
    )
    volume = np.asarray(tensors["volume"]["data"], dtype=np.float32).reshape(16, 16, 16)
    np.testing.assert_allclose(np.asarray(images[1].dataobj), volume, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(tensors["affine"]["data"]).reshape(4, 4), affine, rtol=1e-6
    )


def test_binary_data_extension_round_trip(served, http):
    url, _, _ = served
    json_r = infer(http, url, v2([11, 12], steps=2))
    expected = np.asarray(json_r.json()["outputs"][0]["data"], dtype=np.float32).reshape(
        2, 1, 16, 16, 16
    )
    # Binary output for every tensor.
    r = infer(http, url, v2([11, 12], steps=2, output="volume", binary_data_output=True))
    assert r.status_code == 200, r.text
    head, blob = split_binary(r)
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert [o["name"] for o in head["outputs"]] == ["volume", "affine"] and sum(sizes) == len(blob)
    volume = np.frombuffer(blob[: sizes[0]], dtype=np.float32).reshape(2, 1, 16, 16, 16)
    np.testing.assert_array_equal(volume, expected)
    assert np.frombuffer(blob[sizes[0] :], dtype=np.float32).reshape(4, 4)[3, 3] == 1.0
    # Binary input too (seed as raw little-endian int64 after the JSON header), and
    # per-output choice: volume binary, affine as JSON.
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "seed",
                    "shape": [2],
                    "datatype": "INT64",
                    "parameters": {"binary_data_size": 16},
                }
            ],
            "outputs": [
                {"name": "volume", "parameters": {"binary_data": True}},
                {"name": "affine"},
            ],
            "parameters": {"steps": 2},
        }
    ).encode()
    r = http.post(
        f"{url}/v2/models/{MODEL}/infer",
        content=header + np.asarray([11, 12], dtype="<i8").tobytes(),
        headers={
            "inference-header-content-length": str(len(header)),
            "content-type": "application/octet-stream",
        },
    )
    assert r.status_code == 200, r.text
    head, blob = split_binary(r)
    np.testing.assert_array_equal(
        np.frombuffer(blob, dtype=np.float32).reshape(2, 1, 16, 16, 16), expected
    )
    assert len(head["outputs"][1]["data"]) == 16


def test_png_bytes_in_binary_and_json(served, http):
    url, _, _ = served
    r = infer(http, url, v2([1], output="png", steps=2, binary_data_output=True))
    head, blob = split_binary(r)
    assert head["outputs"][0]["parameters"]["content_type"] == "image/png"
    (length,) = struct.unpack_from("<I", blob)
    png = blob[4 : 4 + length]
    assert Image.open(io.BytesIO(png)).mode == "L"
    r = infer(http, url, v2([1], output="png", steps=2))
    assert base64.b64decode(r.json()["outputs"][0]["data"][0]) == png


def test_v1_predict_returns_nifti_per_seed(served, http):
    url, bundle, _ = served
    affine = load_bundle(bundle, "cpu").affine
    r = http.post(
        f"{url}/v1/models/{MODEL}:predict",
        json={
            "instances": [{"seed": 3}, {"seed": 4}],
            "parameters": {"steps": 2, "sampler": "ddpm"},
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["seed"] for p in body["predictions"]] == [3, 4]
    assert body["sampler"] == "ddpm" and body["steps"] == 2
    np.testing.assert_allclose(np.asarray(body["affine"]), affine)
    img = nib.Nifti1Image.from_bytes(
        gzip.decompress(base64.b64decode(body["predictions"][1]["nifti"]))
    )
    assert img.shape == (16, 16, 16)
    np.testing.assert_allclose(img.affine, affine)


BAD_V2 = [
    ("malformed JSON", b'{"inputs": [', 422, "request body: not JSON"),
    ("inputs not a list", {"inputs": "x"}, 422, "inputs: Input should be a valid list"),
    ("body not an object", [1], 422, "request body: "),
    (
        "input without shape",
        {"inputs": [{"name": "seed", "datatype": "INT64", "data": [1]}]},
        422,
        "inputs[0].shape: Field required",
    ),
    ("float seed datatype", v2([1], datatype="FP32"), 400, "datatype"),
    ("fractional seed", v2([1.5]), 400, "seed must be an integer"),
    ("string seed", v2(["a"]), 400, "seed must be an integer"),
    ("negative seed", v2([-1]), 400, "outside"),
    ("shape mismatch", v2([1], shape=[2]), 400, "shape"),
    ("2-D shape", v2([[1]], shape=[1, 1]), 400, "inputs[seed].shape"),
    ("no seeds", v2([]), 400, "at least one seed"),
    ("too many samples", v2([1, 2, 3, 4]), 400, "serving.max_samples"),
    (
        "unknown input",
        {"inputs": [{"name": "noise", "shape": [1], "datatype": "INT64", "data": [1]}]},
        400,
        "inputs[0].name",
    ),
    ("steps zero", v2([1], steps=0), 400, "parameters.steps"),
    ("steps above max", v2([1], steps=51), 400, "parameters.steps"),
    ("steps not integer", v2([1], steps="ten"), 400, "parameters.steps"),
    ("steps nested", v2([1], steps={"a": 1}), 422, "parameters.steps: expected one of"),
    ("unknown sampler", v2([1], sampler="euler"), 400, "parameters.sampler"),
    ("sampler of the other objective", v2([1], sampler="rflow"), 400, "parameters.sampler"),
    ("unknown output", v2([1], output="gif"), 400, "parameters.output"),
    # Unknown parameters are accepted (tests/test_serve_oip.py); unknown outputs are not.
    (
        "unknown output tensor",
        {**v2([1], output="nifti"), "outputs": [{"name": "mask"}]},
        400,
        "outputs[0].name",
    ),
    (
        "output asked for twice",
        {
            **v2([1]),
            "outputs": [{"name": "png"}, {"name": "png", "parameters": {"binary_data": True}}],
        },
        400,
        "outputs[1].name: 'png' is asked for twice",
    ),
]
BAD_V1 = [
    ("malformed JSON", b'{"instances": [', 400, "Unrecognized request format"),
    ("instances not a list", {"instances": {"seed": 1}}, 400, "instances"),
    ("instance without seed", {"instances": [{"sed": 1}]}, 400, "instances[0]"),
    ("string seed", {"instances": [{"seed": "1"}]}, 400, "instances[0].seed"),
    ("too many", {"instances": [{"seed": i} for i in range(4)]}, 400, "serving.max_samples"),
    (
        "bad steps",
        {"instances": [{"seed": 1}], "parameters": {"steps": -3}},
        400,
        "parameters.steps",
    ),
    ("plain text body", "hello", 400, "expected JSON"),
]


@pytest.mark.parametrize("what,body,status,field", BAD_V2, ids=[c[0] for c in BAD_V2])
def test_invalid_v2_requests_get_4xx_naming_the_field(served, http, what, body, status, field):
    url, _, _ = served
    if isinstance(body, bytes):
        r = http.post(
            f"{url}/v2/models/{MODEL}/infer",
            content=body,
            headers={"content-type": "application/json"},
        )
    else:
        r = infer(http, url, body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}, r.text  # KServe's error shape, FastAPI's 422 too
    assert field.lower() in r.json()["error"].lower()


@pytest.mark.parametrize("what,body,status,field", BAD_V1, ids=[c[0] for c in BAD_V1])
def test_invalid_v1_requests_get_4xx_naming_the_field(served, http, what, body, status, field):
    url, _, _ = served
    if isinstance(body, bytes):
        r = http.post(
            f"{url}/v1/models/{MODEL}:predict",
            content=body,
            headers={"content-type": "application/json"},
        )
    elif isinstance(body, str):
        r = http.post(
            f"{url}/v1/models/{MODEL}:predict", content=body, headers={"content-type": "text/plain"}
        )
    else:
        r = http.post(f"{url}/v1/models/{MODEL}:predict", json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}, r.text
    assert field.lower() in r.json()["error"].lower()


def test_unknown_routes_and_methods_answer_an_error_body(served, http):
    url, _, _ = served
    r = http.get(f"{url}/v2/no-such-route")
    assert r.status_code == 404 and set(r.json()) == {"error"}, r.text
    r = http.delete(f"{url}/v2/health/live")
    assert r.status_code == 405 and set(r.json()) == {"error"}, r.text
    assert "GET" in r.headers["allow"]


def test_server_keeps_serving_after_every_invalid_request(served, http):
    url, _, _ = served
    for _, body, _, _ in BAD_V2:
        if isinstance(body, dict):
            infer(http, url, body)
    r = infer(http, url, v2([2], steps=2))
    assert r.status_code == 200
    assert http.get(f"{url}/v2/health/ready").status_code == 200


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = (
        re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    )
    match = re.search(pattern, text)
    assert match, f"{name}{{{labels}}} not in /metrics"
    return float(match.group(1))


def test_metrics_and_structured_logs(served, http):
    url, _, log_file = served
    before = http.get(f"{url}/metrics").text
    generated = (
        _metric(before, "ldm_samples_generated_total", 'sampler="ddim"')
        if "ldm_samples_generated_total{" in before
        else 0.0
    )
    r = infer(http, url, v2([21, 22], steps=2), headers={"x-request-id": "req-metrics-1"})
    assert r.status_code == 200
    infer(http, url, v2([1], sampler="euler"))
    text = http.get(f"{url}/metrics").text
    assert _metric(text, "ldm_samples_generated_total", 'sampler="ddim"') == generated + 2
    assert _metric(text, "ldm_request_latency_seconds_count", 'sampler="ddim"') >= 1
    assert _metric(text, "ldm_requests_rejected_total", 'reason="invalid"') >= 1
    assert _metric(text, "ldm_requests_in_flight") == 0
    assert "request_predict_seconds_bucket" in text  # KServe's own metrics are there too
    events = [
        json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")
    ]
    mine = [e for e in events if e.get("request_id") == "req-metrics-1"]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["event"] == "request" and entry["status"] == 200
    assert (entry["n"], entry["sampler"], entry["steps"], entry["protocol"]) == (2, "ddim", 2, "v2")
    assert entry["latency_s"] > 0
    assert any(e["event"] == "model_ready" for e in events)
    refused = [
        e for e in events if e.get("status") == 400 and "parameters.sampler" in e.get("error", "")
    ]
    assert refused and refused[-1]["request_id"]
