"""Cross-field checks of a resolved config; each raises :class:`ConfigError` naming the
first field at fault and, where one exists, the value that would work."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from ldm_core.config.cluster import QUANTITY, StageResources, TrainingResources
from ldm_core.config.errors import ConfigError, suggest
from ldm_core.config.sections import LR_DECAYS, Config
from ldm_core.samplers import ALL_SAMPLERS, OBJECTIVES, incompatibility

_CHOICES: dict[str, tuple[str, ...]] = {
    "train.amp": ("none", "bf16", "fp16"),
    "train.ddp_backend": ("auto", "nccl", "gloo"),
    "sampling.sampler": ALL_SAMPLERS,
    "sampling.precision": ("auto", "fp32", "bf16"),
    "model.scheduler.objective": OBJECTIVES,
    "model.scheduler.prediction_type": ("epsilon", "v_prediction", "sample"),
    "model.scheduler.schedule": ("linear_beta", "scaled_linear_beta", "sigmoid_beta"),
    "train.autoencoder.lr_decay": LR_DECAYS,
    "train.diffusion.lr_decay": LR_DECAYS,
}

_POSITIVE = (
    "train.autoencoder.steps",
    "train.autoencoder.batch_size",
    "train.diffusion.steps",
    "train.diffusion.batch_size",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_nonfinite",
    "train.log_every",
    "train.val_every",
    "train.ddp_timeout_s",
    "train.nproc",
    "train.nnodes",
    "sampling.steps",
    "sampling.num_samples",
    "serving.max_samples",
    "serving.max_steps",
    "serving.max_concurrency",
    "serving.max_batch_size",
    "evaluation.num_samples",
    "evaluation.steps",
    "model.scheduler.num_train_timesteps",
    "storage.part_size_mb",
    "train.autoencoder.lr",
    "train.diffusion.lr",
    "train.autoencoder.disc_lr",
)


def validate(cfg: Config) -> None:
    """Check cross-field rules; raise ConfigError naming the first bad field.

    The checks run in an order where each may rely on the ones before it (the networks'
    channel lists are sound before the data shape is checked against their depth).
    """
    _check_choices(cfg)
    _check_networks(cfg)
    _check_data(cfg)
    _check_numbers(cfg)
    _check_sampling(cfg)
    _check_serving(cfg)
    _check_capacity(cfg)
    _check_cluster(cfg)
    _check_registry(cfg)


def _check_choices(cfg: Config) -> None:
    for dotted, choices in _CHOICES.items():
        value = _get_dotted(cfg, dotted)
        if value not in choices:
            raise ConfigError(
                f"{dotted}: {value!r} is not one of {', '.join(choices)}{suggest(value, choices)}"
            )
    device = cfg.train.device
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"train.device: {device!r} must be auto, cpu, cuda or cuda:N")


def _check_networks(cfg: Config) -> None:
    """Channel lists that GroupNorm and multi-head attention can split."""
    ae, unet = cfg.model.autoencoder, cfg.model.unet
    for name, arch in (("model.autoencoder", ae), ("model.unet", unet)):
        if not arch.channels:
            raise ConfigError(f"{name}.channels: must not be empty")
        for i, ch in enumerate(arch.channels):
            if ch <= 0:
                raise ConfigError(f"{name}.channels[{i}]: must be positive, got {ch}")
            if ch % arch.norm_num_groups:
                raise ConfigError(
                    f"{name}.channels[{i}]: {ch} channels are not divisible by "
                    f"{name}.norm_num_groups={arch.norm_num_groups} (GroupNorm needs that)"
                )
        if len(arch.attention_levels) != len(arch.channels):
            raise ConfigError(
                f"{name}.attention_levels: has {len(arch.attention_levels)} entries but "
                f"{name}.channels has {len(arch.channels)}; give one per level"
            )
    if unet.num_head_channels <= 0:
        raise ConfigError("model.unet.num_head_channels: must be positive")
    for i, (ch, att) in enumerate(zip(unet.channels, unet.attention_levels)):
        if att and ch % unet.num_head_channels:
            raise ConfigError(
                f"model.unet.num_head_channels: {unet.num_head_channels} does not divide "
                f"model.unet.channels[{i}]={ch} at an attention level"
            )


def _check_data(cfg: Config) -> None:
    # The image is downsampled by the autoencoder, then the latent by the UNet: each
    # spatial size must survive both without remainder.
    ae, unet = cfg.model.autoencoder, cfg.model.unet
    need = ae.downsample_factor * unet.downsample_factor
    for axis, size in zip("DHW", cfg.data.shape):
        if size <= 0 or size % need:
            raise ConfigError(
                f"data.shape: {axis}={size} is not divisible by {need} "
                f"(autoencoder downsamples by {ae.downsample_factor} with "
                f"{len(ae.channels)} levels, then the UNet by {unet.downsample_factor} with "
                f"{len(unet.channels)} levels); try {_round_to(size, need)}"
            )
    for i, s in enumerate(cfg.data.spacing):
        if s <= 0:
            raise ConfigError(f"data.spacing[{i}]: must be positive, got {s}")
    lo, hi = cfg.data.intensity_percentiles
    if not 0 <= lo < hi <= 100:
        raise ConfigError(
            f"data.intensity_percentiles: need 0 <= low < high <= 100, got {lo}, {hi}"
        )
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {cfg.data.val_fraction}")


def _check_numbers(cfg: Config) -> None:
    for dotted in _POSITIVE:
        if _get_dotted(cfg, dotted) <= 0:
            raise ConfigError(f"{dotted}: must be positive, got {_get_dotted(cfg, dotted)}")
    for stage in ("autoencoder", "diffusion"):
        warmup = getattr(cfg.train, stage).lr_warmup_steps
        if warmup < 0:
            raise ConfigError(f"train.{stage}.lr_warmup_steps: must be >= 0, got {warmup}")
    gamma = cfg.train.diffusion.snr_gamma
    if gamma < 0:
        raise ConfigError(f"train.diffusion.snr_gamma: must be >= 0 (0 = off), got {gamma}")
    if gamma > 0 and cfg.model.scheduler.objective != "ddpm":
        raise ConfigError(
            "train.diffusion.snr_gamma: min-SNR weighting needs the ddpm objective "
            f"(model.scheduler.objective is {cfg.model.scheduler.objective!r}); set it to 0"
        )
    if not 0 <= cfg.train.diffusion.ema_decay < 1:
        raise ConfigError(
            f"train.diffusion.ema_decay: must be in [0, 1), got {cfg.train.diffusion.ema_decay}"
        )


def _check_sampling(cfg: Config) -> None:
    """The sampler fits the training objective (the table in ldm_core.samplers decides)."""
    reason = incompatibility(cfg.model.scheduler.objective, cfg.sampling.sampler)
    if reason is not None:
        raise ConfigError(f"sampling.sampler: {reason}")
    # Every sampler refuses more steps than the model was trained with.
    total_t = cfg.model.scheduler.num_train_timesteps
    if cfg.sampling.steps > total_t:
        raise ConfigError(
            f"sampling.steps: {cfg.sampling.steps} exceeds "
            f"model.scheduler.num_train_timesteps={total_t}"
        )


def _check_serving(cfg: Config) -> None:
    if not 1 <= cfg.serving.http_port <= 65535:
        raise ConfigError(f"serving.http_port: {cfg.serving.http_port} is not a TCP port")
    if not 0 <= cfg.serving.grpc_port <= 65535:
        raise ConfigError(
            f"serving.grpc_port: {cfg.serving.grpc_port} is not a TCP port (0 = no gRPC server)"
        )
    if cfg.serving.grpc_port == cfg.serving.http_port:
        raise ConfigError(
            f"serving.grpc_port: {cfg.serving.grpc_port} is serving.http_port too; "
            "pick another port, or 0 for no gRPC server"
        )
    if cfg.serving.max_queue < 0:
        raise ConfigError(f"serving.max_queue: must be >= 0, got {cfg.serving.max_queue}")
    if cfg.serving.max_batch_wait_ms < 0:
        raise ConfigError(
            f"serving.max_batch_wait_ms: must be >= 0, got {cfg.serving.max_batch_wait_ms}"
        )


# --------------------------------------------------------------------------- cluster checks

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
STAGES = ("train_autoencoder", "train_diffusion", "evaluate", "predictor")
"""The stages ``cluster`` sizes, each a :class:`StageResources`."""
ONE_DEVICE_STAGES = ("train_autoencoder", "train_diffusion", "evaluate")
"""Stages whose process drives one device: more GPUs per training pod come from ``nproc``."""
_MODES = ("Serverless", "RawDeployment")
_KNATIVE_METRICS = ("concurrency", "rps")
_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")


def _check_quantity(where: str, value: str, example: str) -> None:
    if not QUANTITY.match(value):
        raise ConfigError(f"{where}: {value!r} is not a Kubernetes quantity (e.g. {example})")


def _check_capacity(cfg: Config) -> None:
    """The predictor's autoscaling as KServe can carry it out in the chosen mode."""
    s = cfg.serving
    if s.deployment_mode not in _MODES:
        raise ConfigError(
            f"serving.deployment_mode: {s.deployment_mode!r} is not one of {', '.join(_MODES)}"
            f"{suggest(s.deployment_mode, _MODES)}"
        )
    metrics = (*_KNATIVE_METRICS, "cpu", "memory")
    if s.scale_metric not in metrics:
        raise ConfigError(
            f"serving.scale_metric: {s.scale_metric!r} is not one of {', '.join(metrics)}"
        )
    raw = s.deployment_mode == "RawDeployment"
    # KServe docs, "Autoscaling with Kubernetes HPA": RawDeployment scales with an HPA on cpu
    # or memory and never down to zero; concurrency and rps need Knative's autoscaler.
    if raw and s.scale_metric in _KNATIVE_METRICS:
        raise ConfigError(
            f"serving.scale_metric: {s.scale_metric} needs Knative (deployment_mode "
            "Serverless); RawDeployment's HPA scales on cpu or memory"
        )
    if s.min_replicas < (1 if raw else 0):
        raise ConfigError(
            f"serving.min_replicas: {s.min_replicas} is not possible in {s.deployment_mode} mode "
            + (
                "(no scale to zero without Knative: use 1, or deployment_mode Serverless)"
                if raw
                else "(0 = scale to zero)"
            )
        )
    if s.max_replicas < max(1, s.min_replicas):
        raise ConfigError(
            f"serving.max_replicas: {s.max_replicas} is below max(1, serving.min_replicas="
            f"{s.min_replicas})"
        )
    if s.scale_target <= 0:
        raise ConfigError(f"serving.scale_target: must be positive, got {s.scale_target}")


def _check_cluster(cfg: Config) -> None:
    c = cfg.cluster
    for stage in STAGES:
        res: StageResources = getattr(c, stage)
        where = f"cluster.{stage}"
        if res.gpus < 0 or (stage in ONE_DEVICE_STAGES and res.gpus > 1):
            limit = "0 or 1" if stage in ONE_DEVICE_STAGES else ">= 0"
            more = (
                " (one per process; more GPUs per pod come from nproc)"
                if stage.startswith("train")
                else ""
            )
            raise ConfigError(f"{where}.gpus: {res.gpus} must be {limit}{more}")
        _check_quantity(f"{where}.cpu", res.cpu, "2 or 500m")
        _check_quantity(f"{where}.memory", res.memory, "16Gi")
        if isinstance(res, TrainingResources):
            _check_quantity(f"{where}.shm", res.shm, "2Gi")
    for stage in ONE_DEVICE_STAGES:  # evaluate samples on train.device too
        if cfg.train.device.startswith("cuda") and getattr(c, stage).gpus == 0:
            raise ConfigError(
                f"cluster.{stage}.gpus: 0, but train.device is {cfg.train.device}: the pod "
                "would have no GPU; set it to 1, or train.device to cpu or auto"
            )
    if not c.image:
        raise ConfigError("cluster.image: must name the training image (images/training)")
    if not c.step_image:
        raise ConfigError(
            "cluster.step_image: must name the image of the light steps (images/training, "
            "CPU build); it may be cluster.image itself"
        )
    if c.namespace and not _DNS1123_LABEL.match(c.namespace):
        raise ConfigError(f"cluster.namespace: {c.namespace!r} is not a namespace name")
    names = {
        "pvc_name": c.pvc_name,
        "s3_secret": c.s3_secret,
        "priority_class": c.priority_class,
        "service_account": c.service_account,
        "serving_service_account": c.serving_service_account,
    }
    for key, value in names.items():
        if value and not _DNS1123_SUBDOMAIN.match(value):
            raise ConfigError(f"cluster.{key}: {value!r} is not a Kubernetes object name")
    if not c.workdir.startswith("/"):
        raise ConfigError(f"cluster.workdir: {c.workdir!r} must be an absolute path (a mount path)")
    if not c.pvc_name:
        raise ConfigError("cluster.pvc_name: the training steps and their pods share a PVC")
    for i, tol in enumerate(c.tolerations):
        where = f"cluster.tolerations[{i}]"
        if tol.operator not in ("Exists", "Equal"):
            raise ConfigError(f"{where}.operator: {tol.operator!r} is not Exists or Equal")
        if tol.operator == "Exists" and tol.value:
            raise ConfigError(f"{where}.value: must be empty with operator Exists")
        if tol.effect not in _EFFECTS:
            raise ConfigError(
                f"{where}.effect: {tol.effect!r} is not one of NoSchedule, PreferNoSchedule, "
                "NoExecute (or empty for all)"
            )
    for key in ("pending_timeout_s", "run_timeout_s"):
        if getattr(c, key) <= 0:
            raise ConfigError(f"cluster.{key}: must be positive, got {getattr(c, key)}")


def _round_to(size: int, multiple: int) -> int:
    return max(multiple, round(size / multiple) * multiple)


def _get_dotted(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# --------------------------------------------------------------------------- registry


def _check_registry(cfg: Config) -> None:
    """The Model Registry settings, when registration is on: a URL the client can reach
    (scheme, host and port; the client takes them apart), an author, and a CA only for TLS."""
    r = cfg.registry
    if not r.enabled:
        return
    example = "e.g. http://model-registry-service.kubeflow.svc.cluster.local:8080"
    if not r.url:
        raise ConfigError(f"registry.url: required when registry.enabled is true ({example})")
    parts = urlsplit(r.url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ConfigError(
            f"registry.url: {r.url!r} needs http:// or https://, a host and a port ({example})"
        )
    if parts.path.strip("/") or parts.query:
        raise ConfigError(
            f"registry.url: {r.url!r} has a path; give the server only, the client adds "
            "/api/model_registry/v1alpha3"
        )
    if not r.author.strip():
        raise ConfigError("registry.author: required when registry.enabled is true")
    if r.ca_file and parts.scheme != "https":
        raise ConfigError(f"registry.ca_file: set, but registry.url {r.url!r} is not https")
