"""The latent cache: the training set encoded once by the frozen autoencoder.

The MONAI tutorial encodes every batch on the fly, so each diffusion step pays for an
encoder forward pass that always gives the same answer (the posterior mean is
deterministic). Encoding once turns the diffusion stage into training on a small in-memory
tensor; ``benchmarks/bench_latent_cache.py`` measures the gain.

Layout (inside the diffusion run directory)::

    latents/train.npy, latents/val.npy   float32 [N, C, d, h, w], already times the scale factor
    latents/cache.json                   key + provenance; written last, so it marks a complete cache

The key hashes the autoencoder file's bytes, the dataset hash of the preprocessed cache
and the data config: a retrained autoencoder or re-preprocessed data rebuilds the cache,
anything else reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ldm_core import io
from ldm_core.config import Config
from ldm_core.data.preprocessed import VolumeDataset, subjects

log = logging.getLogger(__name__)

LATENT_DIR = "latents"
INDEX_NAME = "cache.json"
FORMAT_VERSION = 1


def cache_key(autoencoder_sha256: str, manifest: dict[str, Any], cfg: Config) -> str:
    """Identity of the latents: autoencoder bytes, data content and data config.

    ``data.num_workers`` only changes how fast volumes load, so it is left out.
    """
    data_cfg = {k: v for k, v in cfg.to_dict()["data"].items() if k != "num_workers"}
    payload = {
        "format": FORMAT_VERSION,
        "autoencoder_sha256": autoencoder_sha256,
        "dataset_hash": manifest["dataset_hash"],
        "data": data_cfg,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_index(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / INDEX_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_current(root: Path, key: str) -> bool:
    """True when ``root`` holds a complete cache for ``key``."""
    index = read_index(root)
    if index is None or index.get("key") != key:
        return False
    return all((root / f"{split}.npy").is_file() for split in index.get("splits", {}))


@torch.no_grad()
def encode_split(
    ae: nn.Module,
    data_dir: Path,
    split: str,
    scale_factor: float,
    device: torch.device,
    batch_size: int,
) -> np.ndarray:
    """Posterior means of one split, times the scale factor, as float32 [N, C, d, h, w]."""
    dataset = VolumeDataset(data_dir, split)
    ae.eval()
    out = []
    bar = tqdm(total=len(dataset), desc=f"encoding {split}", unit="vol", mininterval=1.0)
    for start in range(0, len(dataset), batch_size):
        x = torch.stack([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        z_mu, _ = ae.encode(x.to(device))
        out.append((z_mu.float() * scale_factor).cpu().numpy())
        bar.update(x.shape[0])
    bar.close()
    return np.concatenate(out).astype(np.float32, copy=False)


def _write_npy(path: Path, array: np.ndarray) -> None:
    io.atomic_write(path, lambda f: np.save(f, array))


def build(
    root: Path,
    key: str,
    ae: nn.Module,
    data_dir: Path,
    manifest: dict[str, Any],
    scale_factor: float,
    device: torch.device,
    batch_size: int,
    provenance: dict[str, Any],
) -> None:
    """Encode every split with subjects and write the cache (index last), after removing
    what an interrupted build's writes left in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    io.sweep_temporaries(root)
    (root / INDEX_NAME).unlink(missing_ok=True)
    splits = {}
    for split in ("train", "val"):
        stale = root / f"{split}.npy"
        if not subjects(manifest, split):
            stale.unlink(missing_ok=True)
            continue
        array = encode_split(ae, data_dir, split, scale_factor, device, batch_size)
        _write_npy(stale, array)
        splits[split] = list(array.shape)
    index = {
        "format": FORMAT_VERSION,
        "key": key,
        "splits": splits,
        "scale_factor": scale_factor,
        **provenance,
    }
    io.atomic_write_json(root / INDEX_NAME, index)
    log.info("latent cache written to %s: %s", root, splits)


def load(root: Path) -> dict[str, torch.Tensor]:
    """The cached latents by split."""
    index = read_index(root)
    assert index is not None, f"{root}: no latent cache"
    return {split: torch.from_numpy(np.load(root / f"{split}.npy")) for split in index["splits"]}
