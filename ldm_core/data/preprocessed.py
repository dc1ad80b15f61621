"""The preprocessed cache: the contract between ``ldm preprocess`` and everything after it.

Layout of a cache directory::

    manifest.json          format, data config, common affine/shape/spacing, one entry per subject
    volumes/<id>.npy       float16 array [1, D, H, W], intensities scaled to about [0, 1]

Each subject entry: ``id``, ``source`` (raw file), ``sha256`` (of the raw file),
``split`` (``train`` | ``val``), ``file`` (relative path of the volume, absent when
skipped), ``status`` (``ok`` | ``skipped``) and ``reason`` (why it was skipped).
``dataset_hash`` identifies the cache content (subject hashes + data config) so that later
stages can tell when their own caches are stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm_core.errors import LdmError
from ldm_core.io import MANIFEST_JSON, atomic_write_text

FORMAT_VERSION = 1


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """Load and sanity-check ``manifest.json``; errors name the file."""
    path = Path(cache_dir) / MANIFEST_JSON
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise LdmError(
            f"{path}: no manifest; is {cache_dir} the output of 'ldm preprocess'?"
        ) from None
    except json.JSONDecodeError as e:
        raise LdmError(f"{path}: not valid JSON ({e})") from None
    for key in ("format", "shape", "spacing", "affine", "subjects", "dataset_hash"):
        if key not in manifest:
            raise LdmError(f"{path}: missing key {key!r}")
    if manifest["format"] != FORMAT_VERSION:
        raise LdmError(
            f"{path}: cache format {manifest['format']} but this version reads {FORMAT_VERSION}; "
            "re-run 'ldm preprocess'"
        )
    return manifest


def write_manifest(cache_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically and durably (:func:`ldm_core.io.atomic_write`)."""
    return atomic_write_text(Path(cache_dir) / MANIFEST_JSON, json.dumps(manifest, indent=2))


def subjects(manifest: dict[str, Any], split: str | None = None) -> list[dict[str, Any]]:
    """Usable subjects (status ``ok``), optionally of one split, in manifest order."""
    out = [s for s in manifest["subjects"] if s.get("status", "ok") == "ok"]
    if split is not None:
        out = [s for s in out if s["split"] == split]
    return out


class VolumeDataset(Dataset):
    """Volumes of one split of a cache, as float32 tensors ``[1, D, H, W]``."""

    def __init__(self, cache_dir: str | Path, split: str | None = "train") -> None:
        self.root = Path(cache_dir)
        self.manifest = read_manifest(self.root)
        self.items = subjects(self.manifest, split)
        if not self.items:
            raise LdmError(f"{self.root / MANIFEST_JSON}: no usable subjects in split {split!r}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.root / self.items[index]["file"]
        array = np.load(path)
        return torch.from_numpy(array.astype(np.float32, copy=False))

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.manifest["affine"], dtype=np.float64)
