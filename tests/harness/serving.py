"""The served model from a client's side: V2 request bodies, and a model server process
started the way KServe's ServingRuntime starts it (``python -m ldm_core.serve``)."""

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


def serve_command(*args: str, port: int | None = None) -> list[str]:
    """``python -m ldm_core.serve`` on 127.0.0.1 (a free port unless given) with ``args``."""
    port = port or free_port()
    return [
        sys.executable,
        "-m",
        "ldm_core.serve",
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
    bundle: str | Path, log_file: Path, *args: str, ready_timeout: float = 240
) -> Iterator[Server]:
    """A running server for ``bundle`` (extra ``args`` go to its command line), ready to
    answer; stopped on exit."""
    port = free_port()
    with open(log_file, "wb") as out:
        process = subprocess.Popen(
            serve_command("--bundle", str(bundle), *args, port=port),
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
