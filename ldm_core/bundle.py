"""The model bundle: everything needed to generate images, in one directory.

Layout (also what an InferenceService's ``storageUri`` points at)::

    bundle.json       format version, scale factor, latent/image shape, the training
                      latents' per-channel range (in the space the UNet samples in),
                      spacing, affine, dataset hash, training steps, objective, package
                      versions; for a UNet trained on standardised latents their
                      per-channel ``latent_moments`` (format 2; other bundles are format 1);
                      and (when built with the training data) ``reference``: the training
                      volumes' mean output measures, for the served-output drift alert
    config.yaml       the full run config
    autoencoder.pt    AutoencoderKL state dict
    unet.pt           DiffusionModelUNet state dict (EMA weights)
    latent_prior.pt   the training latents' Gaussian (``ldm_core.latent_prior``: per-voxel
                      mean, principal components, residual variance), where
                      ``sampling.truncate_at`` starts; absent in bundles built before it
    lineage.json      what the bundle was made from (``ldm_core.lineage``); left out of the
                      bundle's digest, which it records

``load(path)`` is the one call serving and evaluation make. ``build_bundle`` packs the
outputs of the two training stages; it checks that they belong together (same
autoencoder architecture, geometry present) so a mismatched pair fails here, not as a
shape error inside a request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from ldm_core import latent_prior as prior_mod
from ldm_core import lineage as lineage_mod
from ldm_core import measures
from ldm_core.config import Config, ConfigError, check_trained_range, from_dict, load_config
from ldm_core.data.preprocessed import VolumeDataset
from ldm_core.errors import LdmError
from ldm_core.io import (
    AUTOENCODER_PT,
    BUNDLE_JSON,
    CONFIG_YAML,
    GEOMETRY_JSON,
    LATENT_PRIOR_PT,
    LINEAGE_JSON,
    UNET_PT,
    atomic_write,
    atomic_write_text,
    fsync_dir,
)
from ldm_core.models import build_autoencoder, build_unet, load_weights

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""The format of a bundle whose UNet samples the scaled latents as they are."""
STANDARDISED_FORMAT_VERSION = 2
"""The format of a bundle whose UNet samples per-channel standardised latents
(``latent_moments``). Readers older than the moments reject it by its number, rather than
decode its latents without mapping them back; bundles without moments stay at 1, so those
readers keep loading them."""
READABLE_FORMATS = (FORMAT_VERSION, STANDARDISED_FORMAT_VERSION)


@dataclass
class Bundle:
    """A loaded bundle, models in eval mode on ``device``."""

    config: Config
    autoencoder: AutoencoderKL
    unet: DiffusionModelUNet
    scale_factor: float
    affine: np.ndarray
    image_shape: tuple[int, int, int]
    latent_shape: tuple[int, int, int, int]
    spacing: tuple[float, float, float]
    device: torch.device
    meta: dict[str, Any] = field(default_factory=dict)
    latent_range: tuple[torch.Tensor, torch.Tensor] | None = None
    """Per-channel low and high of the training latents as the UNet saw them, each
    ``[1, C, 1, 1, 1]`` on ``device``; None for a bundle built before the range was recorded."""
    latent_moments: tuple[torch.Tensor, torch.Tensor] | None = None
    """Per-channel mean and std that the UNet's latents were standardised with
    (``train.diffusion.standardise_channels``), each ``[1, C, 1, 1, 1]`` on ``device``; None
    when it trained on the scaled latents as they are."""
    latent_prior: dict[str, torch.Tensor] | None = None
    """The training latents' Gaussian (:mod:`ldm_core.latent_prior`), on the CPU, in the
    space the UNet samples in; None for a bundle built before it was recorded."""


def _package_versions() -> dict[str, str]:
    out = {}
    for name in ("brain-ldm", "torch", "monai", "nibabel"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LdmError(f"{path}: not found") from None
    except Exception as e:  # truncated or foreign files raise many types
        raise LdmError(
            f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(obj, dict):
        raise LdmError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LdmError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise LdmError(f"{path}: not valid JSON ({e})") from None


def save(
    path: str | Path,
    cfg: Config,
    autoencoder_state: dict[str, torch.Tensor],
    unet_state: dict[str, torch.Tensor],
    scale_factor: float,
    affine: np.ndarray,
    spacing: tuple[float, float, float] | None = None,
    dataset_hash: str = "",
    training_steps: dict[str, int] | None = None,
    reference: Mapping[str, float] | None = None,
    latent_range: Sequence[Sequence[float]] | None = None,
    checkpoints: Mapping[str, Mapping[str, Any]] | None = None,
    latent_moments: Sequence[Sequence[float]] | None = None,
    latent_prior: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a bundle directory atomically: built in a sibling temp dir, then renamed.

    Each file is written durably (:mod:`ldm_core.io`), and the parent directory is fsynced
    after the rename, so a bundle that a reader sees is whole, and stays whole after a crash.
    ``lineage.json`` is written last, with the digest of the files before it; ``checkpoints``
    (``autoencoder`` / ``diffusion`` -> :func:`ldm_core.lineage.checkpoint`) name the training
    files the weights came from, else the record keeps only their ``training_steps``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise LdmError(f"bundle affine must be 4x4, got {affine.shape}")
    if not np.isfinite(scale_factor) or scale_factor <= 0:
        raise LdmError(f"bundle scale factor must be a positive number, got {scale_factor}")
    info = {
        "format_version": FORMAT_VERSION if latent_moments is None else STANDARDISED_FORMAT_VERSION,
        "scale_factor": float(scale_factor),
        "image_shape": list(cfg.data.shape),
        "latent_shape": list(cfg.latent_shape),
        "spacing": list(spacing or cfg.data.spacing),
        "affine": affine.tolist(),
        "objective": cfg.model.scheduler.objective,
        "dataset_hash": dataset_hash,
        "training_steps": training_steps or {},
        "package_versions": _package_versions(),
    }
    if reference is not None:
        info["reference"] = {k: float(v) for k, v in reference.items()}
    if latent_range is not None:
        info["latent_range"] = _checked_range(latent_range, cfg, "latent_range")
    if latent_moments is not None:
        info["latent_moments"] = _checked_moments(latent_moments, cfg, "latent_moments")
    if latent_prior is not None:
        latent_prior = prior_mod.checked(latent_prior, cfg.latent_shape, "latent_prior")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        atomic_write(tmp / AUTOENCODER_PT, lambda f: torch.save(autoencoder_state, f))
        atomic_write(tmp / UNET_PT, lambda f: torch.save(unet_state, f))
        if latent_prior is not None:
            atomic_write(tmp / LATENT_PRIOR_PT, lambda f: torch.save(latent_prior, f))
        atomic_write_text(tmp / CONFIG_YAML, cfg.to_yaml())
        # No trailing newline, as before: deploy names a bundle's upload by its files' hash.
        atomic_write_text(tmp / BUNDLE_JSON, json.dumps(info, indent=2))
        steps = {name: {"steps": int(n)} for name, n in info["training_steps"].items()}
        record = lineage_mod.for_bundle(
            cfg,
            bundle_digest=digest(tmp),
            dataset_hash=dataset_hash,
            checkpoints=checkpoints or steps,
            package_versions=info["package_versions"],
        )
        lineage_mod.write(tmp / LINEAGE_JSON, record)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    log.info("wrote model bundle %s", path)
    return path


def build_bundle(
    autoencoder_dir: str | Path,
    diffusion_dir: str | Path,
    output_dir: str | Path,
    data_dir: str | Path | None = None,
) -> Path:
    """Pack finished training runs into a bundle (the ``ldm bundle`` verb).

    With ``data_dir`` (the preprocessed cache the models were trained on), ``bundle.json``
    also gets the training reference of the served-output monitor (:func:`training_reference`).
    """
    ae_dir, diff_dir = Path(autoencoder_dir), Path(diffusion_dir)
    ae = _torch_load(ae_dir / AUTOENCODER_PT)
    unet = _torch_load(diff_dir / UNET_PT)
    for name, ckpt, src in (
        ("autoencoder", ae, ae_dir / AUTOENCODER_PT),
        ("unet", unet, diff_dir / UNET_PT),
    ):
        for key in ("state_dict", "config"):
            if key not in ckpt:
                raise LdmError(f"{src}: missing {key!r}; is this a finished {name} run?")
    if "scale_factor" not in ae:
        raise LdmError(f"{ae_dir / AUTOENCODER_PT}: missing 'scale_factor'")
    cfg = _config_from(unet["config"], diff_dir / UNET_PT)
    ae_cfg = _config_from(ae["config"], ae_dir / AUTOENCODER_PT)
    if ae_cfg.model.autoencoder != cfg.model.autoencoder:
        raise LdmError(
            f"{diff_dir} was trained on latents of a different autoencoder architecture than "
            f"{ae_dir} (model.autoencoder differs); retrain the diffusion stage"
        )
    for key, check in (("latent_range", _checked_range), ("latent_moments", _checked_moments)):
        if unet.get(key) is not None:  # checked here too, so that an error names the file
            check(unet[key], cfg, f"{diff_dir / UNET_PT}: {key}")
    if unet.get("latent_prior") is not None:
        prior_mod.checked(
            unet["latent_prior"], cfg.latent_shape, f"{diff_dir / UNET_PT}: latent_prior"
        )
    geometry = _read_json(diff_dir / GEOMETRY_JSON)
    reference = None
    if data_dir is not None:
        reference = training_reference(data_dir, geometry.get("dataset_hash", ""))
    return save(
        output_dir,
        cfg,
        ae["state_dict"],
        unet["state_dict"],
        scale_factor=float(ae["scale_factor"]),
        affine=np.asarray(geometry["affine"]),
        spacing=tuple(geometry.get("spacing", cfg.data.spacing)),
        dataset_hash=geometry.get("dataset_hash", ""),
        training_steps={
            "autoencoder": int(ae.get("steps", 0)),
            "diffusion": int(unet.get("steps", 0)),
        },
        reference=reference,
        latent_range=unet.get("latent_range"),
        latent_moments=unet.get("latent_moments"),
        latent_prior=unet.get("latent_prior"),
        checkpoints={
            "autoencoder": lineage_mod.checkpoint(ae_dir / AUTOENCODER_PT, ae.get("steps", 0)),
            "diffusion": lineage_mod.checkpoint(diff_dir / UNET_PT, unet.get("steps", 0)),
        },
    )


def _per_channel_pair(value: Any, cfg: Config, where: str, names: str) -> list[list[float]]:
    """``value`` as two lists of one finite float per latent channel (``names``: what the
    two lists are, for the message)."""
    channels = cfg.model.autoencoder.latent_channels
    try:
        first, second = ([float(x) for x in row] for row in value)
    except (TypeError, ValueError):
        raise LdmError(f"{where}: expected [{names}] lists of numbers, got {value!r}") from None
    if len(first) != channels or len(second) != channels:
        raise LdmError(
            f"{where}: expected {channels} values in each of [{names}] "
            f"(model.autoencoder.latent_channels), got {len(first)} and {len(second)}"
        )
    if not all(np.isfinite(first + second)):
        raise LdmError(f"{where}: values must be finite, got {[first, second]}")
    return [first, second]


def _checked_range(value: Any, cfg: Config, where: str) -> list[list[float]]:
    """``value`` as ``[low, high]`` lists of one finite float per latent channel, low <= high."""
    low, high = _per_channel_pair(value, cfg, where, "low, high")
    if any(lo > hi for lo, hi in zip(low, high, strict=True)):
        raise LdmError(f"{where}: bounds must have low <= high, got {[low, high]}")
    return [low, high]


def _checked_moments(value: Any, cfg: Config, where: str) -> list[list[float]]:
    """``value`` as ``[mean, std]`` lists of one finite float per latent channel, std > 0."""
    mean, std = _per_channel_pair(value, cfg, where, "mean, std")
    if min(std) <= 0:
        raise LdmError(f"{where}: every std must be positive, got {std}")
    return [mean, std]


def _per_channel_tensors(pair: list[list[float]], dev: torch.device) -> tuple[torch.Tensor, ...]:
    """Two per-channel lists as ``[1, C, 1, 1, 1]`` tensors on ``dev``."""
    return tuple(torch.tensor(v, device=dev).view(1, -1, 1, 1, 1) for v in pair)


def training_reference(data_dir: str | Path, dataset_hash: str = "") -> dict[str, float]:
    """Mean :func:`ldm_core.measures.summarise` over the training volumes of the cache at
    ``data_dir``: the values the served-output drift alert compares generated volumes with.

    Raises:
        LdmError: the cache has no training subjects, or its ``dataset_hash`` is not
            ``dataset_hash`` (the data the models were trained on), when one is given.
    """
    dataset = VolumeDataset(data_dir, "train")
    found = str(dataset.manifest.get("dataset_hash", ""))
    if dataset_hash and found != dataset_hash:
        raise LdmError(
            f"{Path(data_dir)}: dataset_hash {found!r} is not the {dataset_hash!r} the models "
            "were trained on (data_geometry.json); pass the training cache"
        )
    return measures.reference(dataset[i].numpy() for i in range(len(dataset)))


def require(bundle_dir: str | Path) -> Path:
    """``bundle_dir`` as a Path, or an LdmError naming it if it holds no bundle: checked
    before a server opens its port or a sampler loads weights, so a wrong path is one clear
    line."""
    path = Path(bundle_dir)
    if not path.is_dir():
        raise LdmError(f"{path}: bundle directory not found")
    if not (path / BUNDLE_JSON).is_file():
        raise LdmError(f"{path}: not a model bundle (no {BUNDLE_JSON})")
    return path


def config_for(
    bundle_dir: str | Path,
    config: str | Path | None = None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """The config to sample or serve a bundle with: ``config`` if given, else the bundle's
    own ``config.yaml`` (a KServe ServingRuntime passes only the bundle, and the bundle's
    config knows its training objective and so its default sampler), refined by ``preset``
    and dotted ``overrides``."""
    path = require(bundle_dir)
    try:
        return load_config(config or path / CONFIG_YAML, preset=preset, overrides=list(overrides))
    except ConfigError as e:
        if config or str(e).startswith(str(path)):
            raise
        raise ConfigError(f"{path / CONFIG_YAML}: {e}") from None


def digest(bundle_dir: str | Path) -> str:
    """sha256 over the bundle's files (names and contents): the bundle's identity. The same
    bundle always gets the same storage prefix on deploy (and a different one a new
    revision), and a server can say which bundle it answers from. ``lineage.json`` is left
    out: it records this digest, and what a bundle is does not change with its history."""
    root = Path(bundle_dir)
    h = hashlib.sha256()
    files = (
        p for p in root.rglob("*") if p.is_file() and p.relative_to(root) != Path(LINEAGE_JSON)
    )
    for path in sorted(files):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def lineage(bundle_dir: str | Path) -> dict[str, Any]:
    """The bundle's lineage record (:mod:`ldm_core.lineage`), for the files it has now.

    A bundle built before records were kept gets one from ``bundle.json`` and
    ``config.yaml`` (dataset hash, config digest, training steps; no checkpoint hashes). A
    bundle whose files changed after it was built (a hand-edited ``config.yaml``, say) keeps
    its record, under its new digest and with the old one as ``bundle.built_as``: what it was
    made from may no longer be all of what it is, and the record says so.

    Raises:
        LdmError: not a bundle, or an unreadable record.
    """
    path = require(bundle_dir)
    actual = digest(path)
    if (path / LINEAGE_JSON).is_file():
        record = lineage_mod.read(path / LINEAGE_JSON)
        recorded = record["bundle"].get("digest")
        if recorded != actual:
            log.warning(
                "%s: records bundle digest %s, but the files hash to %s: the bundle changed "
                "after it was built",
                path / LINEAGE_JSON,
                recorded,
                actual,
            )
            record["bundle"] = {**record["bundle"], "digest": actual, "built_as": recorded}
        return record
    info = _read_json(path / BUNDLE_JSON)
    steps = info.get("training_steps") or {}
    return lineage_mod.for_bundle(
        config_for(path),
        bundle_digest=actual,
        dataset_hash=str(info.get("dataset_hash", "")),
        checkpoints={name: {"steps": int(n)} for name, n in steps.items()},
        package_versions=info.get("package_versions") or {},
    )


def _config_from(data: dict[str, Any], source: Path) -> Config:
    try:
        return from_dict(data)
    except ConfigError as e:
        raise LdmError(f"{source}: stored config is invalid: {e}") from None


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load(path: str | Path, device: str | torch.device = "auto") -> Bundle:
    """Load a bundle directory into models ready to sample (eval mode, no grad needed)."""
    path = Path(path)
    if not path.is_dir():
        raise LdmError(f"{path}: bundle directory not found")
    info = _read_json(path / BUNDLE_JSON)
    version = info.get("format_version")
    if version not in READABLE_FORMATS:
        raise LdmError(
            f"{path / BUNDLE_JSON}: format_version {version!r}, this version reads "
            f"{' and '.join(map(str, READABLE_FORMATS))}"
        )
    if ("latent_moments" in info) != (version == STANDARDISED_FORMAT_VERSION):
        raise LdmError(
            f"{path / BUNDLE_JSON}: format_version {version} "
            f"{'with' if 'latent_moments' in info else 'without'} latent_moments; a bundle "
            f"has them if and only if it is format {STANDARDISED_FORMAT_VERSION}"
        )
    try:
        cfg = from_dict(yaml.safe_load((path / CONFIG_YAML).read_text()))
        check_trained_range(cfg)
    except FileNotFoundError:
        raise LdmError(f"{path / CONFIG_YAML}: not found") from None
    except (ConfigError, yaml.YAMLError) as e:
        raise LdmError(f"{path / CONFIG_YAML}: {e}") from None
    dev = resolve_device(device) if isinstance(device, str) else device
    autoencoder = build_autoencoder(cfg, use_checkpoint=False)
    load_weights(autoencoder, _torch_load(path / AUTOENCODER_PT), str(path / AUTOENCODER_PT))
    unet = build_unet(cfg)
    load_weights(unet, _torch_load(path / UNET_PT), str(path / UNET_PT))
    autoencoder.to(dev).eval().requires_grad_(False)
    unet.to(dev).eval().requires_grad_(False)
    latent_range = None
    if "latent_range" in info:
        bounds = _checked_range(info["latent_range"], cfg, f"{path / BUNDLE_JSON}: latent_range")
        latent_range = _per_channel_tensors(bounds, dev)
    elif cfg.sampling.clamp_to_latent_range:
        log.warning(
            "%s has no latent_range (built before it was recorded): sampling.clamp_to_latent_range "
            "is ignored, samples are drawn unclamped",
            path / BUNDLE_JSON,
        )
    latent_moments = None
    if "latent_moments" in info:
        moments = _checked_moments(
            info["latent_moments"], cfg, f"{path / BUNDLE_JSON}: latent_moments"
        )
        latent_moments = _per_channel_tensors(moments, dev)
    prior = None
    if (path / LATENT_PRIOR_PT).exists():
        where = str(path / LATENT_PRIOR_PT)
        prior = prior_mod.checked(_torch_load(path / LATENT_PRIOR_PT), cfg.latent_shape, where)
    elif cfg.sampling.truncate_at:
        raise LdmError(
            f"{path / CONFIG_YAML}: sampling.truncate_at is {cfg.sampling.truncate_at} but the "
            f"bundle has no {LATENT_PRIOR_PT} to start from (built before it was recorded); "
            "set sampling.truncate_at: 0"
        )
    return Bundle(
        config=cfg,
        autoencoder=autoencoder,
        unet=unet,
        scale_factor=float(info["scale_factor"]),
        affine=np.asarray(info["affine"], dtype=np.float64),
        image_shape=tuple(info["image_shape"]),
        latent_shape=tuple(info["latent_shape"]),
        spacing=tuple(info["spacing"]),
        device=dev,
        meta=info,
        latent_range=latent_range,
        latent_moments=latent_moments,
        latent_prior=prior,
    )
