"""Serving: throughput of concurrent clients (batched into one denoising loop) against
one client at a time, start-up to ready, request latency per output encoding, and health
latency while the generation slot is busy, against a real local model server.

Throughput (``--parts throughput``): one ``ldm serve`` on 127.0.0.1 with batching on
(``serving.max_batch_size``, default 8), the demo bundle (``--bundle``) or random weights at
the preset's shapes (speed does not depend on the weights). Each round sends ``--requests``
one-seed DDIM-``--steps`` requests one after another from one client, then the same number
from ``--clients`` concurrent clients; rounds alternate so load drift on a shared machine hits
both alike. The ratio of the two throughputs is the result; beside it, where the time of one
request goes (denoising at batch 1 and at the batch size, decoding, summaries and encoding),
measured in process on the same bundle.

The reference for the binary data extension (``--parts latency``) is the same request with
the volume as a JSON number list, measured in the same run. Usage:

    .venv/bin/python -m benchmarks.bench_serving [--preset tiny-cpu] [--bundle DIR] [--steps 10]
        [--parts throughput,latency] [--clients 8] [--requests 16] [--rounds 2] [--repeat 3] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from ldm_core.config import Config, load_config
from ldm_core.deploy import deploy, stop_local
from tests.harness.data import random_bundle
from tests.harness.serving import model_server


def _request(url: str, model: str, body: dict, client: httpx.Client) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = client.post(f"{url}/v2/models/{model}/infer", json=body)
    r.raise_for_status()
    return time.perf_counter() - t0, len(r.content)


def _codec_seconds(shape: tuple[int, ...], binary: bool, repeat: int) -> tuple[float, int]:
    """Server-side encoding (KServe's to_rest + JSON serialisation) plus client-side decoding
    of one volume, in process: the cost the binary extension removes, free of denoising."""
    import numpy as np
    import orjson
    from kserve.protocol.infer_type import InferRequest

    from ldm_core.serve.protocol import GenerationRequest, build_v2_response

    volume = np.random.default_rng(0).random((1, 1, *shape), dtype=np.float32)
    affine = np.eye(4)
    best, size = float("inf"), 0
    for _ in range(repeat):
        request = InferRequest("m", [], parameters={"binary_data_output": binary})
        req = GenerationRequest("id", "v2", [0], "ddim", 1, "volume", infer_request=request)
        t0 = time.perf_counter()
        body, json_len = build_v2_response(req, volume, affine, [], "m").to_rest()
        wire = body if isinstance(body, bytes) else orjson.dumps(body)
        if json_len is not None:
            head = json.loads(wire[:json_len])
            n = head["outputs"][0]["parameters"]["binary_data_size"]
            out = np.frombuffer(wire[json_len : json_len + n], dtype=np.float32)
        else:
            out = np.asarray(json.loads(wire)["outputs"][0]["data"], dtype=np.float32)
        assert out.size == volume.size
        best, size = min(best, time.perf_counter() - t0), len(wire)
    return best, size


def _latency_part(cfg: Config, preset: str, steps: int, repeat: int) -> tuple[dict, str]:
    """Start-up, latency per output encoding, the codec alone, health under load."""
    model = cfg.serving.model_name
    with tempfile.TemporaryDirectory() as tmp:
        bundle = random_bundle(Path(tmp) / "bundle", cfg)
        t0 = time.perf_counter()
        served = deploy(
            cfg, bundle, backend="local", state_dir=Path(tmp) / "state", ready_timeout_s=600
        )
        start_s = time.perf_counter() - t0
        url = served["url"]
        seed = {"name": "seed", "shape": [1], "datatype": "INT64", "data": [0]}
        variants = {
            "volume_json": {"output": "volume"},
            "volume_binary": {"output": "volume", "binary_data_output": True},
            "nifti_base64": {"output": "nifti"},
        }
        latency: dict[str, float] = {}
        size: dict[str, int] = {}
        try:
            with httpx.Client(timeout=600) as client:
                # Over HTTP at 1 denoising step, interleaved so load drift on a shared
                # machine hits all variants alike (decoding the volume still dominates).
                runs: dict[str, list[float]] = {name: [] for name in variants}
                for round_ in range(repeat + 1):
                    for name, params in variants.items():
                        body = {"inputs": [seed], "parameters": {"steps": 1, **params}}
                        t, size[name] = _request(url, model, body, client)
                        if round_:  # the first round is warm-up
                            runs[name].append(t)
                latency = {name: statistics.median(ts) for name, ts in runs.items()}
                body = {
                    "inputs": [seed],
                    "parameters": {"steps": steps, "binary_data_output": True},
                }
                latency[f"ddim{steps}_volume_binary"] = statistics.median(
                    _request(url, model, body, client)[0] for _ in range(repeat)
                )
                # Health checks while 3 requests hold / wait for the single generation slot.
                workers = [
                    threading.Thread(
                        target=_request, args=(url, model, body, httpx.Client(timeout=600))
                    )
                    for _ in range(3)
                ]
                for w in workers:
                    w.start()
                time.sleep(0.2)
                health = []
                while any(w.is_alive() for w in workers):
                    t = time.perf_counter()
                    client.get(f"{url}/v2/health/live").raise_for_status()
                    health.append(time.perf_counter() - t)
                    time.sleep(0.05)
                for w in workers:
                    w.join()
                metrics = client.get(f"{url}/metrics").text
        finally:
            stop_local(served)

    codec = {
        name: _codec_seconds(tuple(cfg.data.shape), name == "binary", repeat)
        for name in ("json", "binary")
    }
    result = {
        "start_to_ready_s": round(start_s, 2),
        "latency_s": {k: round(v, 3) for k, v in latency.items()},
        "response_bytes": size,
        "http_binary_vs_json_speedup": round(latency["volume_json"] / latency["volume_binary"], 2),
        "binary_vs_json_size_ratio": round(size["volume_json"] / size["volume_binary"], 2),
        "codec_s": {name: round(t, 4) for name, (t, _) in codec.items()},
        "codec_binary_vs_json_speedup": round(codec["json"][0] / codec["binary"][0], 1),
        "health_during_load_s": {
            "n": len(health),
            "median": round(statistics.median(health), 4) if health else None,
            "max": round(max(health), 4) if health else None,
        },
        "metrics_exported": sorted(
            {
                line.split("{")[0].split(" ")[0]
                for line in metrics.splitlines()
                if line.startswith("ldm_")
            }
        ),
    }
    summary = (
        f"{preset} {'x'.join(map(str, cfg.data.shape))}: ready in {start_s:.1f} s; volume encode+decode "
        f"binary {codec['binary'][0] * 1000:.1f} ms vs JSON {codec['json'][0] * 1000:.0f} ms "
        f"({result['binary_vs_json_size_ratio']}x smaller); DDIM-{steps} "
        f"{latency[f'ddim{steps}_volume_binary']:.2f} s; health under load max {result['health_during_load_s']['max']} s"
    )
    return result, summary


def _histogram(url: str, name: str) -> tuple[float, float]:
    """``(count, sum)`` of a histogram on the server's ``/metrics``."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    count = re.search(rf"^{name}_count (\S+)$", text, re.M)
    total = re.search(rf"^{name}_sum (\S+)$", text, re.M)
    return float(count.group(1)), float(total.group(1))


def _send(url: str, model: str, seeds: list[int], steps: int) -> None:
    """One client sending one-seed requests one after another."""
    with httpx.Client(timeout=600) as client:
        for seed in seeds:
            body = {
                "inputs": [{"name": "seed", "shape": [1], "datatype": "INT64", "data": [seed]}],
                "parameters": {"steps": steps, "binary_data_output": True},
            }
            client.post(f"{url}/v2/models/{model}/infer", json=body).raise_for_status()


def _clients(url: str, model: str, seeds: list[int], steps: int, clients: int) -> float:
    """Seconds for ``clients`` concurrent clients to send one request per seed between them."""
    shares = [seeds[i::clients] for i in range(clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for done in [pool.submit(_send, url, model, share, steps) for share in shares]:
            done.result()
    return time.perf_counter() - t0


def _breakdown(bundle_dir: Path, batch: int, steps: int = 2) -> dict[str, float]:
    """Where one request's time goes, in process on the same bundle (best of 2, ``steps``
    denoising steps timed): a denoising step at batch 1 and at ``batch`` (per sample),
    decoding one volume, and the server's per-volume CPU work after it (output summaries, a
    gzip-NIfTI encoding)."""
    import numpy as np

    from ldm_core.bundle import load
    from ldm_core.sample import decode, denoise
    from ldm_core.serve.monitoring import summarise
    from ldm_core.serve.protocol import encode

    bundle = load(bundle_dir, "cpu")

    def best(fn: Any) -> float:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    step_1 = best(lambda: denoise(bundle, [0], steps=steps)) / steps
    step_n = best(lambda: denoise(bundle, list(range(batch)), steps=steps)) / steps / batch
    latent = denoise(bundle, [0], steps=1)
    volume = decode(bundle, latent).numpy()
    affine = np.asarray(bundle.affine)
    return {
        "denoise_step_batch1_s": round(step_1, 4),
        f"denoise_step_batch{batch}_per_sample_s": round(step_n, 4),
        "decode_per_volume_s": round(best(lambda: decode(bundle, latent)), 4),
        "summaries_per_volume_s": round(best(lambda: summarise(volume[0])), 4),
        "nifti_encode_per_volume_s": round(best(lambda: encode(volume, affine, ["nifti"])), 4),
    }


def _throughput_part(
    cfg: Config, bundle: Path | None, steps: int, clients: int, requests: int, rounds: int
) -> tuple[dict, str]:
    """Requests per second of ``clients`` concurrent clients vs one client at a time."""
    model = cfg.serving.model_name
    batch = cfg.serving.max_batch_size
    settings = [
        f"serving.max_batch_size={batch}",
        f"serving.max_batch_wait_ms={cfg.serving.max_batch_wait_ms:g}",
        "serving.max_concurrency=1",
        f"serving.max_queue={max(cfg.serving.max_queue, clients)}",
    ]
    sets = [arg for setting in settings for arg in ("--set", setting)]
    sequential_s = concurrent_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        bundle = bundle or random_bundle(Path(tmp) / "bundle", cfg)
        log_file = Path(tmp) / "serve.log"
        with model_server(bundle, log_file, "--device", "cpu", *sets, ready_timeout=600) as server:
            url = server.url
            # Warm-up: every batch size's kernels once (oneDNN builds them on first use).
            _clients(url, model, list(range(clients)), steps, clients)
            _send(url, model, [0], steps)
            batches = batched = 0.0  # of the concurrent phases, from ldm_batch_requests
            for r in range(rounds):
                seeds = list(range(r * requests, (r + 1) * requests))
                t0 = time.perf_counter()
                _send(url, model, seeds, steps)
                sequential_s += time.perf_counter() - t0
                count, total = _histogram(url, "ldm_batch_requests")
                concurrent_s += _clients(url, model, seeds, steps, clients)
                after = _histogram(url, "ldm_batch_requests")
                batches, batched = batches + after[0] - count, batched + after[1] - total
        breakdown = _breakdown(Path(bundle), batch)
    total = rounds * requests
    sequential_rps, concurrent_rps = total / sequential_s, total / concurrent_s
    ratio = concurrent_rps / sequential_rps
    result = {
        "clients": clients,
        "requests_per_mode": total,
        "max_batch_size": batch,
        "max_batch_wait_ms": cfg.serving.max_batch_wait_ms,
        "one_at_a_time_rps": round(sequential_rps, 3),
        "concurrent_rps": round(concurrent_rps, 3),
        "concurrent_vs_one_at_a_time": round(ratio, 2),
        "requests_per_batch_concurrent": round(batched / batches, 2) if batches else None,
        "breakdown_s": breakdown,
    }
    summary = (
        f"{clients} clients {concurrent_rps:.2f} req/s vs one at a time {sequential_rps:.2f} req/s: "
        f"{ratio:.2f}x (DDIM-{steps}, batches of {result['requests_per_batch_concurrent']} "
        f"requests, max_batch_size={batch})"
    )
    return result, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument(
        "--bundle", type=Path, help="bundle to serve for throughput (default: random weights)"
    )
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps of timed requests")
    parser.add_argument(
        "--parts", default="throughput,latency", help="comma-separated: throughput, latency"
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=16, help="requests per mode per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both modes")
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed requests per latency variant (after warm-up)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of the server and the in-process breakdown (0: torch's default, "
        "one per core; on a machine shared with other jobs one thread avoids OpenMP threads "
        "spinning against each other for the same cores)",
    )
    parser.add_argument(
        "--record", action="store_true", help="append to benchmarks/results.jsonl and README"
    )
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server process inherits it
        torch.set_num_threads(args.threads)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"throughput", "latency"}:
        parser.error(f"--parts: {args.parts!r} is not a list of throughput, latency")

    cfg = load_config(
        preset=args.preset, overrides=["serving.max_concurrency=1", "serving.max_queue=8"]
    )
    result: dict[str, Any] = {
        "preset": args.preset,
        "image_shape": list(cfg.data.shape),
        "steps": args.steps,
        "server_threads": args.threads or torch.get_num_threads(),
    }
    summaries = []
    if "throughput" in parts:
        result["bundle"] = str(args.bundle) if args.bundle else "random weights"
        result["throughput"], summary = _throughput_part(
            cfg, args.bundle, args.steps, args.clients, args.requests, args.rounds
        )
        summaries.append(summary)
    if "latency" in parts:
        latency, summary = _latency_part(cfg, args.preset, args.steps, args.repeat)
        result.update(latency)
        summaries.append(summary)
    summary = "; ".join(summaries)
    if args.record:
        from benchmarks.common import record

        record("bench_serving", result, summary)
    else:
        print(json.dumps(result, indent=2))
        print(summary)


if __name__ == "__main__":
    main()
