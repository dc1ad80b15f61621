"""The model repository extension and liveness, from a hostile client's side.

KServe's ModelServer registers ``POST /v2/repository/models/{name}/load|unload`` (and the
gRPC ``RepositoryModelLoad|Unload``) for every server; they take no credentials. On this
server an unload is final (the bundle loads only at start; KServe's registry cannot load it
again), so:

- by default the extension is off: the three requests of the attack (unload, ready, load)
  leave the model serving; the routes are 404 naming the switch, gRPC ``UNIMPLEMENTED``;
- with ``serving.repository_endpoints`` on (admin-only), an unload takes the model out of
  service and liveness then fails, so the kubelet restarts the pod;
- liveness holds while the bundle still loads (a startup probe covers that time).
"""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from kserve.errors import ModelNotReady, ServerNotLive
from kserve.model_repository import ModelRepository
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

from ldm_core.config import Config
from ldm_core.serve.admission import Admission
from ldm_core.serve.dataplane import ModelAwareDataPlane
from ldm_core.serve.model import BrainLDMModel
from tests.harness.configs import MODEL, serve_config
from tests.harness.data import random_bundle
from tests.harness.serving import free_port, model_server, v2

UNLOAD = f"/v2/repository/models/{MODEL}/unload"
LOAD = f"/v2/repository/models/{MODEL}/load"


def _server(root, *sets: str):
    """A server with REST and gRPC for a fresh tiny bundle: (server, grpc_address)."""
    bundle = random_bundle(root / "bundle", serve_config())
    port = free_port()
    args = ["--device", "cpu", "--set", f"serving.grpc_port={port}"]
    for value in sets:
        args += ["--set", value]
    return model_server(bundle, root / "serve.log", *args), f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """A server as ``ldm serve`` starts by default: (rest_url, grpc_address)."""
    started, address = _server(tmp_path_factory.mktemp("repository-off"))
    with started as server:
        yield server.url, address


def _stub(address: str) -> tuple[grpc.Channel, GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(address)
    return channel, GRPCInferenceServiceStub(channel)


def test_the_attack_leaves_the_model_serving_by_default(default_server):
    url, _ = default_server
    for path in (UNLOAD, LOAD):
        r = httpx.post(f"{url}{path}", timeout=10)
        assert r.status_code == 404, r.text
        assert set(r.json()) == {"error"} and "serving.repository_endpoints" in r.json()["error"]
        assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    # Any method, any model name: nothing under the extension's prefix answers.
    assert httpx.get(f"{url}{UNLOAD}", timeout=10).status_code in (404, 405)
    assert httpx.post(f"{url}/v2/repository/models/other/unload", timeout=10).status_code == 404
    assert httpx.get(f"{url}/v2/health/live", timeout=10).status_code == 200
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=v2([1], steps=1), timeout=60)
    assert r.status_code == 200, r.text


def test_the_server_does_not_offer_the_extension_by_default(default_server):
    url, _ = default_server
    assert httpx.get(f"{url}/v2", timeout=10).json()["extensions"] == []
    paths = httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    assert not [p for p in paths if p.startswith("/v2/repository")]
    assert "/v2/models/{model_name}/infer" in paths  # the document is otherwise whole


def test_grpc_repository_calls_are_unimplemented_by_default(default_server):
    _, address = default_server
    channel, stub = _stub(address)
    with channel:
        for call, request in (
            (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=MODEL)),
            (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=MODEL)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "serving.repository_endpoints" in err.value.details()
        assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=10).ready
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


def test_with_the_switch_on_an_unload_makes_liveness_fail(tmp_path):
    started, address = _server(tmp_path, "serving.repository_endpoints=true")
    with started as server:
        url = server.url
        assert httpx.get(f"{url}/v2", timeout=10).json()["extensions"] == [
            "model_repository_extension"
        ]
        assert httpx.get(f"{url}/v2/health/live", timeout=10).status_code == 200
        r = httpx.post(f"{url}{UNLOAD}", timeout=10)
        assert r.status_code == 200 and r.json() == {"name": MODEL, "unload": True}
        assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 503
        # V2 and V1 liveness both fail, naming the model, so the kubelet restarts the pod.
        for path in ("/v2/health/live", "/"):
            r = httpx.get(f"{url}{path}", timeout=10)
            assert r.status_code == 503, (path, r.text)
            assert f"Model {MODEL} was loaded and is no longer ready" in r.json()["error"]
        channel, stub = _stub(address)
        with channel:
            assert not stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        # Load cannot bring the bundle back in this process; liveness stays failed.
        assert httpx.post(f"{url}{LOAD}", timeout=10).status_code == 503
        assert httpx.get(f"{url}/v2/health/live", timeout=10).status_code == 503


def test_grpc_unload_with_the_switch_on_answers_and_makes_liveness_fail(tmp_path):
    started, address = _server(tmp_path, "serving.repository_endpoints=true")
    with started as server:
        channel, stub = _stub(address)
        with channel:
            answer = stub.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name=MODEL), timeout=10
            )
            assert answer.model_name == MODEL and answer.isUnloaded
            assert not stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        assert httpx.get(f"{server.url}/v2/health/live", timeout=10).status_code == 503


def test_liveness_holds_while_loading_and_fails_once_the_loaded_model_is_gone(tmp_path):
    cfg = serve_config()
    bundle = random_bundle(tmp_path / "bundle", cfg)
    model = BrainLDMModel(MODEL, bundle, cfg, Admission.from_config(cfg.serving), device="cpu")
    registry = ModelRepository()
    registry.update(model)
    plane = ModelAwareDataPlane(registry)

    # Still loading: alive (the startup probe's time), not ready, and never loaded on the
    # spot by a request (KServe's get_model would load it on the event loop).
    assert asyncio.run(plane.live()) == {"status": "alive"}
    assert not asyncio.run(plane.ready())
    with pytest.raises(ModelNotReady):
        asyncio.run(plane.get_model(MODEL))
    assert model.bundle is None
    model.load()
    assert asyncio.run(plane.live()) == {"status": "alive"}
    assert asyncio.run(plane.get_model(MODEL)) is model
    registry.unload(MODEL)
    with pytest.raises(ServerNotLive, match=f"Model {MODEL} was loaded"):
        asyncio.run(plane.live())


def test_the_repository_endpoints_are_off_unless_configured():
    assert Config().serving.repository_endpoints is False
    assert serve_config("serving.repository_endpoints=true").serving.repository_endpoints
