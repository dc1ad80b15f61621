"""The predictor as a generic Open Inference Protocol client sees it: KServe's own clients
(``kserve.inference_client``, which this project did not write) over REST and gRPC, in JSON
and binary modes, with requests built from the model metadata alone.

What a client may rely on, and what these tests hold the server to:

- a JSON body is JSON with or without a Content-Type header;
- the protocol's ``outputs`` field picks the outputs, any combination;
- parameters the model does not read are accepted and ignored (the protocol makes
  parameters extensible);
- REST and gRPC give the same inference, and every response names the bundle it came from
  (``parameters.bundle_digest``).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import re
from pathlib import Path

import grpc
import httpx
import nibabel as nib
import numpy as np
import pytest
from kserve.inference_client import InferenceGRPCClient, InferenceRESTClient, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse, RequestedOutput
from PIL import Image

from ldm_core.bundle import digest
from ldm_core.config import ConfigError
from tests.harness.configs import MODEL, serve_config
from tests.harness.data import random_bundle
from tests.harness.serving import free_port, model_server, v2

SEEDS = [3, 5]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server with REST and gRPC: (rest_url, grpc_address, bundle_dir)."""
    root = tmp_path_factory.mktemp("oip")
    bundle = random_bundle(root / "bundle", serve_config())
    grpc_port = free_port()
    with model_server(
        bundle,
        root / "serve.log",
        "--device",
        "cpu",
        "--set",
        f"serving.grpc_port={grpc_port}",
    ) as server:
        yield server.url, f"127.0.0.1:{grpc_port}", Path(bundle)


def rest_metadata(url: str) -> dict:
    return httpx.get(f"{url}/v2/models/{MODEL}", timeout=30).json()


def grpc_metadata(address: str) -> dict:
    with grpc.insecure_channel(address) as channel:
        meta = GRPCInferenceServiceStub(channel).ModelMetadata(
            pb.ModelMetadataRequest(name=MODEL), timeout=30
        )
    tensors = lambda ts: [  # noqa: E731
        {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts
    ]
    return {"name": meta.name, "inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs)}


def request_from_metadata(meta: dict, seeds: list[int], binary: bool) -> InferRequest:
    """What a generic client does: one tensor per metadata input (the variable dimension
    set to the number of seeds), every metadata output requested.

    BYTES outputs are asked for as JSON (base64) even in binary mode: kserve 0.21's REST
    client (``InferResponse.from_bytes``) decodes binary BYTES outputs as UTF-8 and fails
    on any file. gRPC ignores the flag (bytes travel as bytes)."""
    (spec,) = meta["inputs"]
    assert spec["datatype"] == "INT64" and spec["shape"] == [-1]
    tensor = InferInput(spec["name"], [len(seeds)], spec["datatype"])
    tensor.set_data_from_numpy(np.asarray(seeds, dtype=np.int64), binary_data=binary)
    outputs = [
        RequestedOutput(o["name"], {"binary_data": binary and o["datatype"] != "BYTES"})
        for o in meta["outputs"]
    ]
    return InferRequest(meta["name"], [tensor], request_outputs=outputs)


async def rest_infer(url: str, request: InferRequest) -> InferResponse:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
    try:
        return await client.infer(url, request, model_name=MODEL)
    finally:
        await client.close()


async def grpc_infer(address: str, request: InferRequest) -> InferResponse:
    async with InferenceGRPCClient(address, timeout=120) as client:
        return await client.infer(request)


def parameter(response: InferResponse, name: str) -> object:
    """A response parameter's value: gRPC responses keep the protocol's typed parameters."""
    value = response.parameters[name]
    return value.string_param if isinstance(value, pb.InferParameter) else value


def outputs_of(response: InferResponse) -> dict[str, np.ndarray]:
    return {o.name: o.as_numpy() for o in response.outputs}


def _nifti(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def test_metadata_is_the_same_over_rest_and_grpc(served):
    url, address, _ = served
    rest, over_grpc = rest_metadata(url), grpc_metadata(address)
    assert over_grpc["inputs"] == rest["inputs"]
    assert over_grpc["outputs"] == rest["outputs"]
    assert [o["name"] for o in rest["outputs"]] == ["volume", "affine", "nifti", "png"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_rest_and_grpc_clients_get_the_same_inference(served, binary):
    url, address, bundle = served
    via_rest = asyncio.run(
        rest_infer(url, request_from_metadata(rest_metadata(url), SEEDS, binary))
    )
    via_grpc = asyncio.run(
        grpc_infer(address, request_from_metadata(grpc_metadata(address), SEEDS, binary))
    )
    expected_digest = digest(bundle)
    for response in (via_rest, via_grpc):
        assert [o.name for o in response.outputs] == ["volume", "affine", "nifti", "png"]
        assert parameter(response, "bundle_digest") == expected_digest
    rest, grpc_out = outputs_of(via_rest), outputs_of(via_grpc)
    assert rest["volume"].shape == (2, 1, 16, 16, 16) and rest["volume"].dtype == np.float32
    np.testing.assert_array_equal(rest["volume"], grpc_out["volume"])
    np.testing.assert_array_equal(rest["affine"], grpc_out["affine"])
    for name in ("nifti", "png"):
        assert len(rest[name]) == len(grpc_out[name]) == 2
    # Each file is the sample its seed made, whatever the transport.
    for response in (via_rest, via_grpc):
        (nifti,) = [o for o in response.outputs if o.name == "nifti"]
        # In JSON, BYTES travel as base64 text, and the output says so (KServe's convention).
        base64_text = (nifti.parameters or {}).get("encoding") == "base64"
        assert base64_text == (response is via_rest)
        for i, data in enumerate(nifti.as_numpy()):
            img = _nifti(base64.b64decode(data) if base64_text else data)
            np.testing.assert_allclose(img.get_fdata()[None], rest["volume"][i], atol=1e-6)
            np.testing.assert_allclose(img.affine, rest["affine"], atol=1e-6)


def test_a_combination_of_outputs_is_what_the_outputs_field_asks(served):
    url, *_ = served
    body = {**v2([7], steps=2), "outputs": [{"name": "png"}, {"name": "affine"}]}
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    outputs = r.json()["outputs"]
    assert [o["name"] for o in outputs] == ["png", "affine"]
    png = base64.b64decode(outputs[0]["data"][0])
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert outputs[1]["shape"] == [4, 4]


def test_outputs_field_wins_over_the_output_shortcut(served):
    url, *_ = served
    body = {**v2([7], steps=2, output="nifti"), "outputs": [{"name": "volume"}]}
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["volume"]


def test_an_unknown_output_is_refused_naming_it(served):
    url, *_ = served
    body = {**v2([7], steps=2), "outputs": [{"name": "volume"}, {"name": "gif"}]}
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=120)
    assert r.status_code == 400
    assert "outputs[1].name" in r.json()["error"] and "'gif'" in r.json()["error"]


def test_a_json_body_without_content_type_is_read_as_json(served):
    url, *_ = served
    # What `curl -d @body.json URL` sends: no Content-Type, no binary-extension header.
    r = httpx.post(
        f"{url}/v2/models/{MODEL}/infer", content=json.dumps(v2([4], steps=2)), timeout=120
    )
    assert "content-type" not in r.request.headers
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["volume", "affine", "nifti", "png"]
    bad = httpx.post(f"{url}/v2/models/{MODEL}/infer", content=b'{"inputs": [', timeout=30)
    assert bad.status_code == 400 and "not JSON" in bad.json()["error"]


def test_unknown_parameters_are_accepted_and_ignored(served):
    url, *_ = served
    body = v2([4], steps=2, client_trace_id="abc", priority=3)
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["steps"] == 2
    # Ignored means ignored: a misspelt known parameter leaves the default in force.
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=v2([4], step=2), timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["steps"] == serve_config().sampling.steps


def test_grpc_status_codes_say_what_rest_says(served):
    _, address, _ = served
    tensor = InferInput("seed", [1], "INT64")
    tensor.set_data_from_numpy(np.asarray([1], dtype=np.int64), binary_data=True)
    request = InferRequest(MODEL, [tensor], parameters={"steps": 0})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(grpc_infer(address, request))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters.steps" in err.value.details()


@pytest.mark.parametrize(
    "value, message",
    [
        ("-1", "serving.grpc_port: -1 is not a TCP port"),
        ("70000", "serving.grpc_port: 70000 is not a TCP port"),
        ("8080", "serving.grpc_port: 8080 is serving.http_port too"),
    ],
)
def test_grpc_port_is_checked_where_the_config_loads(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        serve_config(f"serving.grpc_port={value}")
    assert serve_config().serving.grpc_port == 0  # off unless asked for


def _seed_request(seed: int, **kwargs: object) -> InferRequest:
    tensor = InferInput("seed", [1], "INT64")
    tensor.set_data_from_numpy(np.asarray([seed], dtype=np.int64), binary_data=True)
    return InferRequest(MODEL, [tensor], **kwargs)


def test_a_request_without_outputs_gets_every_output_the_metadata_lists(served):
    """The protocol: "If not specified all outputs produced by the model will be returned"."""
    url, address, _ = served
    listed = [o["name"] for o in rest_metadata(url)["outputs"]]
    assert listed == [o["name"] for o in grpc_metadata(address)["outputs"]]
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=v2([7], steps=1), timeout=120)
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == listed
    over_grpc = asyncio.run(grpc_infer(address, _seed_request(7, parameters={"steps": 1})))
    assert [o.name for o in over_grpc.outputs] == listed
    # The output shortcut still narrows the answer to one kind.
    r = httpx.post(
        f"{url}/v2/models/{MODEL}/infer", json=v2([7], steps=1, output="png"), timeout=120
    )
    assert [o["name"] for o in r.json()["outputs"]] == ["png"]


def test_the_request_body_id_comes_back_whatever_x_request_id_says(served):
    """A mesh (Envoy) stamps ``x-request-id`` on every request; the response must still echo
    the client's ``id``, as the protocol asks and KServe's own models do
    (``kserve.utils.utils.get_predict_response``: ``payload.id``, else a new one). The header
    names the request only when the body has no id."""
    url, address, _ = served
    body = {**v2([7], steps=1, output="png"), "id": "client-42"}
    infer_url = f"{url}/v2/models/{MODEL}/infer"
    r = httpx.post(infer_url, json=body, headers={"x-request-id": "envoy-1"}, timeout=120)
    assert r.status_code == 200 and r.json()["id"] == "client-42", r.text
    r = httpx.post(
        infer_url, json=v2([7], steps=1, output="png"), headers={"x-request-id": "envoy-2"}
    )
    assert r.json()["id"] == "envoy-2"

    async def over_grpc(request_id: str) -> InferResponse:
        request = _seed_request(7, request_id=request_id, parameters={"steps": 1, "output": "png"})
        async with InferenceGRPCClient(address, timeout=120) as client:
            return await client.infer(request, headers=[("x-request-id", "envoy-3")])

    assert asyncio.run(over_grpc("client-43")).id == "client-43"
    assert asyncio.run(over_grpc("")).id == "envoy-3"
