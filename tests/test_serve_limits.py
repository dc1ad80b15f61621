"""The predictor under pressure and at the edges of its life: overload, the per-request time
limit, readiness during warm-up, a generation that fails, a taken port, a bundle that
cannot load, and shutdown."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from kserve.model_repository import ModelRepository

from ldm_core.cli import main as ldm_main
from ldm_core.errors import LdmError
from ldm_core.serve.admission import Admission
from ldm_core.serve.dataplane import ModelAwareDataPlane
from ldm_core.serve.model import BrainLDMModel
from ldm_core.serve.server import serve
from tests.harness.configs import MODEL, serve_config
from tests.harness.data import random_bundle
from tests.harness.serving import model_server, serve_command, v2

TIMEOUT_S = 3.0
LIMITS = [
    "serving.max_concurrency=1",
    "serving.max_queue=1",
    # One request per loop: containerConcurrency (max_concurrency x max_batch_size) may not
    # exceed what the server admits, max_concurrency + max_queue (ldm_core.config.validation).
    "serving.max_batch_size=1",
    f"serving.request_timeout_s={TIMEOUT_S}",
    "serving.max_steps=1000",
]
STEP_S = 0.02
"""Added to every denoising step of the limited server: whatever the hardware, SLOW takes
at least 1000 x STEP_S = 20 s (over 6x the limit), a 2-step request under 0.1 s more."""
SLOW = v2([1, 2, 3], sampler="ddpm", steps=1000)


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    bundle = random_bundle(root / "bundle", serve_config(*LIMITS))
    sets = [arg for limit in LIMITS for arg in ("--set", limit)]
    with model_server(
        bundle, root / "serve.log", "--device", "cpu", *sets, step_s=STEP_S
    ) as server:
        yield server.url


def _post(url: str, body: dict, out: list, lock: threading.Lock) -> None:
    started = time.monotonic()
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=60)
    with lock:
        out.append(
            (r.status_code, time.monotonic() - started, r.text, r.headers.get("retry-after"))
        )


def test_overload_is_refused_at_once_while_health_stays_fast(limited):
    url = limited
    results: list = []
    lock = threading.Lock()
    threads = [threading.Thread(target=_post, args=(url, SLOW, results, lock)) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    # Generation runs off the event loop: liveness answers while the worker is busy.
    time.sleep(0.5)
    started = time.monotonic()
    assert httpx.get(f"{url}/v2/health/live", timeout=5).status_code == 200
    assert time.monotonic() - started < 1.0
    for t in threads:
        t.join()
    statuses = sorted(s for s, *_ in results)
    assert set(statuses) <= {200, 503, 504}, results
    busy = [r for r in results if r[0] == 503]
    assert busy, f"no request was refused: {statuses}"
    for _, elapsed, text, retry_after in busy:
        assert "busy" in text and "serving.max_queue" in text
        assert elapsed < 1.5 and retry_after == "1"
    # 1 generating + 1 queued were admitted; they end by the time limit, not by piling up.
    assert len([r for r in results if r[0] != 503]) == 2


def test_time_limit_gives_504_and_frees_the_slot(limited):
    url = limited
    started = time.monotonic()
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=SLOW, timeout=60)
    elapsed = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert (
        "serving.request_timeout_s=3" in r.json()["error"]
        and "generating (step" in r.json()["error"]
    )
    assert elapsed < TIMEOUT_S + 2.0
    # The controlled step, not the hardware, bounds the progress made in time.
    done = int(re.search(r"generating \(step (\d+) of 1000\)", r.json()["error"]).group(1))
    assert done <= TIMEOUT_S / STEP_S
    # The abandoned generation stops at its next step, so the next request gets the slot.
    started = time.monotonic()
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=v2([9], steps=2), timeout=60)
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < TIMEOUT_S
    metrics = httpx.get(f"{url}/metrics").text
    assert 'ldm_requests_rejected_total{reason="timeout"}' in metrics
    assert "ldm_requests_in_flight 0.0" in metrics and "ldm_requests_queued 0.0" in metrics


def test_readiness_turns_true_only_after_warm_up(tmp_path):
    cfg = serve_config()
    bundle = random_bundle(tmp_path / "bundle", cfg)
    model = BrainLDMModel(MODEL, bundle, cfg, Admission.from_config(cfg.serving), device="cpu")
    repo = ModelRepository()
    repo.update(model)
    plane = ModelAwareDataPlane(model_registry=repo)

    async def readiness() -> tuple[bool, bool]:
        return await plane.ready(), await plane.model_ready(MODEL)

    assert asyncio.run(readiness()) == (False, False)
    model.load()
    assert asyncio.run(readiness()) == (True, True)
    assert model.bundle.device == torch.device("cpu")


def _serve_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(serve_command(*args), capture_output=True, text=True, timeout=timeout)


def test_cli_refuses_a_directory_that_is_not_a_bundle(tmp_path, capsys):
    assert ldm_main(["serve", "--bundle", str(tmp_path), "--set", "serving.max_samples=2"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}" in err and "not a model bundle" in err


def test_a_taken_port_is_refused_naming_the_setting(tmp_path):
    bundle = random_bundle(tmp_path / "bundle", serve_config())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LdmError, match=f"serving.http_port: cannot listen on 127.0.0.1:{port}"):
            serve(serve_config(), bundle, port, host="127.0.0.1", device="cpu")


def test_a_bundle_that_fails_to_load_stops_the_server_with_the_reason(tmp_path):
    bundle = random_bundle(tmp_path / "bundle", serve_config())
    (Path(bundle) / "unet.pt").write_bytes(b"not a checkpoint")
    proc = _serve_cli("--bundle", str(bundle))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "failed to load" in proc.stderr and "unet.pt" in proc.stderr
    assert '"event": "model_load_failed"' in proc.stderr


def test_a_generation_that_fails_is_a_500_logged_with_its_cause(tmp_path):
    # A bundle that loads but whose UNet raises at its first forward: bundle.json gives the
    # latents one channel more than the UNet takes. No warm-up, or loading would fail.
    bundle = random_bundle(tmp_path / "bundle", serve_config())
    info_file = Path(bundle) / "bundle.json"
    info = json.loads(info_file.read_text())
    info["latent_shape"][0] += 1
    info_file.write_text(json.dumps(info))
    config = tmp_path / "serve.yaml"
    serve_config("serving.warmup=false").save(config)
    with model_server(bundle, tmp_path / "serve.log", "--config", str(config)) as server:
        r = httpx.post(
            f"{server.url}/v2/models/{MODEL}/infer",
            json=v2([1], steps=2),
            headers={"x-request-id": "req-broken-unet"},
            timeout=60,
        )
        assert r.status_code == 500, r.text
        assert "req-broken-unet" in r.json()["error"] and "RuntimeError" in r.json()["error"]
        # The server lives on, healthy, and counts the failure.
        assert httpx.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200
        metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
        assert 'ldm_requests_rejected_total{reason="error"} 1.0' in metrics
        assert "ldm_requests_in_flight 0.0" in metrics
        assert server.stop() == 0  # SIGTERM: a graceful shutdown, exit status 0
    (entry,) = [e for e in server.log_events() if e.get("request_id") == "req-broken-unet"]
    assert entry["event"] == "request" and entry["level"] == "error" and entry["status"] == 500
    assert entry["error"].startswith("generation failed: RuntimeError: ")
    assert "channels" in entry["error"]  # the engine's own message, not a paraphrase
    assert "Traceback" in entry["exception"]
