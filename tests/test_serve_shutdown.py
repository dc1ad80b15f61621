"""Shutdown as Kubernetes does it: SIGTERM to a real server process while it generates.

A rolling update (or a scale-down) deletes the pod: the kubelet runs the preStop hook, sends
SIGTERM, and SIGKILLs after ``terminationGracePeriodSeconds``. The server must drain in that
time: stop being ready (readiness 503, so endpoints drop it; liveness stays 200, or the
kubelet would restart instead of stop it), answer new generation requests 503 (retryable
elsewhere), finish what it admitted, then exit 0. A second SIGTERM ends it at once.
"""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
from kserve.model_repository import ModelRepository
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

from ldm_core.serve.admission import Admission, Progress, ShuttingDown
from ldm_core.serve.dataplane import ModelAwareDataPlane
from ldm_core.serve.shutdown import GracefulShutdown
from tests.harness.configs import MODEL, serve_config
from tests.harness.data import random_bundle
from tests.harness.serving import Server, free_port, model_server, v2

STEP_S = 0.1
"""Added to every denoising step: a request of STEPS steps generates for at least 2 s,
whatever the hardware, long enough to send the signal and probe the server meanwhile."""
STEPS = 20
LIMITS = [
    "serving.max_concurrency=1",
    "serving.max_batch_size=1",
    "serving.max_steps=1000",
    "serving.request_timeout_s=120",
]


def _server(tmp_path, grpc_port: int = 0):
    bundle = random_bundle(tmp_path / "bundle", serve_config(*LIMITS))
    settings = [*LIMITS, f"serving.grpc_port={grpc_port}"]
    sets = [arg for setting in settings for arg in ("--set", setting)]
    return model_server(bundle, tmp_path / "serve.log", "--device", "cpu", *sets, step_s=STEP_S)


def _send(server: Server, body: dict, out: dict, name: str) -> threading.Thread:
    """POST ``body`` in a thread; its response (or the transport error) lands in out[name]."""

    def post() -> None:
        try:
            out[name] = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=120)
        except httpx.HTTPError as exc:
            out[name] = exc

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def _gauge(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def _wait_for(url: str, in_flight: int, queued: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            _gauge(url, "ldm_requests_in_flight") == in_flight
            and _gauge(url, "ldm_requests_queued") == queued
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"never {in_flight} generating and {queued} queued")


def _grpc_infer(address: str) -> grpc.RpcError | pb.ModelInferResponse:
    seed = pb.ModelInferRequest.InferInputTensor(
        name="seed",
        datatype="INT64",
        shape=[1],
        contents=pb.InferTensorContents(int64_contents=[3]),
    )
    request = pb.ModelInferRequest(
        model_name=MODEL, inputs=[seed], parameters={"steps": pb.InferParameter(int64_param=1)}
    )
    with grpc.insecure_channel(address) as channel:
        try:
            return GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        except grpc.RpcError as exc:
            return exc


def _grpc_health(address: str) -> tuple[bool, bool]:
    with grpc.insecure_channel(address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        live = stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    return live, ready


def test_sigterm_drains_what_was_admitted_refuses_the_rest_then_exits_0(tmp_path):
    grpc_port = free_port()
    address = f"127.0.0.1:{grpc_port}"
    with _server(tmp_path, grpc_port) as server:
        url = server.url
        answers: dict = {}
        running = _send(server, v2([1], steps=STEPS, output="volume"), answers, "running")
        _wait_for(url, in_flight=1, queued=0)
        queued = _send(server, v2([2], steps=STEPS, output="volume"), answers, "queued")
        _wait_for(url, in_flight=1, queued=1)

        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the signal is handled on the server's event loop
        # Out of the endpoints, but alive: the kubelet must not restart a draining pod.
        assert httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 503
        assert httpx.get(f"{url}/v2/models/{MODEL}/ready", timeout=5).status_code == 503
        assert httpx.get(f"{url}/v2/health/live", timeout=5).status_code == 200
        assert _grpc_health(address) == (True, False)
        # A request sent now is refused, retryable, saying why; over both transports.
        late = httpx.post(
            f"{url}/v2/models/{MODEL}/infer", json=v2([3], steps=1, output="volume"), timeout=30
        )
        assert late.status_code == 503, late.text
        assert "shutting down" in late.json()["error"]
        assert late.headers["connection"] == "close"  # a keep-alive client reconnects elsewhere
        refused = _grpc_infer(address)
        assert isinstance(refused, grpc.RpcError), refused
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.details()

        # What was admitted before the signal, running or queued, gets its whole answer.
        for thread in (running, queued):
            thread.join(timeout=120)
        for name in ("running", "queued"):
            r = answers[name]
            assert isinstance(r, httpx.Response) and r.status_code == 200, r
            volume = {o["name"]: o for o in r.json()["outputs"]}["volume"]
            assert volume["shape"] == [1, 1, 16, 16, 16]
            assert np.isfinite(np.asarray(volume["data"], dtype=np.float32)).all()
        # Then the process ends by itself, well before its drain deadline, with status 0.
        assert server.process.wait(timeout=60) == 0
    events = [e["event"] for e in server.log_events()]
    assert "shutdown_started" in events and "shutdown_finished" in events


def test_a_second_sigterm_ends_the_drain_at_once(tmp_path):
    with _server(tmp_path) as server:
        answers: dict = {}
        running = _send(server, v2([1], steps=1000, output="volume"), answers, "running")
        _wait_for(server.url, in_flight=1, queued=0)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 503
        server.process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        # 1000 steps of at least STEP_S: 100 s to go. It stops within a step, then the
        # interpreter's own exit (2.5-4 s for an idle server on this loaded 2-core machine).
        status = server.process.wait(timeout=30)
        assert time.monotonic() - stopped < 15
        assert status == 1  # work was abandoned: not a clean exit
        running.join(timeout=30)
        r = answers["running"]  # answered 503 if the answer made it out, else cut
        assert isinstance(r, httpx.HTTPError) or r.status_code == 503, r
    (forced,) = [e for e in server.log_events() if e["event"] == "shutdown_forced"]
    assert forced["unfinished"] == 1 and "second signal" in forced["reason"]


def test_the_drain_deadline_ends_what_is_left_and_stops_the_transports_at_once():
    """The deadline's path, on the event loop without a process: a generation still running
    when ``deadline_s`` has passed is answered 503 and stopped at its next step."""
    steps: list[int] = []

    def endless(key: str, parts: list[int], progress: Progress) -> list[int]:
        for i in range(10_000):
            time.sleep(0.01)
            steps.append(i)
            progress(i + 1, 10_000)
        return parts

    async def scenario() -> tuple:
        admission = Admission(1, 4, timeout_s=60)
        plane = ModelAwareDataPlane(ModelRepository())
        http = SimpleNamespace(
            should_exit=False,
            force_exit=False,
            config=SimpleNamespace(timeout_graceful_shutdown=30),
        )
        shutdown = GracefulShutdown(admission, plane, http, deadline_s=0.3)
        run = admission.run(
            endless, 1, key="k", size=1, request_id="r", started=time.monotonic(), steps=10_000
        )
        request = asyncio.ensure_future(run)
        await asyncio.sleep(0.1)
        shutdown.start("SIGTERM")
        ready = await plane.ready()
        outcome = await asyncio.gather(request, return_exceptions=True)
        await asyncio.sleep(0.2)  # the worker's next step sees it was abandoned
        stopped_at = len(steps)
        await asyncio.sleep(0.2)
        admission.close()
        return ready, outcome[0], shutdown, http, stopped_at

    ready, outcome, shutdown, http, stopped_at = asyncio.run(scenario())
    assert ready is False
    assert isinstance(outcome, ShuttingDown) and "drain deadline" in str(outcome)
    assert "serving.request_timeout_s=0.3 s" in shutdown.forced and shutdown.unfinished == 1
    assert http.should_exit and http.force_exit and http.config.timeout_graceful_shutdown == 0
    assert shutdown.grace_s() == 0.0
    assert len(steps) == stopped_at, "the abandoned generation kept running"
