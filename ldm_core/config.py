"""Typed run configuration: dataclasses, presets, YAML in/out and dotted overrides.

One YAML file fully describes a run. It is resolved in three layers, each overriding
the last: the preset (``tiny-cpu`` by default), the user's YAML file, then ``--set
a.b=c`` overrides. The result is validated as a whole, so that a bad value is reported
with the dotted name of the field at fault before any work starts, not as a shape error
deep inside a training step.
"""

from __future__ import annotations

import copy
import dataclasses
import decimal
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ldm_core.errors import LdmError
from ldm_core.io import atomic_write_text
from ldm_core.samplers import ALL_SAMPLERS, OBJECTIVES, incompatibility


class ConfigError(LdmError, ValueError):
    """A configuration value is wrong; the message names the dotted field and why."""


LR_DECAYS = ("constant", "cosine")
"""What a learning rate does after its warm-up (``ldm_core.train.loop.LrSchedule``)."""

# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """Which images to read and the fixed geometry every volume is resampled to."""

    channel: str = "FLAIR"
    """Modality to train on, by name (Task01 ``dataset.json`` names) or index as a string."""
    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)
    """Output voxel size in mm (RAS order)."""
    shape: tuple[int, int, int] = (48, 64, 48)
    """Output volume size in voxels after resampling, centre crop or pad."""
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    """Percentiles of non-zero voxels mapped to 0 and 1."""
    val_fraction: float = 0.2
    """Fraction of subjects held out for validation (split by subject, deterministic)."""
    split_seed: int = 0
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process)."""


@dataclass
class AutoencoderConfig:
    """MONAI ``AutoencoderKL`` architecture."""

    channels: tuple[int, ...] = (8, 8, 16)
    """Narrow full-resolution levels: on a CPU the autoencoder's cost is its full-resolution
    convolutions, so tiny-cpu's (8, 8, 16) at batch 1 takes steps 5-6x cheaper than
    (16, 32, 32) at batch 2 did, and learns more in the same minutes (validation SSIM 0.672
    vs 0.601, benchmarks/README.md, "Demo anatomy")."""
    latent_channels: int = 3
    """8 reconstructs a little better in tiny-cpu's budget (validation SSIM 0.690 vs 0.672),
    but the demo's diffusion model then samples shapeless fragments (mask Dice 0.67) or, with
    v-prediction, near-identical mean-like brains (benchmarks/README.md, "Demo anatomy"), so
    tiny-cpu keeps 3."""
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    attention_levels: tuple[bool, ...] = (False, False, False)
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


@dataclass
class UNetConfig:
    """MONAI ``DiffusionModelUNet`` architecture (in latent space)."""

    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 16
    norm_num_groups: int = 16

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


@dataclass
class SchedulerConfig:
    """Training objective and noise schedule, shared by training and sampling.

    ``objective: ddpm`` trains a noise (or v) predictor that the DDPM and DDIM samplers
    use; ``objective: rflow`` trains a velocity predictor for rectified-flow sampling.
    A model can only be sampled by the samplers of the objective it was trained with.
    """

    objective: str = "ddpm"
    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: str = "epsilon"
    """``v_prediction`` gave the demo brain-shaped samples (mask Dice 0.92) that were all
    alike (MS-SSIM ratio 1.18: the quality gate refuses them as collapsed), so tiny-cpu
    keeps ``epsilon`` (benchmarks/README.md, "Demo anatomy")."""


@dataclass
class ModelConfig:
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class AutoencoderTrainConfig:
    """Losses and schedule of the autoencoder stage."""

    steps: int = 560
    """tiny-cpu: 350 plain steps of one volume and 210 with the discriminator cost what 120
    steps of two did with the previous, wider autoencoder (issue 14); more, smaller steps
    reconstruct better in the same time."""
    batch_size: int = 1
    lr: float = 1e-3
    """tiny-cpu's short run needs 1e-3 (with the warm-up and cosine decay below): at 1e-4 the
    autoencoder was still drawing blobs after 120 steps. The GPU presets use 1e-4."""
    kl_weight: float = 1e-6
    gradient_weight: float = 0.0
    """Weight of the gradient difference loss (sharp edges; ``train.autoencoder``'s
    ``gradient_difference``); 0 disables it."""
    perceptual_weight: float = 0.0
    perceptual_weights: str = ""
    """Path or URI of a feature-network weights file; empty disables the perceptual loss."""
    adv_weight: float = 0.01
    adv_start_step: int = 350
    """Steps of warm-up before the patch discriminator joins (>= steps disables it). tiny-cpu
    gives it the last 210 of 560 steps (a step with it costs about 1.5x one without): the
    reconstructions of an L1-trained autoencoder converge to smooth blobs (validation detail
    0.67 after 300 steps, 0.58 after 1200), and the adversarial loss is what puts edges back
    (reconstructions of the training volumes: detail 0.83-0.90 in three runs, against
    0.78-0.80 in two with 650 plain steps at the same cost; benchmarks/README.md, "Demo anatomy")."""
    disc_lr: float = 5e-4
    lr_warmup_steps: int = 10
    """Steps over which the learning rate rises linearly from 0 to ``lr``."""
    lr_decay: str = "cosine"
    """After the warm-up: ``constant``, or ``cosine`` (half-cosine down to 0 at the last step)."""
    scale_factor_batches: int = 0
    """Batches used to estimate the latent std; 0 = the whole training set."""


@dataclass
class DiffusionTrainConfig:
    """Schedule of the latent diffusion stage."""

    steps: int = 350
    """tiny-cpu: 350 steps with min-SNR weighting (``snr_gamma``) sample as well as the 700
    plain steps it took before."""
    batch_size: int = 8
    lr: float = 1e-3
    """1e-3 suits the tiny-cpu UNet's short schedule (2.5e-4 left blobs after 800 steps);
    the GPU presets use 1e-4 for their larger UNets and longer schedules."""
    ema_decay: float = 0.999
    ema_start_step: int = 0
    snr_gamma: float = 5.0
    """Min-SNR-gamma loss weighting (Hang et al. 2023): each example's loss is weighted so that
    timesteps whose signal-to-noise ratio exceeds gamma (the nearly clean ones) count as if it
    were gamma; 0 disables it. ``ddpm`` objective only. tiny-cpu uses 5 to halve its steps:
    on two demo autoencoders, 350 steps with gamma 5 gave samples' detail 0.75 and 0.89 (mask
    Dice 0.87 both) where 700 plain steps gave 0.75 and 0.92 (Dice 0.87, 0.88), and 700 steps
    with gamma 5 gave 0.82 and 0.90 (benchmarks/README.md, "Demo anatomy", fourth and fifth
    rounds). The GPU presets keep it off."""
    lr_warmup_steps: int = 0
    """Steps over which the learning rate rises linearly from 0 to ``lr``."""
    lr_decay: str = "constant"
    """After the warm-up: ``constant``, or ``cosine`` (half-cosine down to 0 at the last step)."""


@dataclass
class TrainConfig:
    """Settings shared by both training stages."""

    autoencoder: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    diffusion: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    seed: int = 42
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    amp: str = "none"
    """none | bf16 | fp16 (fp16 uses a GradScaler)."""
    gradient_checkpointing: bool = False
    compile: bool = False
    sync_bn: bool = False
    channels_last: bool = True
    """Channels-last-3d layout of weights and batches. On the 2 CPU cores tiny-cpu is tuned
    for, oneDNN's 3D convolutions run faster in it: an autoencoder step costs 0.8x and a
    UNet step 0.9x of the default layout's (benchmarks/README.md, "Demo anatomy", fifth
    round); the results are the same up to rounding. The GPU presets keep the default layout
    (not measured there)."""
    ddp_backend: str = "auto"
    """auto (nccl on GPU, gloo on CPU) | nccl | gloo"""
    ddp_timeout_s: int = 1800
    val_every: int = 50
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_nonfinite: int = 5
    """Non-finite losses in a row before a run stops."""
    grad_clip: float = 1.0
    threads: int = 0
    """torch intra-op threads on CPU (0 = torch's default)."""


@dataclass
class SamplingConfig:
    sampler: str = "ddim"
    """One of ``ldm_core.samplers.ALL_SAMPLERS`` that fits ``model.scheduler.objective``."""
    steps: int = 100
    """tiny-cpu: 100 (mask Dice 0.87 on the demo where 50 steps give 0.84, at eta 1); the
    GPU presets use 50."""
    eta: float = 1.0
    """DDIM's step noise: 0 = deterministic DDIM, 1 = as much fresh noise per step as DDPM
    (still one volume per seed). tiny-cpu's short-trained UNet drifts off its training
    latents without it; fresh noise pulls samples back: on the demo, 1.0 gives mask Dice 0.84
    and detail 0.82 where 0.0 gives 0.82 and 0.71 (benchmarks/README.md, "Demo anatomy").
    The GPU presets keep 0.0."""
    clip_sample: bool = False
    clamp_to_latent_range: bool = True
    """Clamp each step's clean-latent estimate to the per-channel range of the training
    latents (``latent_range`` in bundle.json; static thresholding). tiny-cpu's short-trained
    UNet now and then predicts far outside it at the noisy end, and that sample comes out as
    no brain: on two demo models of the seed where it happened (mask Dice 0.21 and 0.27 for
    one of 8 samples) the clamp raised the worst sample's Dice to 0.82 and 0.85 and the mean
    to 0.87-0.89; the detail ratio moved by 0.03 at most (up or down, three models), and the
    samples' MS-SSIM ratio rose to 0.99-1.03, under the gate's 1.15 (benchmarks/README.md,
    "Demo anatomy", fourth round). The GPU presets keep it off. Bundles without
    ``latent_range`` sample unclamped."""
    num_samples: int = 4
    precision: str = "auto"
    """auto (bf16 on a CUDA card with bf16, else fp32) | fp32 | bf16: autocast for the UNet
    and the decode while sampling (the scheduler update stays fp32)."""


@dataclass
class StorageConfig:
    """Object storage (MinIO / S3). Credentials never live here: they come from the
    environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, or ``MINIO_*``), which on
    a cluster is filled from a Kubernetes Secret."""

    endpoint: str = ""
    """host:port of the S3 endpoint; empty = read S3_ENDPOINT / MINIO_ENDPOINT from the env."""
    secure: bool = True
    region: str = ""
    part_size_mb: int = 64


@dataclass
class ServingConfig:
    model_name: str = "brain-ldm"
    http_port: int = 8080
    grpc_port: int = 0
    """KServe's gRPC V2 endpoint (same inference as REST); 0 = no gRPC server."""
    max_samples: int = 4
    """Largest number of samples one request may ask for."""
    max_steps: int = 1000
    request_timeout_s: float = 300.0
    max_concurrency: int = 1
    """Denoising loops running at the same time (each one request, or a batch of requests
    that share it, see max_batch_size)."""
    max_queue: int = 8
    """Requests waiting beyond max_concurrency before new ones are refused (503)."""
    warmup: bool = True
    max_batch_size: int = 8
    """Samples that concurrent requests may denoise together in one loop (a request's own
    samples count; a larger request runs alone). 1 = no batching across requests. Requests
    in a batch still count against max_concurrency + max_queue."""
    max_batch_wait_ms: float = 20.0
    """How long a request waits for others to share its loop when a generation slot is free."""
    # -- capacity on a cluster (the InferenceService's predictor; cluster.predictor sizes a pod)
    deployment_mode: str = "Serverless"
    """Serverless (Knative: scale to zero, concurrency/rps autoscaling, canary traffic) or
    RawDeployment (a Deployment and an HPA: no Knative, never below one replica)."""
    min_replicas: int = 1
    """0 scales to zero when idle (Serverless only); the first request then waits for a cold
    start: scheduling, the image pull, the bundle download, then the server's start, load and
    warm-up. Measured for a real ``ldm serve`` of the demo bundle on this project's 2 shared
    CPU cores while they were heavily contended (load average 17-18, 2026-11-30): imports to
    live 190-242 s, bundle load 12 s, warm-up (one 1-step generation) 53-76 s, the first request
    at steps=10 another 290 s. An idle core is many times faster (a UNet step is 34 ms there,
    see FACTS); measure on the predictor's node before choosing 0 for interactive use."""
    max_replicas: int = 1
    scale_metric: str = "concurrency"
    """What the autoscaler watches: concurrency | rps (Knative, Serverless) | cpu | memory."""
    scale_target: int = 1
    """Target per replica of scale_metric (in-flight requests, requests/s, or % utilisation).
    One generating request keeps a replica busy, so concurrency 1 adds a replica per request."""


# --------------------------------------------------------------------------- cluster

_EXPONENT_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
"""A number in exponent notation, which PyYAML (YAML 1.1) reads as a string without a dot."""
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
"""A Kubernetes resource quantity in the forms people write (``2``, ``500m``, ``16Gi``)."""


@dataclass
class StageResources:
    """What the pod of one stage asks the scheduler for (evaluate, the predictor)."""

    gpus: int = 0
    """GPUs (``nvidia.com/gpu``); 0 = CPU only."""
    cpu: str = "2"
    """CPU request (Kubernetes quantity: ``2``, ``500m``)."""
    memory: str = "4Gi"
    """Memory request and limit (``16Gi``): equal, so the pod is never OOM-killed for
    using what it was promised."""


@dataclass
class TrainingResources(StageResources):
    """What a training job's pods ask for, per training process.

    A pod runs ``nproc`` processes (pipeline parameter ``nproc``, torchrun's
    ``--nproc-per-node``) and asks ``nproc`` times each figure, so one setting fits a pod of
    1 or 8 GPUs. ``gpus`` is 0 or 1: one process drives one GPU. No CPU limit is set, so
    torch's threads are not throttled below what the node has free.
    """

    shm: str = "1Gi"
    """/dev/shm per process (a memory-backed emptyDir) for DataLoader workers and NCCL: the
    container runtime's default of 64 MiB is too small for either."""

    def times(self, n: int) -> TrainingResources:
        """What a pod of ``n`` training processes asks for: each figure ``n`` times."""
        return TrainingResources(
            self.gpus * n, _times(self.cpu, n), _times(self.memory, n), _times(self.shm, n)
        )


def _times(quantity: str, n: int) -> str:
    """``n`` times a Kubernetes quantity, in its own unit (``"500m"`` x 3 = ``"1500m"``)."""
    match = _QUANTITY.match(quantity)
    if match is None:
        raise ConfigError(f"{quantity!r} is not a Kubernetes quantity (e.g. 16Gi)")
    number = decimal.Decimal(match.group(1)) * n
    return f"{format(number.normalize(), 'f')}{match.group(2) or ''}"


@dataclass
class Toleration:
    """A Kubernetes toleration (``key``/``operator``/``value``/``effect``), e.g. for the
    ``nvidia.com/gpu:NoSchedule`` taint GPU node pools carry."""

    key: str = ""
    operator: str = "Exists"
    """Exists (any value) | Equal (``value`` must match)."""
    value: str = ""
    effect: str = ""
    """NoSchedule | PreferNoSchedule | NoExecute; empty = every effect."""

    def to_k8s(self) -> dict[str, str]:
        """The toleration as a pod spec takes it (empty fields left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v}


@dataclass
class ClusterConfig:
    """How the pipeline's pods look on a Kubernetes cluster: the one place for their sizes,
    placement, identities, volumes and deadlines. Training jobs (PyTorchJob / TrainJob),
    the evaluate step and the InferenceService's predictor are all built from it; pipeline
    parameters (image, pvc_name, ...) are folded in as ``cluster.*`` overrides
    (``ldm_core.stages.pipeline_overrides``). Ignored without a cluster."""

    image: str = "ghcr.io/brain-ldm/brain-ldm-training:0.1.0"
    """Image of the pipeline steps and the training pods (images/training)."""
    serving_image: str = "brain-ldm-serving:0.1.0"
    """Image of the predictor (images/serving); used when the deploy creates the
    ServingRuntime or runs the predictor without one."""
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    """Secrets (names, in the run's namespace) to pull images from a private registry."""
    namespace: str = ""
    """Namespace of training jobs and the InferenceService; empty = the pipeline step's own
    (a training job must run where the run's PVC is)."""
    service_account: str = "training"
    """Identity of the training pods (manifests: no API token)."""
    serving_service_account: str = "serving"
    """Identity of the predictor; it lists s3_secret for KServe's storage initializer."""
    pvc_name: str = "brain-ldm-data"
    """The run's PVC, shared by the training steps and their job pods (manifests/base/pvc.yaml;
    its storageClassName and access mode are set there, see manifests/README.md)."""
    s3_secret: str = "brain-ldm-s3"
    """Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and S3_ENDPOINT, given to the
    training pods as environment (manifests/base/s3-secret.template.yaml); empty = none."""
    node_selector: dict[str, str] = field(default_factory=dict)
    """Node labels every training and predictor pod requires (the GPU presets: a GPU node)."""
    tolerations: tuple[Toleration, ...] = ()
    """Taints training and predictor pods tolerate (the GPU presets: ``nvidia.com/gpu``)."""
    priority_class: str = ""
    """priorityClassName of training and predictor pods; empty = the cluster's default."""
    pending_timeout_s: int = 900
    """How long a training pod may stay unable to start (unschedulable, image not pulled, a
    missing Secret, an unbound PVC) before the job is deleted and the step fails with the
    reason. Not zero: a cluster autoscaler adds a GPU node in minutes."""
    run_timeout_s: int = 86400
    """Deadline of one training job (activeDeadlineSeconds); past it the job is stopped."""
    train_autoencoder: TrainingResources = field(
        default_factory=lambda: TrainingResources(cpu="2", memory="6Gi", shm="1Gi")
    )
    train_diffusion: TrainingResources = field(
        default_factory=lambda: TrainingResources(cpu="2", memory="6Gi", shm="1Gi")
    )
    evaluate: StageResources = field(default_factory=lambda: StageResources(cpu="2", memory="8Gi"))
    """The evaluate step's pod (the pipeline step itself: it samples and scores in-process)."""
    predictor: StageResources = field(default_factory=lambda: StageResources(cpu="1", memory="4Gi"))
    """One predictor replica (serving.min_replicas .. max_replicas of them)."""


@dataclass
class EvaluationConfig:
    num_samples: int = 8
    steps: int = 100
    """Sampling steps of the evaluated volumes: tiny-cpu's serving default (``sampling.steps``),
    so the gate judges what is served; the GPU presets use 50."""
    fid_weights: str = ""
    """Path or URI of a 3D feature extractor for FID; empty = FID not computed."""
    # Quality gate. Calibrated on the demo cohort (tiny-cpu, 8 samples), both sides measured
    # in tests/test_evaluate_gate.py: unseen subjects of the same population pass; noise,
    # blank, shifted, blurred, voxel-shuffled, collapsed, mean-image, uniform-blob and copied
    # (memorised) volumes fail. Recalibrate on another cohort.
    gate_min_ms_ssim_ratio: float = 0.5
    """Generated-pair MS-SSIM over real-pair MS-SSIM: low = noise-like, unstructured samples."""
    gate_max_ms_ssim_ratio: float = 1.15
    """The same ratio's upper bound: samples more alike than real subjects are a collapsed
    model. Identical samples reach 1 / ms_ssim_real (1.25 on the demo cohort, where unseen
    subjects score 1.05-1.06); on a cohort more uniform than the demo, lower it."""
    gate_max_mmd: float = 0.3
    """MMD to the real set, relative to an all-blank set's (0 = same distribution, 1 = blank)."""
    gate_min_mask_dice: float = 0.7
    """Mean Dice of each sample's foreground with the real majority mask."""
    gate_max_hist_distance: float = 0.25
    """Wasserstein-1 between brain-voxel intensity histograms on [0, 1]."""
    gate_min_detail_ratio: float = 0.75
    """Generated over real detail (``ldm_core.quality.detail``): below it, volumes without
    inner anatomy. At the demo's 48x64x48, unseen demo subjects score 0.93 (0.91-0.97 each),
    the same subjects with a sharp outline but a smoothed inside 0.72, a sigma-2 blur 0.53,
    and the first demo model's smooth brains without ventricles 0.71, all refused. The demo
    models of issue 14 score 0.79-0.81 with the demo's seed, but 0.70-0.94 across training
    seeds, so the bound is not raised further (benchmarks/README.md, "Demo anatomy"). The
    measure is dominated by the brain's outline at small sizes (the smoothed-inside case
    scores 0.92 at 32^3), so recalibrate it for another volume size."""
    gate_max_detail_ratio: float = 1.2
    """The detail ratio's upper bound: noise and voxel-shuffled textures (1.27-1.42 on the
    demo cohort, noise 2.4) score above real anatomy."""
    gate_max_nn_correlation: float = 0.6
    """Memorisation: the highest correlation of any sample with a real volume, on deviations
    from the real mean image (``ldm_core.evaluate.nearest_real_correlation``). A copy of a
    subject scores 1, one smoothed (sigma 1) and noisy 0.65-0.71; distinct demo subjects at
    most 0.48. Only as sharp as the autoencoder:
    the first demo model's reconstructions of training subjects scored 0.40-0.57."""


@dataclass
class Config:
    """A whole run. ``Config()`` is the ``tiny-cpu`` preset."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, D, H, W) of the autoencoder's latent for ``data.shape``."""
        f = self.model.autoencoder.downsample_factor
        d, h, w = self.data.shape
        return (self.model.autoencoder.latent_channels, d // f, h // f, w // f)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (atomically), e.g. next to a run's outputs."""
        atomic_write_text(path, self.to_yaml())


# --------------------------------------------------------------------------- presets


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    """Lay ``extra`` over ``base`` in place, section by section (how presets, files and
    overrides combine)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


_GPU_COMMON: dict[str, Any] = {
    "model": {
        "autoencoder": {"latent_channels": 3, "norm_num_groups": 32},
        "scheduler": {"prediction_type": "epsilon"},
        "unet": {
            "attention_levels": [False, True, True],
            "num_res_blocks": 2,
            "num_head_channels": 32,
            "norm_num_groups": 32,
        },
    },
    "train": {
        "device": "cuda",
        "channels_last": False,
        "autoencoder": {"lr": 1e-4, "lr_warmup_steps": 0, "lr_decay": "constant"},
        "diffusion": {
            "lr": 1e-4,
            "lr_warmup_steps": 0,
            "lr_decay": "constant",
            "snr_gamma": 0.0,
        },
        "val_every": 500,
        "log_every": 50,
        "checkpoint_every": 1000,
        "keep_checkpoints": 3,
    },
    "sampling": {"steps": 50, "eta": 0.0, "clamp_to_latent_range": False},
    "evaluation": {"steps": 50},
    "cluster": {
        # The label NVIDIA's GPU feature discovery / GPU operator puts on GPU nodes, and the
        # taint GPU node pools commonly carry to keep other work off them.
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}
"""What every GPU preset shares: 32-group norms, attention in the UNet's lower levels, a
constant 1e-4 learning rate for both models, and a cadence for runs of tens of thousands of
steps. The dataclass defaults are tuned for tiny-cpu's few minutes of training; what this pins
keeps the GPU presets on their own recipe when those change."""


def _gpu_preset(specific: dict[str, Any]) -> dict[str, Any]:
    """A GPU preset: :data:`_GPU_COMMON`, then the settings ``specific`` to that hardware."""
    preset = copy.deepcopy(_GPU_COMMON)
    _deep_merge(preset, specific)
    return preset


PRESETS: dict[str, dict[str, Any]] = {
    # Trains the demo cohort's AE + LDM on 2 CPU cores in minutes (4 mm, 48x64x48); on a
    # cluster its pods ask for no GPU and a couple of cores (ClusterConfig's defaults).
    "tiny-cpu": {},
    # One 16 GB GPU (T4, V100-16G): 2 mm, fp16 with a GradScaler (no bf16 on those
    # cards), gradient checkpointing to fit the autoencoder's activations.
    "gpu-16g": _gpu_preset(
        {
            "data": {"spacing": [2.0, 2.0, 2.0], "shape": [80, 96, 80]},
            "model": {
                "autoencoder": {"channels": [32, 64, 64]},
                "unet": {"channels": [128, 256, 256]},
            },
            "train": {
                "amp": "fp16",
                "gradient_checkpointing": True,
                "autoencoder": {
                    "steps": 20000,
                    "batch_size": 1,
                    "adv_start_step": 5000,
                    "scale_factor_batches": 0,
                },
                "diffusion": {"steps": 50000, "batch_size": 4},
                "threads": 0,
            },
            "serving": {"max_samples": 2},
            # A node with one T4/V100-16G and 8 vCPU / 30-60 GiB (n1-standard-8 + T4,
            # p3.2xlarge): training leaves room for the kubelet and daemonsets.
            "cluster": {
                "train_autoencoder": {"gpus": 1, "cpu": "6", "memory": "24Gi", "shm": "4Gi"},
                "train_diffusion": {"gpus": 1, "cpu": "6", "memory": "24Gi", "shm": "4Gi"},
                "evaluate": {"gpus": 1, "cpu": "4", "memory": "16Gi"},
                "predictor": {"gpus": 1, "cpu": "2", "memory": "12Gi"},
            },
        }
    ),
    # One 32 GB+ GPU (V100-32G, A100-40G): finer 1.75 mm grid, wider models.
    "gpu-32g": _gpu_preset(
        {
            "data": {"spacing": [1.75, 1.75, 1.75], "shape": [96, 112, 96]},
            "model": {
                "autoencoder": {"channels": [32, 64, 128]},
                "unet": {"channels": [128, 256, 512]},
            },
            "train": {
                "amp": "fp16",
                "gradient_checkpointing": False,
                "autoencoder": {"steps": 30000, "batch_size": 2, "adv_start_step": 8000},
                "diffusion": {"steps": 80000, "batch_size": 8},
            },
            "serving": {"max_samples": 4},
            # A node with one 32-40 GB GPU and 8-12 vCPU / 60-85 GiB (p3dn slice, a2-highgpu-1g).
            "cluster": {
                "train_autoencoder": {"gpus": 1, "cpu": "8", "memory": "48Gi", "shm": "8Gi"},
                "train_diffusion": {"gpus": 1, "cpu": "8", "memory": "48Gi", "shm": "8Gi"},
                "evaluate": {"gpus": 1, "cpu": "4", "memory": "24Gi"},
                "predictor": {"gpus": 1, "cpu": "4", "memory": "16Gi"},
            },
        }
    ),
    # Several A100/H100-class GPUs through torchrun / PyTorchJob: bf16, nccl with a long
    # timeout (the latent cache is built on rank 0 while others wait), torch.compile and
    # synchronized BN (the patch discriminator has BN).
    "multi-gpu": _gpu_preset(
        {
            "data": {"spacing": [1.5, 1.5, 1.5], "shape": [128, 160, 128], "num_workers": 4},
            "model": {
                "autoencoder": {"channels": [64, 128, 128], "num_res_blocks": 2},
                "unet": {"channels": [256, 512, 768], "num_head_channels": 64},
            },
            "train": {
                "amp": "bf16",
                "gradient_checkpointing": True,
                "compile": True,
                "sync_bn": True,
                "ddp_backend": "nccl",
                "ddp_timeout_s": 7200,
                "autoencoder": {"steps": 50000, "batch_size": 2, "adv_start_step": 10000},
                "diffusion": {"steps": 150000, "batch_size": 8},
                "val_every": 1000,
                "log_every": 100,
                "checkpoint_every": 2000,
            },
            "serving": {"max_samples": 2},
            # Per training process (a pod of nproc processes asks nproc times this): one GPU,
            # the loader's 4 workers and the cached latents, as on an 8-GPU A100/H100 node
            # (96+ vCPU, 1 TiB+). The run's PVC must be ReadWriteMany for nnodes > 1.
            "cluster": {
                "train_autoencoder": {"gpus": 1, "cpu": "10", "memory": "96Gi", "shm": "8Gi"},
                "train_diffusion": {"gpus": 1, "cpu": "10", "memory": "96Gi", "shm": "8Gi"},
                "evaluate": {"gpus": 1, "cpu": "8", "memory": "64Gi"},
                "predictor": {"gpus": 1, "cpu": "4", "memory": "32Gi"},
            },
        }
    ),
}

DEFAULT_PRESET = "tiny-cpu"


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: typing.Sequence[str] = (),
) -> Config:
    """Resolve preset -> YAML file -> ``key=value`` overrides into a validated Config.

    A YAML file may name its own preset under a top-level ``preset:`` key; ``preset``
    given here wins over it.
    """
    file_data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        file_data = loaded
    file_preset = file_data.pop("preset", None)
    name = preset or file_preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise ConfigError(
            f"preset: unknown preset {name!r}{_suggest(name, PRESETS)}; "
            f"choose one of {', '.join(PRESETS)}"
        )
    data = copy.deepcopy(PRESETS[name])
    _deep_merge(data, file_data)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    cfg = from_dict(data)
    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``'train.amp=bf16'`` -> ``('train.amp', 'bf16')``; values are parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.autoencoder.steps=10")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key, value


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from plain data, rejecting unknown keys and wrong types by name."""
    return _build(Config, data, prefix="")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}{key}"
            raise ConfigError(f"{where}: unknown key{_suggest(key, fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{where}.")
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {
            _coerce(key_type, k, f"{where} key {k!r}"): _coerce(value_type, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: union types are not supported in config")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.match(value):
            value = float(value)  # YAML 1.1 reads 1e9 and 3e-4 (no dot) as strings
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


# --------------------------------------------------------------------------- validation

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


def _check_choices(cfg: Config) -> None:
    for dotted, choices in _CHOICES.items():
        value = _get_dotted(cfg, dotted)
        if value not in choices:
            raise ConfigError(
                f"{dotted}: {value!r} is not one of {', '.join(choices)}{_suggest(value, choices)}"
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
    if not _QUANTITY.match(value):
        raise ConfigError(f"{where}: {value!r} is not a Kubernetes quantity (e.g. {example})")


def _check_capacity(cfg: Config) -> None:
    """The predictor's autoscaling as KServe can carry it out in the chosen mode."""
    s = cfg.serving
    if s.deployment_mode not in _MODES:
        raise ConfigError(
            f"serving.deployment_mode: {s.deployment_mode!r} is not one of {', '.join(_MODES)}"
            f"{_suggest(s.deployment_mode, _MODES)}"
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


# --------------------------------------------------------------------------- helpers


def _suggest(word: Any, options: typing.Iterable[Any]) -> str:
    match = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _round_to(size: int, multiple: int) -> int:
    return max(multiple, round(size / multiple) * multiple)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _get_dotted(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value
