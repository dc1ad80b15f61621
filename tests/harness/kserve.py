"""KServe-protocol servers on loopback that answer wrongly, for the smoke check's tests.

A real model server that lost its way (bad weights, a broken GPU kernel, the previous
bundle still mounted) still answers V2 metadata and still returns HTTP 200 to an
inference. Those answers a deploy must not call healthy, so they are served here over real
HTTP. :class:`Answer` says what the server claims and returns; each field can be made
wrong on its own:

- ``nan_model_server(model)``: metadata fine, every volume NaN, a singular affine;
- ``model_server(model, Answer(...))``: a well-formed answer with the given volume shape,
  affine and bundle digest (reported in the metadata's and/or the answer's ``parameters``,
  as a KServe model's ``parameters`` are).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np


@dataclass
class Answer:
    """What the fake server says about itself and returns for any inference."""

    shape: tuple[int, int, int] = (4, 4, 4)
    """D, H, W of the volume it returns."""
    metadata_shape: tuple[int, int, int] | None = None
    """D, H, W its metadata claims (default: ``shape``)."""
    affine: list[list[float]] = field(default_factory=lambda: np.eye(4).tolist())
    digest: str | None = None
    """Bundle digest it reports; None reports none (a server older than the deploy step)."""
    digest_in: tuple[str, ...] = ("metadata", "answer")
    fill: float = 0.5


def _handler(model: str, answer: Answer) -> type[BaseHTTPRequestHandler]:
    def parameters(where: str) -> dict[str, Any]:
        if answer.digest is None or where not in answer.digest_in:
            return {}
        return {"parameters": {"bundle_digest": answer.digest}}

    class FakeModel(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            d, h, w = answer.metadata_shape or answer.shape
            outputs = [{"name": "volume", "datatype": "FP32", "shape": [-1, 1, d, h, w]}]
            self._send(
                200, {"name": model, "inputs": [], "outputs": outputs, **parameters("metadata")}
            )

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length", 0)))
            volume = [answer.fill] * int(np.prod(answer.shape))
            affine = [x for row in answer.affine for x in row]
            outputs = [
                {
                    "name": "volume",
                    "shape": [1, 1, *answer.shape],
                    "datatype": "FP32",
                    "data": volume,
                },
                {"name": "affine", "shape": [4, 4], "datatype": "FP32", "data": affine},
            ]
            self._send(200, {"model_name": model, "outputs": outputs, **parameters("answer")})

        def log_message(self, *args: object) -> None:
            pass

    return FakeModel


@contextmanager
def model_server(model: str, answer: Answer) -> Iterator[str]:
    """Serve ``model`` answering ``answer`` on a free 127.0.0.1 port; yield its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(model, answer))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def nan_model_server(model: str) -> Iterator[str]:
    """Serve ``model`` with NaN volumes and a (singular) all-ones affine."""
    with model_server(model, Answer(fill=float("nan"), affine=[[1.0] * 4] * 4)) as url:
        yield url
