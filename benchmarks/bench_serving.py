"""Serving: start-up to ready, request latency per output encoding, and health latency
while the generation slot is busy, against a real local model server (random weights at
the preset's shapes; speed does not depend on the weights).

The reference for the binary data extension is the same request with the volume as a JSON
number list, measured in the same run. Usage:

    .venv/bin/python -m benchmarks.bench_serving [--preset tiny-cpu] [--steps 10] [--repeat 3] [--record]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from ldm_core.config import load_config
from ldm_core.deploy import deploy, stop_local
from tests.harness.data import random_bundle


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument(
        "--steps", type=int, default=10, help="DDIM steps of the generation-latency request"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed requests per variant (after one warm-up)"
    )
    parser.add_argument(
        "--record", action="store_true", help="append to benchmarks/results.jsonl and README"
    )
    args = parser.parse_args()

    cfg = load_config(
        preset=args.preset, overrides=["serving.max_concurrency=1", "serving.max_queue=8"]
    )
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
                for round_ in range(args.repeat + 1):
                    for name, params in variants.items():
                        body = {"inputs": [seed], "parameters": {"steps": 1, **params}}
                        t, size[name] = _request(url, model, body, client)
                        if round_:  # the first round is warm-up
                            runs[name].append(t)
                latency = {name: statistics.median(ts) for name, ts in runs.items()}
                body = {
                    "inputs": [seed],
                    "parameters": {"steps": args.steps, "binary_data_output": True},
                }
                latency[f"ddim{args.steps}_volume_binary"] = statistics.median(
                    _request(url, model, body, client)[0] for _ in range(args.repeat)
                )
                # Health checks while 3 requests hold / wait for the single generation slot.
                body = {
                    "inputs": [seed],
                    "parameters": {"steps": args.steps, "binary_data_output": True},
                }
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
        name: _codec_seconds(tuple(cfg.data.shape), name == "binary", args.repeat)
        for name in ("json", "binary")
    }
    result = {
        "preset": args.preset,
        "image_shape": list(cfg.data.shape),
        "steps": args.steps,
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
        f"{args.preset} {'x'.join(map(str, cfg.data.shape))}: ready in {start_s:.1f} s; volume encode+decode "
        f"binary {codec['binary'][0] * 1000:.1f} ms vs JSON {codec['json'][0] * 1000:.0f} ms "
        f"({result['binary_vs_json_size_ratio']}x smaller); DDIM-{args.steps} "
        f"{latency[f'ddim{args.steps}_volume_binary']:.2f} s; health under load max {result['health_during_load_s']['max']} s"
    )
    if args.record:
        from benchmarks.common import record

        record("bench_serving", result, summary)
    else:
        print(json.dumps(result, indent=2))
        print(summary)


if __name__ == "__main__":
    main()
