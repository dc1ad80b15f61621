"""Cross-field checks of a resolved config; each raises :class:`ConfigError` naming the
first field at fault and, where one exists, the value that would work."""

from __future__ import annotations

import decimal
import re
from typing import Any
from urllib.parse import urlsplit

from ldm_core.config.cluster import QUANTITY, TRAINER_APIS, StageResources, TrainingResources
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
    "cluster.trainer_api": TRAINER_APIS,
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

# Loss weights: 0 switches the term off, a negative weight would reward the error.
_OFF_AT_ZERO = (
    "train.autoencoder.kl_weight",
    "train.autoencoder.gradient_weight",
    "train.autoencoder.spectral_weight",
    "train.autoencoder.perceptual_weight",
    "train.autoencoder.adv_weight",
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
    if not cfg.train.autoencoder.initial_sigma > 0:
        raise ConfigError(
            f"train.autoencoder.initial_sigma: must be > 0, got {cfg.train.autoencoder.initial_sigma}"
        )
    if cfg.data.demo_subjects < 1:
        raise ConfigError(f"data.demo_subjects: must be at least 1, got {cfg.data.demo_subjects}")
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
    components = cfg.train.diffusion.prior_components
    if components < 0:
        raise ConfigError(f"train.diffusion.prior_components: must be >= 0, got {components}")
    for dotted in _OFF_AT_ZERO:
        if _get_dotted(cfg, dotted) < 0:
            raise ConfigError(f"{dotted}: must be >= 0 (0 = off), got {_get_dotted(cfg, dotted)}")
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
    scale = cfg.sampling.initial_noise_scale
    if not 0 < scale <= 1:
        raise ConfigError(f"sampling.initial_noise_scale: must be in (0, 1], got {scale}")
    # Every sampler refuses more steps than the model was trained with.
    total_t = cfg.model.scheduler.num_train_timesteps
    _check_start(cfg, "sampling.truncate_at")
    if cfg.sampling.truncate_at and scale != 1:
        raise ConfigError(
            f"sampling.initial_noise_scale: must be 1 when sampling.truncate_at is set (got "
            f"{scale}); a truncated run starts from the latent prior noised, not from noise alone"
        )
    check_trained_range(cfg)
    if cfg.sampling.steps > total_t:
        raise ConfigError(
            f"sampling.steps: {cfg.sampling.steps} exceeds "
            f"model.scheduler.num_train_timesteps={total_t}"
        )


def _check_start(cfg: Config, dotted: str) -> None:
    """A ``truncate_at`` field: 0 for the whole schedule, else a timestep of it."""
    value, total_t = _get_dotted(cfg, dotted), cfg.model.scheduler.num_train_timesteps
    if not 0 <= value < total_t:
        raise ConfigError(
            f"{dotted}: must be 0 (the whole schedule) or a timestep below "
            f"model.scheduler.num_train_timesteps={total_t}, got {value}"
        )


def check_trained_range(cfg: Config) -> None:
    """A UNet trained on part of the schedule (``train.diffusion.truncate_at``) is sampled
    only there: above it, its output would be a guess. Also run on a bundle's own config
    when it is loaded, which is otherwise read as it was written."""
    _check_start(cfg, "train.diffusion.truncate_at")
    trained = cfg.train.diffusion.truncate_at
    if trained == 0:
        return
    if cfg.model.scheduler.objective != "ddpm":
        raise ConfigError(
            "train.diffusion.truncate_at: training on part of the schedule needs the ddpm "
            f"objective (model.scheduler.objective is {cfg.model.scheduler.objective!r}); "
            "set it to 0"
        )
    start = cfg.sampling.truncate_at
    if not 0 < start <= trained:
        whole = " (the whole schedule)" if start == 0 else ""
        raise ConfigError(
            f"sampling.truncate_at: the UNet is trained on timesteps 0..{trained} only "
            f"(train.diffusion.truncate_at), so sampling must start at or below {trained}; "
            f"got {start}{whole}"
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


_METRICS = ("auto", *_KNATIVE_METRICS, "cpu", "memory")
_UPDATE_STRATEGIES = ("RollingUpdate", "Recreate")
KNATIVE_MAX_CONTAINER_CONCURRENCY = 1000
"""Knative's ``container-concurrency-max-limit`` default (config-defaults;
knative/serving pkg/apis/config/defaults.go DefaultMaxRevisionContainerConcurrency)."""
KNATIVE_MAX_REVISION_TIMEOUT_S = 600
"""Knative's ``max-revision-timeout-seconds`` default (config-defaults; knative/serving
v1.16.2 pkg/apis/config/defaults.go lines 44-45, DefaultMaxRevisionTimeoutSeconds): its
webhook refuses a revision whose ``timeoutSeconds`` is longer (revision_validation.go
``validateTimeoutSeconds``, lines 171-180)."""
INGRESS_MARGIN_S = 30
"""The predictor's timeout is ``serving.request_timeout_s`` plus this (ldm_core.kube.isvc_build
``ingress_timeout_s``): the server's own 504 comes before the gateway's."""


def _cores(quantity: str) -> decimal.Decimal | None:
    """CPU cores of a quantity written in cores or millicores; None for other units."""
    match = QUANTITY.match(quantity)
    if match is None or match.group(2) not in (None, "m"):
        return None
    cores = decimal.Decimal(match.group(1))
    return cores / 1000 if match.group(2) == "m" else cores


def _check_cpu_limit(where: str, res: TrainingResources) -> None:
    """A CPU limit, when set, is a quantity no lower than the request: the API server
    refuses a pod whose limit is below its request."""
    if not res.cpu_limit:
        return
    _check_quantity(f"{where}.cpu_limit", res.cpu_limit, "2 or 1500m")
    limit, request = _cores(res.cpu_limit), _cores(res.cpu)
    if limit is not None and request is not None and limit < request:
        raise ConfigError(
            f"{where}.cpu_limit: {res.cpu_limit} is below {where}.cpu ({res.cpu}); "
            "a limit must be at least the request"
        )


def _check_capacity(cfg: Config) -> None:
    """The predictor's autoscaling and capacity as KServe and Knative carry them out: each
    rule is one the cluster would enforce by refusing the InferenceService, or one whose
    breach makes a valid object serve badly (503s, no batching, a 1 % CPU target)."""
    s = cfg.serving
    if s.deployment_mode not in _MODES:
        raise ConfigError(
            f"serving.deployment_mode: {s.deployment_mode!r} is not one of {', '.join(_MODES)}"
            f"{suggest(s.deployment_mode, _MODES)}"
        )
    for field, value, choices in (
        ("scale_metric", s.scale_metric, _METRICS),
        ("update_strategy", s.update_strategy, _UPDATE_STRATEGIES),
    ):
        if value not in choices:
            raise ConfigError(
                f"serving.{field}: {value!r} is not one of {', '.join(choices)}"
                f"{suggest(value, choices)}"
            )
    raw = s.deployment_mode == "RawDeployment"
    _check_replicas(s.deployment_mode, s.min_replicas, s.max_replicas)
    _check_admission(cfg)
    if raw:
        _check_hpa(s.autoscale_metric, s.autoscale_target)
    else:
        _check_knative(cfg)
    if s.progress_deadline_s <= 0:
        raise ConfigError(
            f"serving.progress_deadline_s: must be positive seconds, got {s.progress_deadline_s}"
        )


def _check_replicas(mode: str, low: int, high: int) -> None:
    raw = mode == "RawDeployment"
    if low < (1 if raw else 0):
        raise ConfigError(
            f"serving.min_replicas: {low} is not possible in {mode} mode "
            + (
                "(no scale to zero without Knative: use 1, or deployment_mode Serverless)"
                if raw
                else "(0 = scale to zero)"
            )
        )
    if high < max(1, low):
        raise ConfigError(
            f"serving.max_replicas: {high} is below max(1, serving.min_replicas={low})"
        )


def _check_admission(cfg: Config) -> None:
    """Knative routes up to containerConcurrency requests to one pod; the server admits
    max_concurrency + max_queue (ldm_core/serve/admission.py) and answers 503 beyond."""
    s = cfg.serving
    cc, admitted = s.container_concurrency, s.max_concurrency + s.max_queue
    if cc > admitted:
        raise ConfigError(
            f"serving.max_queue: {s.max_queue} lets a replica admit max_concurrency + max_queue"
            f" = {admitted} requests, but its containerConcurrency (max_concurrency x "
            f"max_batch_size = {cc}) lets Knative route {cc} to it, so it would answer 503 to "
            f"requests already routed; set serving.max_queue to at least {cc - s.max_concurrency}"
        )
    if cfg.serving.deployment_mode != "RawDeployment" and cc > KNATIVE_MAX_CONTAINER_CONCURRENCY:
        raise ConfigError(
            f"serving.max_batch_size: containerConcurrency max_concurrency x max_batch_size = "
            f"{cc} exceeds Knative's limit of {KNATIVE_MAX_CONTAINER_CONCURRENCY}"
        )


def _check_knative(cfg: Config) -> None:
    """Serverless: KServe's webhook takes only Knative's metrics and no deploymentStrategy
    (kserve pkg/apis/serving/v1beta1/inference_service_validation.go,
    validateScalingKPACompExtension, v0.14.1 and v0.15.2); Knative's takes no revision
    timeout over :data:`KNATIVE_MAX_REVISION_TIMEOUT_S`; and a concurrency target below
    one replica's batch scales out before the batch fills (queue-proxy counts every request
    it forwards; the autoscaler aims at target x 70 % utilisation per pod)."""
    s = cfg.serving
    metric, target = s.autoscale_metric, s.autoscale_target
    if metric not in _KNATIVE_METRICS:
        raise ConfigError(
            f"serving.scale_metric: {metric} is refused by KServe's webhook in Serverless mode "
            f"([{metric}] is not a supported metric); use concurrency or rps (or auto), or "
            "deployment_mode RawDeployment for an HPA on cpu or memory"
        )
    timeout = int(s.request_timeout_s) + INGRESS_MARGIN_S
    if timeout > KNATIVE_MAX_REVISION_TIMEOUT_S:
        raise ConfigError(
            f"serving.request_timeout_s: {s.request_timeout_s:g} s makes the predictor's timeout "
            f"{timeout} s (+{INGRESS_MARGIN_S} s for the gateway), over Knative's "
            f"max-revision-timeout-seconds ({KNATIVE_MAX_REVISION_TIMEOUT_S} s, its default, "
            "which this check assumes), so Knative's webhook refuses the revision; use at most "
            f"{KNATIVE_MAX_REVISION_TIMEOUT_S - INGRESS_MARGIN_S}, or deployment_mode "
            "RawDeployment (no such limit). The setting to raise for longer requests is "
            "max-revision-timeout-seconds in ConfigMap knative-serving/config-defaults"
        )
    if s.update_strategy != "RollingUpdate":
        raise ConfigError(
            f"serving.update_strategy: {s.update_strategy} is refused by KServe's webhook in "
            "Serverless mode (customizing deploymentStrategy is only supported for raw "
            "deployment mode); Serverless keeps the old revision serving during an update"
        )
    if metric == "rps" and target < 1:
        raise ConfigError(
            "serving.scale_target: scale_metric rps needs a target of at least 1 request/s "
            "per replica (KServe's webhook refuses less)"
        )
    cc = s.container_concurrency
    if metric == "concurrency" and not s.max_batch_size <= target <= cc:
        raise ConfigError(
            f"serving.scale_target: {target} concurrent requests per replica "
            + (
                f"scales out before a batch of serving.max_batch_size={s.max_batch_size} fills"
                if target < s.max_batch_size
                else f"is more than a replica takes (containerConcurrency {cc}); Knative caps it"
            )
            + f"; use {cc} (0 derives it: max_concurrency x max_batch_size)"
        )


def _check_hpa(metric: str, target: int) -> None:
    """RawDeployment: an HPA on a resource's utilisation. KServe v0.14.1's webhook takes
    only cpu and memory with a target of 1..100 (validateScalingHPACompExtension); v0.15.2's
    HPA reconciler builds no metric for any other resource, nor for memory without a target
    (reconcilers/hpa/hpa_reconciler.go getHPAMetrics). A target far below what one busy
    request uses adds replicas for nothing."""
    if metric not in ("cpu", "memory"):
        raise ConfigError(
            f"serving.scale_metric: {metric} needs Knative (deployment_mode Serverless); "
            "RawDeployment's HPA scales on cpu or memory (auto: cpu)"
        )
    if not 10 <= target <= 100:
        raise ConfigError(
            f"serving.scale_target: {target} is an HPA target of {target} % {metric} "
            "utilisation of the pod's request; give 10..100, e.g. 80 (KServe's default for cpu)"
        )


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
            _check_cpu_limit(where, res)
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
