"""KServe predictor for a model bundle: Open Inference Protocol (V2) and V1 over HTTP.

One ``kserve.Model`` answers ``POST /v2/models/{name}/infer`` and ``/v1/models/{name}:predict``
(the request and response formats are in :mod:`ldm_core.serve.protocol`). The package is
split the way KServe splits the work:

- :mod:`~ldm_core.serve.protocol`: request parsing (V2, V1) and response encoding
  (volume, affine, NIfTI, PNG; the binary data extension). Pure functions, no server.
- :mod:`~ldm_core.serve.admission`: concurrency, queue and per-request deadline (503, 504).
- :mod:`~ldm_core.serve.model`: the ``kserve.Model`` subclass (load, preprocess, predict,
  postprocess).
- :mod:`~ldm_core.serve.server`: the process: KServe's ModelServer and REST application
  under a uvicorn server it can stop, readiness, error handlers.
- :mod:`~ldm_core.serve.logs`, :mod:`~ldm_core.serve.metrics`: JSON log lines and the
  Prometheus metrics on ``/metrics``.

``ldm serve`` (``ldm_core.cli``) is the command line; ``python -m ldm_core.serve`` is an
alias for it. This module imports no kserve: importing ``kserve`` parses the process
command line (see ``ldm_core.cli.cmd_serve``), so nothing may import it before the CLI
has read its own arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ldm_core.config import Config, load_config
from ldm_core.errors import LdmError
from ldm_core.io import BUNDLE_JSON, CONFIG_YAML

DEFAULT_BUNDLE_DIR = "/mnt/models"
"""Where KServe's storage initializer puts the contents of ``storageUri``."""


def require_bundle(bundle_dir: str | Path) -> Path:
    """``bundle_dir`` as a Path, or an LdmError naming it if it holds no bundle: checked
    before the port opens, so a wrong path is one clear line rather than a server that
    starts and then fails to load."""
    path = Path(bundle_dir)
    if not (path / BUNDLE_JSON).is_file():
        raise LdmError(f"{path}: not a model bundle (no {BUNDLE_JSON})")
    return path


def serving_config(
    bundle_dir: str | Path,
    config: str | Path | None = None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """The config a server runs with: ``config`` if given, else the bundle's own
    ``config.yaml`` (what KServe's ServingRuntime relies on: it passes only the bundle),
    refined by ``preset`` and dotted ``overrides``."""
    path = require_bundle(bundle_dir)
    return load_config(config or path / CONFIG_YAML, preset=preset, overrides=list(overrides))
