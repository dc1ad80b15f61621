"""KServe predictor for a model bundle: Open Inference Protocol (V2) and V1 over HTTP.

One ``kserve.Model`` answers ``POST /v2/models/{name}/infer`` and ``/v1/models/{name}:predict``
(the request and response formats are in :mod:`ldm_core.serve.protocol`). The package is
split the way KServe splits the work:

- :mod:`~ldm_core.serve.protocol`: request parsing (V2, V1) and response encoding
  (volume, affine, NIfTI, PNG; the binary data extension). Pure functions, no server.
- :mod:`~ldm_core.serve.admission`: concurrency, queue and per-request deadline (503, 504).
- :mod:`~ldm_core.serve.model`: the ``kserve.Model`` subclass (load, preprocess, predict,
  postprocess).
- :mod:`~ldm_core.serve.dataplane`: KServe's data plane with health Kubernetes can act on
  (readiness after warm-up, liveness that fails once the loaded model is gone) and truthful
  metadata.
- :mod:`~ldm_core.serve.versions`: the model's version (its bundle's digest) on every route.
- :mod:`~ldm_core.serve.rest`, :mod:`~ldm_core.serve.grpc_service`: KServe's REST
  application and gRPC servicer with ``{"error": ...}`` bodies and status codes that agree,
  and the model repository extension only where ``serving.repository_endpoints`` asks.
- :mod:`~ldm_core.serve.server`: the process: listening sockets, the load in the
  background, both transports in one event loop; :mod:`~ldm_core.serve.shutdown`: the
  drain on SIGTERM (not ready, new requests refused, admitted ones finished, then exit).
- :mod:`~ldm_core.serve.logs`, :mod:`~ldm_core.serve.metrics`: JSON log lines and the
  Prometheus metrics on ``/metrics``; :mod:`~ldm_core.serve.monitoring`: what the generated
  volumes look like, beside the bundle's training reference.

``ldm serve`` (``ldm_core.cli``) is the command line; ``python -m ldm_core.serve`` is an
alias for it. This module imports no kserve: importing ``kserve`` parses the process
command line (see ``ldm_core.cli.cmd_serve``), so nothing may import it before the CLI
has read its own arguments.
"""

from __future__ import annotations

DEFAULT_BUNDLE_DIR = "/mnt/models"
"""Where KServe's storage initializer puts the contents of ``storageUri``."""
