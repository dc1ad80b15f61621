"""The served model from a client's side: V2 request bodies, and a model server process
started the way KServe's ServingRuntime starts it (``python -m ldm_core.serve``).

``python -m tests.harness.serving STEP_S <ldm serve arguments>`` is the same server with
every denoising step made at least ``STEP_S`` seconds slower: tests of time limits then
hold on any hardware (a GPU or a fast runner cannot finish "slow" work in time)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.harness.configs import MODEL


def v2(seeds: Any, datatype: str = "INT64", shape: list[int] | None = None, **params: Any) -> dict:
    """A V2 inference body with one ``seed`` input; ``params`` become request parameters."""
    body = {
        "inputs": [
            {"name": "seed", "shape": shape or [len(seeds)], "datatype": datatype, "data": seeds}
        ]
    }
    if params:
        body["parameters"] = params
    return body


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(*args: str, port: int | None = None, step_s: float = 0.0) -> list[str]:
    """``python -m ldm_core.serve`` on 127.0.0.1 (a free port unless given) with ``args``;
    with ``step_s``, the slowed server of this module instead."""
    port = port or free_port()
    entry = ["tests.harness.serving", str(step_s)] if step_s else ["ldm_core.serve"]
    return [
        sys.executable,
        "-m",
        *entry,
        "--host",
        "127.0.0.1",
        "--http-port",
        str(port),
        *args,
    ]


@dataclass
class Server:
    """A model server process: where it answers, its process, and its log (stdout+stderr)."""

    url: str
    process: subprocess.Popen
    log_file: Path

    def log_events(self) -> list[dict]:
        """The JSON lines of the log (the predictor's own events)."""
        lines = self.log_file.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (what Kubernetes sends), then the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@contextlib.contextmanager
def model_server(
    bundle: str | Path,
    log_file: Path,
    *args: str,
    ready_timeout: float = 240,
    step_s: float = 0.0,
) -> Iterator[Server]:
    """A running server for ``bundle`` (extra ``args`` go to its command line), ready to
    answer; stopped on exit. ``step_s`` > 0 slows every denoising step by that much."""
    port = free_port()
    with open(log_file, "wb") as out:
        process = subprocess.Popen(
            serve_command("--bundle", str(bundle), *args, port=port, step_s=step_s),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_file)
    try:
        _wait_ready(server, ready_timeout)
        yield server
    finally:
        server.stop()


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5, trust_env=False) as http:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"model server exited ({server.process.returncode}) before it was ready:\n"
                    + server.log_file.read_text()[-3000:]
                )
            with contextlib.suppress(httpx.HTTPError):
                if http.get(f"{server.url}/v2/models/{MODEL}/ready").status_code == 200:
                    return
            time.sleep(0.25)
    raise RuntimeError(f"model server at {server.url} not ready after {timeout:g} s")


def serve_with_slow_steps(step_s: float, argv: list[str]) -> int:
    """``ldm serve argv`` whose denoising steps each sleep ``step_s`` seconds first (the
    sampler's progress callback runs once per step, so this is a per-step cost)."""
    # kserve parses sys.argv when imported; ldm serve clears it for the same reason.
    del sys.argv[1:]
    from ldm_core.cli import main
    from ldm_core.serve import model

    generate = model.generate

    def slowed(bundle: Any, seeds: Any, sampler: str, steps: int, **kwargs: Any) -> Any:
        progress = kwargs.pop("progress", None)

        def step(done: int, total: int) -> None:
            time.sleep(step_s)
            if progress is not None:
                progress(done, total)

        return generate(bundle, seeds, sampler, steps, progress=step, **kwargs)

    model.generate = slowed
    return main(["serve", *argv])


if __name__ == "__main__":
    sys.exit(serve_with_slow_steps(float(sys.argv[1]), sys.argv[2:]))
