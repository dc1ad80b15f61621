"""The sections of a run's config: data, model, training, sampling, storage, serving,
evaluation and registry, and :class:`Config`, the whole run (``cluster`` is in ``cluster.py``).

Each field's default is the ``tiny-cpu`` preset's value; its docstring says why, with the
measurement behind it where there is one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ldm_core.config.cluster import ClusterConfig
from ldm_core.io import atomic_write_text

LR_DECAYS = ("constant", "cosine")
"""What a learning rate does after its warm-up (``ldm_core.train.loop.LrSchedule``)."""


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
    demo_subjects: int = 16
    """Subjects the ``demo`` source generates when the download is not given a number (the
    pipeline's ``subjects`` parameter, ``ldm download --subjects``). 16 keep the demo's
    download and preprocessing near a minute; a model trained longer on 16 copies them
    (benchmarks/README.md, "Quality preset")."""
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
    steps of two did with the previous, wider autoencoder (benchmarks/README.md, "Demo
    anatomy"); more, smaller steps reconstruct better in the same time."""
    batch_size: int = 1
    lr: float = 1e-3
    """tiny-cpu's short run needs 1e-3 (with the warm-up and cosine decay below): at 1e-4 the
    autoencoder was still drawing blobs after 120 steps. The GPU presets use 1e-4."""
    kl_weight: float = 1e-6
    initial_sigma: float = 1.0
    """The posterior's standard deviation when training starts (the bias of the encoder's
    log-variance convolution; 1.0 is MONAI's initialisation). The decoder trains on latents
    sampled with this noise. In a short run it does not shrink by itself: after 900-1200
    steps on the demo the latent means spread 0.07-0.49 against a sigma of 0.85-1.01, so
    the decoder learnt to reconstruct from mostly noise and blurred; started at 0.05 with
    ``kl_weight`` 1e-6 it was back at 0.85-0.95 after 900 steps, and only with ``kl_weight``
    1e-8 did it stay near 0.05, which raised validation SSIM from 0.79 to 0.86 and kept every
    lesion (benchmarks/README.md, "Quality preset", second round). quality-cpu uses 0.05
    with 1e-8; tiny-cpu and the GPU presets keep 1 and 1e-6."""
    gradient_weight: float = 0.0
    """Weight of the gradient difference loss (sharp edges; ``train.autoencoder``'s
    ``gradient_difference``); 0 disables it."""
    spectral_weight: float = 0.0
    """Weight of the spectral loss (MONAI's ``JukeboxLoss``: the squared distance between the
    Fourier amplitudes of the reconstruction and the input); 0 disables it. L1 is met by a
    smooth volume that misses the sulci and the data's texture; this term prices the
    high frequencies they carry. quality-cpu's autoencoder with 10 (the term is then about
    as large as L1) reconstructs validation volumes with detail 0.93 where it gave 0.76
    without (SSIM 0.83 against 0.86, every lesion kept; the gradient difference loss, weight
    1, gave 0.77; benchmarks/README.md, "Quality preset", fourth round)."""
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
    prior_components: int = 8
    """Principal components of the training latents kept in the bundle's latent prior
    (``latent_prior.pt``; what ``sampling.truncate_at`` starts from), beside their
    per-voxel mean and residual variance: the ways whole subjects differ; at most a quarter
    of the training subjects' count (:func:`ldm_core.latent_prior.fit`). The mean alone
    drew samples all of one shape on quality-cpu (MS-SSIM ratio 1.21, over the gate's
    1.15); four, eight and sixteen brought it to 1.11, 1.11 and 1.08, and the samples'
    correlation with their nearest training subject to 0.46, 0.49 and 0.57 (real subjects
    0.47, the gate 0.55): the components of a small cohort carry its subjects
    (benchmarks/README.md, "Quality preset", eighth round). quality-cpu uses four: with
    its UNet trained on 0..600 only (``truncate_at``), eight drew samples nearer their
    nearest training subject (0.52) than four did (0.49), at the same mask Dice and
    ventricle contrast (ninth round)."""
    truncate_at: int = 0
    """0: train the UNet on timesteps drawn from the whole schedule. T > 0: from 0..T only,
    for a model that samples with ``sampling.truncate_at`` at or below T: the sampler never
    calls the UNet above its start, so steps spent there teach it nothing it uses. A config
    that samples above T, or the whole schedule, is refused, and so is a bundle whose
    ``config.yaml`` says so when it loads. ``ddpm`` objective only. Its loss curves do not
    compare with a whole-schedule run's (the loss of predicting the noise is higher at the
    clean end). quality-cpu samples from 600 and trains on 0..600: its samples' ventricle
    contrast rose from 0.30 (the faintest sample 0.15) to 0.40 (0.27), the real volumes'
    0.40, in the same 1600 steps (benchmarks/README.md, "Quality preset", ninth round).
    Every other preset trains on the whole schedule."""
    standardise_channels: bool = False
    """Train the UNet on latents shifted and scaled to mean 0 and std 1 per channel (the
    training latents' moments, recorded in the bundle as ``latent_moments`` and undone before
    decoding). The autoencoder's one ``scale_factor`` gives the latent as a whole unit
    variance, but its channels can differ: off, a channel of small variance is buried in the
    noise schedule's noise sooner than the others and its mean is one more thing the UNet has
    to learn. quality-cpu's latents have channel stds 0.65, 1.47 and 0.54 after the scale
    factor; standardised, the same run's samples scored detail 0.935, mask Dice 0.864 and
    nearest-neighbour correlation 0.365 where they scored 0.918, 0.862 and 0.402
    (benchmarks/README.md, "Quality preset", sixth round). tiny-cpu keeps it off: on its
    recipe before min-SNR weighting, 700 steps gave detail 0.725 / 0.711 (unclamped /
    clamped) standardised against 0.758 / 0.753 ("Demo anatomy", fourth round). The GPU
    presets keep it off too (not measured there)."""


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
    nproc: int = 1
    """Training processes per node (torchrun's ``--nproc-per-node``): locally, processes on
    this machine; on a cluster, the processes of each training pod, one GPU each when
    ``cluster.train_*.gpus`` is 1. The effective batch size is ``batch_size`` x nproc x nnodes."""
    nnodes: int = 1
    """Nodes of a training job (a PyTorchJob's Master and Workers, a TrainJob's numNodes), one
    pod each; the local backend runs on one."""


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
    quality-cpu uses 0.3: on its bundle's 16 evaluation seeds 0.0 gave detail 0.96 with
    mask Dice 0.854 (its target is 0.859) and 1.0 gave 0.85 with 0.895; 0.3 gave 0.92 and
    0.861, and 0.95 and 0.865 on 16 other seeds, where 0.0 drew samples closer to their
    nearest training subject than real subjects are to theirs (benchmarks/README.md,
    "Quality preset", fifth round). The GPU presets keep 0.0."""
    initial_noise_scale: float = 1.0
    """The starting noise's standard deviation, in (0, 1]: below 1 samples at a lower
    temperature (closer to the typical brain, less varied). On quality-cpu's bundle (eta
    0.3, 16 evaluation seeds) 1.0 draws grainy volumes whose ventricle region is hardly
    darker than their tissue (ventricle contrast 0.09 against the real volumes' 0.40);
    0.95 draws smooth brains with the lateral ventricles (0.28) and lesions in 12 of 16,
    at a detail ratio of 0.82 where 1.0 scores 0.94 on its grain (benchmarks/README.md,
    "Quality preset", seventh round). Every preset keeps 1.0."""
    truncate_at: int = 0
    """0: sample the whole schedule from pure noise (refused for a UNet trained on part of
    it, ``train.diffusion.truncate_at``). T > 0: spread the steps over the part
    of the schedule at or below T (``steps`` still counts the UNet's calls) and start at the
    first of them, from the training latents' Gaussian (the bundle's
    ``latent_prior.pt``, :mod:`ldm_core.latent_prior`) noised to it, and leave the noisy end
    out, where a noise-predicting UNet's clean-latent estimate is mostly its own error. On
    quality-cpu's bundle (eta 0.3, 16 evaluation seeds) the full schedule drew grainy
    volumes whose ventricle region is hardly darker than their tissue (contrast 0.09 against
    the real volumes' 0.40); from 600, with eight components, brains of the real volumes'
    shape with the ventricles (0.30), detail 0.94, mask Dice 0.91 and an MS-SSIM ratio of
    1.08 (benchmarks/README.md, "Quality preset", eighth round); 0.40 once the UNet was
    trained on 0..600 alone (ninth round). Every other preset samples the whole schedule."""
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
    region: str = "us-east-1"
    """The bucket's region, sent with every request. Never empty: without one the MinIO SDK
    first asks the server where the bucket is (GetBucketLocation), a bucket-level read that a
    Kubeflow 1.11 profile's SeaweedFS user may not make (its keys reach objects under four
    prefixes only), so every transfer failed there. MinIO and SeaweedFS answer us-east-1;
    set another only for an S3 service whose bucket lives elsewhere."""
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
    repository_endpoints: bool = False
    """KServe's model repository extension: ``POST /v2/repository/models/{name}/load`` and
    ``/unload`` (and their gRPC calls). Admin-only when on: they take no credentials, and an
    unload takes the model out of service until the pod restarts (liveness then fails, so the
    kubelet restarts it); expose the port to admins only. Off, the routes do not exist (404)."""
    # -- capacity on a cluster (the InferenceService's predictor; cluster.predictor sizes a pod).
    # What KServe and Knative allow of these is checked in config/validation.py
    # (_check_capacity); the properties below are the values the InferenceService carries.
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
    scale_metric: str = "auto"
    """What the autoscaler watches: concurrency | rps (Knative's autoscaler, Serverless) |
    cpu | memory (an HPA, RawDeployment); auto: concurrency in Serverless, cpu in
    RawDeployment (see :attr:`autoscale_metric`)."""
    scale_target: int = 0
    """Target per replica of scale_metric: in-flight requests (concurrency), requests/s (rps),
    or % of the pod's request (cpu, memory). 0: what the metric's own meaning suggests (see
    :attr:`autoscale_target`): for concurrency, the requests one replica generates at once
    (:attr:`container_concurrency`), so a replica fills its batch before another starts; for
    cpu, KServe's default of 80 (DefaultCPUUtilization). rps and memory need a value."""
    progress_deadline_s: int = 1800
    """How long a new predictor revision may take to become ready before Knative declares it
    failed (annotation ``serving.knative.dev/progress-deadline``; Knative's own default is
    600 s). A GPU predictor's first start on a node pulls a CUDA image of several GB, then
    downloads the bundle and loads and warms up the model: ten minutes is not enough on a
    cold node. The deploy step waits this long plus a margin, so Knative's verdict arrives
    first. In RawDeployment mode KServe fixes the Deployment's progressDeadlineSeconds at 600
    (deployment_reconciler.go, setDefaultDeploymentSpec) and this field does not reach it."""
    update_strategy: str = "RollingUpdate"
    """RawDeployment only: how the predictor's Deployment replaces its pods (KServe's
    ``deploymentStrategy``). RollingUpdate starts the new pod before stopping the old one,
    so an update of a one-GPU predictor needs a second free GPU; Recreate stops the old pods
    first and needs none, at the cost of downtime (no replica serves until the new one is
    ready: image pull, bundle download, load and warm-up). Serverless always keeps the old
    revision serving (the canary) and KServe refuses a deploymentStrategy there."""

    @property
    def container_concurrency(self) -> int:
        """Requests one replica takes at once (the predictor's ``containerConcurrency``): as
        many as its server generates at once (``max_concurrency`` denoising loops, each a
        batch of up to ``max_batch_size`` requests). Fewer would starve the batching; more
        would queue in the pod, where Knative's autoscaler cannot see them."""
        return self.max_concurrency * self.max_batch_size

    @property
    def autoscale_metric(self) -> str:
        """``scale_metric`` with ``auto`` resolved for ``deployment_mode``."""
        if self.scale_metric != "auto":
            return self.scale_metric
        return "cpu" if self.deployment_mode == "RawDeployment" else "concurrency"

    @property
    def autoscale_target(self) -> int:
        """``scale_target`` with 0 resolved for :attr:`autoscale_metric` (0 stays 0 where the
        metric has no natural default; validation refuses that)."""
        if self.scale_target:
            return self.scale_target
        return {"concurrency": self.container_concurrency, "cpu": 80}.get(self.autoscale_metric, 0)


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
    and the first demo model's smooth brains without ventricles 0.71, all refused. Later demo
    models score 0.79-0.81 with the demo's seed, but 0.70-0.94 across training
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
class RegistryConfig:
    """The Kubeflow Model Registry the deploy stage registers a gated bundle in, as a model
    version (``ldm_core.registry``). Off by default: Kubeflow ships the registry as an
    optional application that its single-command install leaves out."""

    enabled: bool = False
    url: str = ""
    """The registry's REST API, scheme and port included. Kubeflow's manifests serve it as
    ``http://model-registry-service.<namespace>.svc.cluster.local:8080`` (Service
    ``model-registry-service``, port ``http-api``); a name of that form also tells the
    registry's InferenceService controller which registry the labels refer to."""
    author: str = "brain-ldm"
    """Who registers: the model version's author and the registered model's owner."""
    model_name: str = ""
    """The registered model's name; empty = ``serving.model_name``."""
    ca_file: str = ""
    """PEM bundle that signs an https registry's certificate; empty = the system's CAs."""
    token_file: str = ""
    """A bearer token file sent to the registry; empty = the pod's service account token when
    it has one (what a registry behind Kubeflow's auth checks), else none."""


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
    registry: RegistryConfig = field(default_factory=RegistryConfig)

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


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value
