"""Concurrent requests denoised in one loop: the batching rule, admission's deadlines and
failures for batched requests (a failed batch retried request by request, so each gets the
answer it would have got alone), and the real server over HTTP (one batch for four
concurrent requests, the same volume for a seed alone or in a batch, loops that differ
never merged, a batch that fails for every request answered 500 per request)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from kserve.errors import InferenceError
from kserve.protocol.infer_type import InferInput, InferRequest

from ldm_core.config import ConfigError, load_config
from ldm_core.serve import model as served_model
from ldm_core.serve.admission import Admission, GenerationTimeout, Progress, ServerBusy
from ldm_core.serve.batching import BatchQueue
from ldm_core.serve.model import BrainLDMModel
from tests.harness.configs import MODEL, serve_config
from tests.harness.data import random_bundle
from tests.harness.serving import model_server, v2

# --------------------------------------------------------------------------- the rule


@dataclass(eq=False)
class Waiting:
    key: str
    size: int
    queued_at: float = 0.0


def _take(queue: BatchQueue, now: float) -> list[tuple[str, int]]:
    return [(w.key, w.size) for w in queue.take(now)]


@pytest.mark.parametrize(
    "waiting, now, expected",
    [
        # Full at once: goes without waiting.
        ([("a", 2), ("a", 2), ("a", 1)], 0.0, [("a", 2), ("a", 2)]),
        # Not full: waits for company until the leader's wait is over, then goes as it is.
        ([("a", 1), ("a", 2)], 0.5, []),
        ([("a", 1), ("a", 2)], 1.0, [("a", 1), ("a", 2)]),
        # Another key never joins; a later request that fits does, in arrival order.
        ([("a", 2), ("b", 1), ("a", 3), ("a", 2)], 1.0, [("a", 2), ("a", 2)]),
        # A request larger than the batch runs alone, unsplit.
        ([("a", 6), ("a", 1)], 0.0, [("a", 6)]),
    ],
)
def test_the_oldest_request_leads_and_equal_keys_fill_the_batch(waiting, now, expected):
    queue: BatchQueue = BatchQueue(max_batch_size=4, max_wait_s=1.0)
    for key, size in waiting:
        queue.push(Waiting(key, size))
    assert _take(queue, now) == expected
    assert len(queue) == len(waiting) - len(expected)


def test_what_a_batch_leaves_behind_waits_its_turn():
    queue: BatchQueue = BatchQueue(max_batch_size=2, max_wait_s=0.0)
    for i, key in enumerate(["a", "b", "a", "a"]):
        queue.push(Waiting(key, 1, queued_at=float(i)))
    assert _take(queue, 5.0) == [("a", 1), ("a", 1)]
    assert _take(queue, 5.0) == [("b", 1)]
    assert _take(queue, 5.0) == [("a", 1)]
    assert queue.ready_at() is None and _take(queue, 5.0) == []


def test_a_request_put_back_alone_goes_first_by_itself_at_once():
    queue: BatchQueue = BatchQueue(max_batch_size=4, max_wait_s=1.0)
    waiting, retried = Waiting("a", 1, queued_at=0.5), Waiting("a", 1, queued_at=0.0)
    queue.push(waiting)
    queue.push_alone(retried)
    assert queue.ready_at() <= 0.5 and queue.take(0.5) == [retried]
    assert queue.take(0.5) == [] and queue.ready_at() == 1.5  # the rest waits its turn
    assert queue.take(1.5) == [waiting]


def test_batching_limits_are_checked_with_the_field_named():
    with pytest.raises(ConfigError, match="serving.max_batch_size"):
        load_config(overrides=["serving.max_batch_size=0"])
    with pytest.raises(ConfigError, match="serving.max_batch_wait_ms"):
        load_config(overrides=["serving.max_batch_wait_ms=-1"])
    assert load_config().serving.max_batch_size > 1  # batching is on by default


# --------------------------------------------------------------------------- admission


@dataclass
class Recorder:
    """A batch worker whose steps each wait for ``step`` and that records its batches."""

    step: threading.Event = field(default_factory=threading.Event)
    batches: list[list[int]] = field(default_factory=list)
    fail: bool = False

    def __call__(self, key: str, parts: list[int], progress: Progress) -> list[int]:
        self.batches.append(list(parts))
        if self.fail:
            raise RuntimeError("the UNet broke")
        for i in range(100):
            self.step.wait(5)
            progress(i + 1, 100)
        return [p * 10 for p in parts]


def _run(admission: Admission, work: Recorder, part: int, timeout: float | None = None):
    """Request ``part`` (one sample), ``timeout`` seconds from its deadline (default: the
    admission's whole time limit)."""
    left = admission.timeout_s if timeout is None else timeout
    return admission.run(
        work,
        part,
        key="k",
        size=1,
        request_id=f"r{part}",
        started=time.monotonic() - (admission.timeout_s - left),
        steps=100,
    )


def test_a_request_past_its_deadline_in_the_queue_gets_504_and_the_batch_runs_without_it():
    async def scenario() -> list:
        admission = Admission(1, 8, timeout_s=30, max_batch_size=4, max_batch_wait_s=0)
        work = Recorder()
        running = asyncio.ensure_future(_run(admission, work, 1))  # takes the only slot
        await asyncio.sleep(0.05)
        queued = [
            asyncio.ensure_future(_run(admission, work, 2, timeout=0.2)),
            asyncio.ensure_future(_run(admission, work, 3)),
        ]
        await asyncio.sleep(0.5)
        work.step.set()
        results = await asyncio.gather(running, *queued, return_exceptions=True)
        admission.close()
        return [results, work.batches]

    (first, late, last), batches = asyncio.run(scenario())
    assert first.result == 10 and first.batch_requests == 1
    assert isinstance(late, GenerationTimeout) and late.status == 504
    assert "r2" in str(late) and "waiting in the queue" in str(late)
    assert last.result == 30 and batches == [[1], [3]]


def test_a_batch_runs_on_for_the_requests_still_waiting_and_stops_when_none_is():
    async def scenario() -> tuple:
        admission = Admission(1, 8, timeout_s=30, max_batch_size=4, max_batch_wait_s=0.2)
        work = Recorder()
        impatient = asyncio.ensure_future(_run(admission, work, 1, timeout=0.5))
        patient = asyncio.ensure_future(_run(admission, work, 2))
        await asyncio.sleep(0.7)  # in one batch; the first request's deadline has passed
        work.step.set()
        outcome = await asyncio.gather(impatient, patient, return_exceptions=True)
        # Now a batch whose only request gives up stops at its next step.
        work.step.clear()
        alone = asyncio.ensure_future(_run(admission, work, 3, timeout=0.5))
        done = await asyncio.gather(alone, return_exceptions=True)
        work.step.set()  # its next step sees that nobody waits
        for _ in range(50):
            if admission._running == 0:
                break
            await asyncio.sleep(0.02)
        admission.close()
        return outcome, done, work.batches, admission._running

    (impatient, patient), (alone,), batches, running = asyncio.run(scenario())
    assert batches[0] == [1, 2]
    assert isinstance(impatient, GenerationTimeout) and "generating (step 0 of 100)" in str(
        impatient
    )
    assert patient.result == 20 and patient.batch_requests == 2 and patient.batch_samples == 2
    assert isinstance(alone, GenerationTimeout)
    assert running == 0  # the abandoned batch stopped and freed its slot


def test_a_failed_batch_is_retried_request_by_request_before_the_queue():
    async def scenario() -> tuple:
        admission = Admission(1, 8, timeout_s=30, max_batch_size=3, max_batch_wait_s=0.2)
        work = Recorder(fail=True)
        requests = [asyncio.ensure_future(_run(admission, work, i)) for i in (1, 2, 3)]
        await asyncio.sleep(0.05)
        later = asyncio.ensure_future(_run(admission, work, 4))  # waits for the next batch
        results = await asyncio.gather(*requests, later, return_exceptions=True)
        admission.close()
        return results, work.batches, admission._running, len(admission._queue)

    results, batches, running, queued = asyncio.run(scenario())
    # Each request of the failed batch ran alone, ahead of the request that came later.
    assert batches == [[1, 2, 3], [1], [2], [3], [4]]
    assert all(isinstance(r, RuntimeError) and "the UNet broke" in str(r) for r in results)
    assert running == 0 and queued == 0


# --------------------------------------------------------------------------- a batch that fails


class FlakyGenerate:
    """The model's generation function (``ldm_core.serve.model.generate``), failing the way a
    real engine fails, deterministically: a loop of more than ``max_samples`` samples runs
    out of device memory (``torch.cuda.OutOfMemoryError``, as a GPU raises it), and a loop
    holding ``bad_seed`` fails with an engine error. Records the seeds of every loop."""

    def __init__(self, real, max_samples: int, bad_seed: int) -> None:
        self.real = real
        self.max_samples = max_samples
        self.bad_seed = bad_seed
        self.loops: list[list[int]] = []

    def __call__(self, bundle, seeds, *args, **kwargs):
        self.loops.append(list(seeds))
        if len(seeds) > self.max_samples:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory ({len(seeds)} samples)")
        if self.bad_seed in seeds:
            raise RuntimeError(f"NaN in the UNet output (seed {self.bad_seed})")
        return self.real(bundle, seeds, *args, **kwargs)


@pytest.fixture
def flaky_model(tmp_path, monkeypatch):
    """A loaded model whose batches of requests join (one slot, 0.3 s to gather) and whose
    generation fails as :class:`FlakyGenerate` says: (model, flaky)."""
    cfg = serve_config(
        "serving.max_batch_size=8",
        "serving.max_batch_wait_ms=300",
        "serving.max_concurrency=1",
        "serving.warmup=false",
    )
    model = BrainLDMModel(
        MODEL, random_bundle(tmp_path / "bundle", cfg), cfg, Admission.from_config(cfg.serving)
    )
    model.load()
    flaky = FlakyGenerate(served_model.generate, max_samples=2, bad_seed=13)
    monkeypatch.setattr(served_model, "generate", flaky)
    yield model, flaky
    model.admission.close()


def _request(seeds: list[int], request_id: str) -> InferRequest:
    tensor = InferInput("seed", [len(seeds)], "INT64")
    tensor.set_data_from_numpy(np.asarray(seeds, dtype=np.int64))
    return InferRequest(
        MODEL, [tensor], request_id=request_id, parameters={"steps": 2, "output": "volume"}
    )


def _answers(model: BrainLDMModel, calls: dict[str, list[int]]) -> dict[str, object]:
    """Every ``request id -> seeds`` sent at once: each one's volumes, or its exception."""

    async def one(rid: str, seeds: list[int]) -> object:
        try:
            response, _ = await model(_request(seeds, rid), headers={})
        except Exception as exc:  # noqa: BLE001 - the answer under test
            return exc
        return {o.name: o for o in response.outputs}["volume"].as_numpy()

    async def every() -> list[object]:
        return await asyncio.gather(*(one(rid, seeds) for rid, seeds in calls.items()))

    return dict(zip(calls, asyncio.run(every())))


def test_a_batch_out_of_memory_is_retried_request_by_request(flaky_model):
    model, flaky = flaky_model
    answers = _answers(model, {"one": [1], "two": [2], "three": [5, 6, 7]})
    # One loop of all five samples ran out of memory; each request then ran alone.
    assert flaky.loops == [[1, 2, 5, 6, 7], [1], [2], [5, 6, 7]]
    # The one-seed requests get what they would have got alone, not "retry with fewer seeds".
    assert answers["one"].shape == answers["two"].shape == (1, 1, 16, 16, 16)
    alone = _answers(model, {"alone": [1]})["alone"]
    np.testing.assert_array_equal(answers["one"], alone)
    # The request too large for the device alone gets that answer, its own.
    assert isinstance(answers["three"], ServerBusy) and answers["three"].status == 503
    assert "3 samples" in str(answers["three"]) and "fewer seeds" in str(answers["three"])


def test_a_request_whose_own_generation_fails_gets_its_own_error(flaky_model):
    model, flaky = flaky_model
    answers = _answers(model, {"first": [1], "broken": [13], "last": [2]})
    assert flaky.loops == [[1, 13, 2], [1], [13], [2]]
    assert isinstance(answers["broken"], InferenceError)
    assert "request broken" in str(answers["broken"]) and "seed 13" in str(answers["broken"])
    for rid in ("first", "last"):
        assert isinstance(answers[rid], np.ndarray), answers[rid]
        assert answers[rid].shape == (1, 1, 16, 16, 16)


# --------------------------------------------------------------------------- the real server

WAIT_MS = 2000
"""A batch's first request waits this long for company: four requests sent at once join
well within it, and a request sent alone is known to run alone (nothing else comes)."""
BATCHING = [
    "serving.max_batch_size=4",
    f"serving.max_batch_wait_ms={WAIT_MS}",
    "serving.max_concurrency=1",
    "serving.max_samples=3",
]


@pytest.fixture(scope="module")
def batching(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    bundle = random_bundle(root / "bundle", serve_config(*BATCHING))
    sets = [arg for setting in BATCHING for arg in ("--set", setting)]
    with model_server(bundle, root / "serve.log", "--device", "cpu", *sets) as server:
        yield server


def _infer(url: str, body: dict, request_id: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v2/models/{MODEL}/infer",
        json=body,
        headers={"x-request-id": request_id},
        timeout=120,
    )


def _at_once(url: str, calls: dict[str, dict]) -> dict[str, httpx.Response]:
    """POST every ``request id -> body`` at the same time; the responses by request id."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {rid: pool.submit(_infer, url, body, rid) for rid, body in calls.items()}
        return {rid: f.result() for rid, f in futures.items()}


def _volumes(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}["volume"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _requests(server, ids: set[str]) -> dict[str, dict]:
    """The log line of each request id in ``ids``."""
    lines = [e for e in server.log_events() if e.get("event") == "request"]
    return {e["request_id"]: e for e in lines if e["request_id"] in ids}


def _histogram(url: str, name: str) -> tuple[float, float]:
    """``(count, sum)`` of a histogram on ``/metrics``."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    count = re.search(rf"^{name}_count (\S+)$", text, re.M)
    total = re.search(rf"^{name}_sum (\S+)$", text, re.M)
    return float(count.group(1)), float(total.group(1))


def test_four_concurrent_requests_run_as_one_batch(batching):
    url = batching.url
    before = _histogram(url, "ldm_batch_requests"), _histogram(url, "ldm_batch_samples")
    calls = {f"four-{i}": v2([i], steps=3) for i in range(4)}
    responses = _at_once(url, calls)
    assert all(r.status_code == 200 for r in responses.values()), responses
    after = _histogram(url, "ldm_batch_requests"), _histogram(url, "ldm_batch_samples")
    # One loop more, holding the four requests and their four samples.
    assert after[0][0] - before[0][0] == 1 and after[0][1] - before[0][1] == 4
    assert after[1][0] - before[1][0] == 1 and after[1][1] - before[1][1] == 4
    lines = _requests(batching, set(calls))
    assert len({e["batch_id"] for e in lines.values()}) == 1
    assert all(e["batch_requests"] == 4 and e["batch_samples"] == 4 for e in lines.values())


SEED_TOLERANCE = 1e-5
"""Largest voxel difference (images in [0, 1]) between a seed alone and in a batch. Each
sample's noise comes from its own seed's generators, so only the UNet's convolutions see
the batch: oneDNN picks its blocking by batch size, and the sums round differently (measured
here: up to 4.5e-6 in one 3D convolution, 3e-6 at the end of DDIM-10 on the demo bundle;
the DDIM and DDPM updates themselves are elementwise and identical)."""


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_a_seed_gives_the_same_volume_alone_or_in_a_batch(batching, sampler):
    url = batching.url
    alone = {
        s: _volumes(_infer(url, v2([s], sampler=sampler, steps=4), f"alone-{sampler}-{s}"))
        for s in (7, 8)
    }
    calls = {
        f"batched-{sampler}-7": v2([7], sampler=sampler, steps=4),
        f"batched-{sampler}-89": v2([9, 8], sampler=sampler, steps=4),
        f"batched-{sampler}-10": v2([10], sampler=sampler, steps=4),
    }
    responses = _at_once(url, calls)
    lines = _requests(batching, set(calls) | {f"alone-{sampler}-{s}" for s in (7, 8)})
    assert all(lines[f"alone-{sampler}-{s}"]["batch_requests"] == 1 for s in (7, 8))
    assert {lines[rid]["batch_requests"] for rid in calls} == {3}
    batched_7 = _volumes(responses[f"batched-{sampler}-7"])[0]
    batched_8 = _volumes(responses[f"batched-{sampler}-89"])[1]
    for seed, volume in ((7, batched_7), (8, batched_8)):
        difference = np.abs(volume - alone[seed][0]).max()
        assert difference <= SEED_TOLERANCE, (seed, difference)
    # Not trivially equal: different seeds give different volumes.
    assert np.abs(batched_7 - batched_8).max() > 1e-3


def test_requests_for_different_loops_are_not_merged(batching):
    calls = {f"mixed-{i}": v2([i], steps=2 + i % 2) for i in range(4)}
    responses = _at_once(batching.url, calls)
    assert all(r.status_code == 200 for r in responses.values()), responses
    lines = _requests(batching, set(calls))
    by_steps: dict[int, set[int]] = {}
    for entry in lines.values():
        by_steps.setdefault(entry["steps"], set()).add(entry["batch_id"])
        assert entry["batch_requests"] == 2
    assert set(by_steps) == {2, 3}
    assert all(len(ids) == 1 for ids in by_steps.values())
    assert by_steps[2] != by_steps[3]


def test_a_failed_batch_is_a_500_for_each_request_logged_with_its_cause(tmp_path):
    # The UNet raises at its first forward: bundle.json gives the latents one channel more
    # than the UNet takes (no warm-up, or loading would fail).
    bundle = random_bundle(tmp_path / "bundle", serve_config(*BATCHING))
    info_file = Path(bundle) / "bundle.json"
    info = json.loads(info_file.read_text())
    info["latent_shape"][0] += 1
    info_file.write_text(json.dumps(info))
    config = tmp_path / "serve.yaml"
    serve_config(*BATCHING, "serving.warmup=false").save(config)
    with model_server(bundle, tmp_path / "serve.log", "--config", str(config)) as server:
        calls = {f"broken-{i}": v2([i], steps=2) for i in range(2)}
        responses = _at_once(server.url, calls)
        for rid, r in responses.items():
            assert r.status_code == 500, r.text
            assert rid in r.json()["error"] and "RuntimeError" in r.json()["error"]
        # One batch of two, then each request alone: both fail alone too, each with its cause.
        assert _histogram(server.url, "ldm_batch_requests") == (3.0, 4.0)
    lines = _requests(server, set(calls))
    assert set(lines) == set(calls)
    for entry in lines.values():
        assert entry["status"] == 500 and entry["level"] == "error"
        assert entry["error"].startswith("generation failed: RuntimeError: ")
        assert "channels" in entry["error"]
