"""A KServe-protocol server on loopback that answers wrongly, for the smoke check's tests.

A real model server that lost its way (bad weights, a broken GPU kernel) still answers V2
metadata and still returns HTTP 200 to an inference, with NaNs in the volume. That is the
answer a deploy must not call healthy, so it is served here over real HTTP:
``nan_model_server(model)`` yields the base URL of a server whose metadata is fine and whose
every inference is a 4x4x4 volume of NaNs with a (singular) all-ones affine.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _handler(model: str) -> type[BaseHTTPRequestHandler]:
    class NanModel(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            outputs = [{"name": "volume", "datatype": "FP32", "shape": [-1, 1, 4, 4, 4]}]
            self._send(200, {"name": model, "inputs": [], "outputs": outputs})

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length", 0)))
            volume = [float("nan")] * 64
            self._send(
                200,
                {
                    "outputs": [
                        {
                            "name": "volume",
                            "shape": [1, 1, 4, 4, 4],
                            "datatype": "FP32",
                            "data": volume,
                        },
                        {"name": "affine", "shape": [4, 4], "datatype": "FP32", "data": [1.0] * 16},
                    ]
                },
            )

        def log_message(self, *args: object) -> None:
            pass

    return NanModel


@contextmanager
def nan_model_server(model: str) -> Iterator[str]:
    """Serve ``model`` wrongly on a free 127.0.0.1 port; yield ``http://127.0.0.1:PORT``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(model))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
