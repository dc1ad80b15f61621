"""Model versions as the Open Inference Protocol expects them of a model with one version:
the version the metadata reports (the bundle's digest) is accepted on every route, in the
path (``/v2/models/{name}/versions/{version}/…``), in KServe's ``model_version`` query, and
in gRPC's version fields; any other version is a 404 whose ``error`` names the versions
there are (KServe 0.21 answers 501 to all of them, a server fault for monitoring)."""

from __future__ import annotations

import grpc
import httpx
import pytest
from kserve.errors import ModelNotReady
from kserve.model_repository import ModelRepository
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

from ldm_core.bundle import digest
from ldm_core.serve.admission import Admission
from ldm_core.serve.model import BrainLDMModel
from ldm_core.serve.versions import VersionNotFound, check_version
from tests.harness.configs import MODEL, serve_config
from tests.harness.data import random_bundle
from tests.harness.serving import free_port, model_server, v2

OTHER = "1"
"""A version a client might guess; not this model's."""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server with REST and gRPC: (rest_url, grpc_address, version)."""
    root = tmp_path_factory.mktemp("versions")
    bundle = random_bundle(root / "bundle", serve_config())
    port = free_port()
    with model_server(
        bundle, root / "serve.log", "--device", "cpu", "--set", f"serving.grpc_port={port}"
    ) as server:
        yield server.url, f"127.0.0.1:{port}", digest(bundle)


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served[1]) as channel:
        yield GRPCInferenceServiceStub(channel)


def _request(url: str, route: str, version: str, where: str) -> httpx.Response:
    """``route`` (metadata, ready, infer) of the model, naming ``version`` ``where``."""
    base = f"{url}/v2/models/{MODEL}"
    if where == "path":
        base += f"/versions/{version}"
    params = {"model_version": version} if where == "query" else None
    tail = {"metadata": "", "ready": "/ready", "infer": "/infer"}[route]
    if route == "infer":
        return httpx.post(base + tail, params=params, json=v2([3], steps=1), timeout=60)
    return httpx.get(base + tail, params=params, timeout=30)


def test_metadata_reports_the_bundle_digest_as_the_one_version(served, stub):
    url, _, version = served
    assert httpx.get(f"{url}/v2/models/{MODEL}", timeout=30).json()["versions"] == [version]
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=30)
    assert list(meta.versions) == [version]


ROUTES = [(r, w) for r in ("metadata", "ready", "infer") for w in ("path", "query")]


@pytest.mark.parametrize("route, where", ROUTES, ids=[f"{r}-{w}" for r, w in ROUTES])
def test_the_model_version_is_accepted_on_every_route(served, route, where):
    url, _, version = served
    r = _request(url, route, version, where)
    assert r.status_code == 200, r.text
    body = r.json()
    if route == "infer":
        assert body["model_version"] == version == body["parameters"]["bundle_digest"]
    else:  # the same answer as the route without a version
        tail = "/ready" if route == "ready" else ""
        assert body == httpx.get(f"{url}/v2/models/{MODEL}{tail}", timeout=30).json()


@pytest.mark.parametrize("route, where", ROUTES, ids=[f"{r}-{w}" for r, w in ROUTES])
def test_another_version_is_a_404_naming_the_versions_there_are(served, route, where):
    url, _, version = served
    r = _request(url, route, OTHER, where)
    assert r.status_code == 404, r.text
    assert set(r.json()) == {"error"}
    assert f"no version '{OTHER}'" in r.json()["error"] and version in r.json()["error"]


def test_an_empty_model_version_query_means_no_version(served):
    url, *_ = served
    r = httpx.get(f"{url}/v2/models/{MODEL}/ready", params={"model_version": ""}, timeout=30)
    assert r.status_code == 200, r.text


def test_a_version_of_an_unknown_model_is_the_unknown_model_404(served):
    url, *_ = served
    r = httpx.get(f"{url}/v2/models/other/versions/{OTHER}/ready", timeout=30)
    assert r.status_code == 404
    assert r.json() == {"error": "Model with name other does not exist."}


def test_grpc_accepts_the_version_and_refuses_others_with_not_found(served, stub):
    _, _, version = served
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version=version), timeout=30).ready
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL, version=version), timeout=30)
    assert meta.name == MODEL
    seed = pb.ModelInferRequest.InferInputTensor(
        name="seed",
        datatype="INT64",
        shape=[1],
        contents=pb.InferTensorContents(int64_contents=[3]),
    )
    infer = pb.ModelInferRequest(model_name=MODEL, model_version=version, inputs=[seed])
    assert stub.ModelInfer(infer, timeout=60).model_version == version
    for call, request in (
        (stub.ModelReady, pb.ModelReadyRequest(name=MODEL, version=OTHER)),
        (stub.ModelMetadata, pb.ModelMetadataRequest(name=MODEL, version=OTHER)),
        (
            stub.ModelInfer,
            pb.ModelInferRequest(model_name=MODEL, model_version=OTHER, inputs=[seed]),
        ),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert version in err.value.details()


def test_before_the_bundle_loads_a_version_is_not_ready_rather_than_unknown(tmp_path):
    cfg = serve_config("serving.warmup=false")
    bundle = random_bundle(tmp_path / "bundle", cfg)
    model = BrainLDMModel(MODEL, bundle, cfg, Admission.from_config(cfg.serving), device="cpu")
    registry = ModelRepository()
    registry.update(model)
    with pytest.raises(ModelNotReady):
        check_version(registry, MODEL, digest(bundle))
    model.load()
    check_version(registry, MODEL, digest(bundle))
    check_version(registry, MODEL, "")  # no version named
    with pytest.raises(VersionNotFound, match=digest(bundle)):
        check_version(registry, MODEL, OTHER)
