"""The served model from a client's side: V2 request bodies, and the command that starts a
model server the way KServe's ServingRuntime does (``python -m ldm_core.serve``)."""

from __future__ import annotations

import socket
import sys
from typing import Any


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
