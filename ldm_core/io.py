"""The one place for file integrity and durability, and for the names of the files we write.

Every stage of the pipeline may be killed at any moment (a preempted pod, a Ctrl-C, an
OOM kill), and every later stage trusts what it finds on disk. So a file is either whole
under its name or absent: it is written to a hidden temporary file in the same directory,
flushed and fsynced, renamed into place, and the directory is fsynced so the rename itself
survives a power loss. Writing that sequence once, here, keeps every writer's guarantee
the same. A writer killed mid-way (SIGKILL runs no cleanup) leaves its temporary file
behind; :func:`sweep_temporaries` removes those, and only those, when a run resumes.

The file names of a run directory and of a model bundle are contracts between stages
(and with users' scripts), so they are defined here once and imported everywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# --------------------------------------------------------------------------- file names

CONFIG_YAML = "config.yaml"
"""The resolved config saved next to every output (run directories and bundles)."""
BUNDLE_JSON = "bundle.json"
"""A model bundle's description: format version, scale factor, shapes, affine, provenance."""
AUTOENCODER_PT = "autoencoder.pt"
"""The finished autoencoder: state dict, scale factor, config, steps."""
UNET_PT = "unet.pt"
"""The finished diffusion UNet (EMA weights when EMA is on)."""
LATENT_PRIOR_PT = "latent_prior.pt"
"""A bundle's Gaussian of the training latents (``ldm_core.latent_prior``)."""
GEOMETRY_JSON = "data_geometry.json"
"""Shape, spacing and affine of the training data, copied into runs and bundles."""
CHECKPOINT_DIR = "checkpoints"
"""Resumable training state, ``ckpt-<step>.pt`` files."""
METRICS_JSONL = "metrics.jsonl"
"""Training curves, one JSON object per logged step."""
METRICS_JSON = "metrics.json"
"""Evaluation results."""
MANIFEST_JSON = "manifest.json"
"""The preprocessed cache's manifest: subjects, splits, hashes, geometry."""
STAGE_JSON = "stage.json"
"""What a finished pipeline stage recorded about its inputs (its reuse key)."""
DEPLOYMENT_JSON = "deployment.json"
"""The deploy stage's record: backend, endpoint URL, model name, smoke-test result."""
LINEAGE_JSON = "lineage.json"
"""What a bundle was made from and where it went (``ldm_core.lineage``): in a bundle, and in
an evaluation's output with the evaluation added."""

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TMP_SUFFIX = ".tmp"
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}" + re.escape(_TMP_SUFFIX) + "$")
"""What :func:`atomic_write` names a temporary file: ``.<target name>.<8 random>.tmp``, the
random part being ``tempfile.mkstemp``'s (8 of ``a-z``, ``0-9`` and ``_``)."""


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (volumes and weights are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- durable writes


def fsync_dir(path: str | Path) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temporary file, then move it to ``path`` whole or not at all.

    The temporary file lives in the target's directory (a rename across file systems is
    not atomic) under a hidden name that no reader globs for; it is removed if ``write``
    raises. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def is_temporary(path: str | Path) -> bool:
    """Whether ``path`` is named as one of :func:`atomic_write`'s temporary files.

    A reader that lists a directory (to upload it, say) skips them: each is a write still
    in progress or what a killed writer left behind, never content.
    """
    return _TEMPORARY.match(Path(path).name) is not None


def sweep_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporary files that interrupted :func:`atomic_write` calls left directly
    in ``directory``; return what was removed.

    A write killed between creating its temporary file and renaming it (SIGKILL, OOM, a
    preempted pod) leaves the file behind, and nothing else ever reads or removes it: on a
    volume that keeps a run across restarts, each one can be as large as a checkpoint. Call
    this when a run resumes in ``directory``, from the one process that writes there, so
    that no write is in progress. Only regular files named as :func:`is_temporary`
    describes are removed: no subdirectory, link or other file, and nothing below.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        if not is_temporary(path) or path.is_symlink() or not path.is_file():
            continue
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        log.info("removed %s (%d bytes), left by an interrupted write", path, size)
        removed.append(path)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically and durably."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """Write ``obj`` as JSON (``indent=2`` unless given) atomically and durably."""
    dumps.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **dumps) + "\n")
