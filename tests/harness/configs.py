"""Tiny configs for fast tests.

``tiny_config``: 32^3 images, two-level networks (latent 3x16^3), for training tests.
``serve_config``: 16^3 images with anisotropic spacing and small serving limits, for
serving, sampling and deploy tests (a bundle of it loads and samples in well under a second).
"""

from __future__ import annotations

from ldm_core.config import Config, load_config

TINY_OVERRIDES = [
    "data.shape=[32,32,32]",
    "data.spacing=[6.0,6.0,6.0]",
    "model.autoencoder.channels=[8,16]",
    "model.autoencoder.attention_levels=[false,false]",
    "model.autoencoder.norm_num_groups=8",
    "model.autoencoder.latent_channels=3",
    "model.scheduler.prediction_type=epsilon",
    "model.unet.channels=[16,32]",
    "model.unet.attention_levels=[false,true]",
    "model.unet.norm_num_groups=8",
    "model.unet.num_head_channels=8",
]


GATE_OFF_OVERRIDES = [
    "evaluation.gate_max_ms_ssim_ratio=1e9",
    "evaluation.gate_min_detail_ratio=0",
    "evaluation.gate_max_detail_ratio=1e9",
    "evaluation.gate_max_nn_correlation=1e9",
]
"""The gate checks that are not pipeline parameters, switched off: with these and permissive
``gate_*`` parameters, an untrained model passes (what plumbing tests of the DAG need)."""

NO_SNR = "train.diffusion.snr_gamma=0"
"""Min-SNR weighting off: tiny-cpu has it on, and the rflow objective refuses it."""


def tiny_config(*extra: str) -> Config:
    return load_config(overrides=[*TINY_OVERRIDES, *extra])


def ae_config(*extra: str):
    # One thread: the tiny convolutions gain nothing from two, and on a shared 2-core
    # machine two threads per process thrash.
    return tiny_config(
        "train.threads=1",
        "train.autoencoder.batch_size=1",
        "train.log_every=1",
        "train.val_every=1000",
        "train.checkpoint_every=1000",
        "train.autoencoder.adv_start_step=100000",
        *extra,
    )


MODEL = "brain-ldm"
"""The served model's name."""

SERVE_OVERRIDES = [
    "data.shape=[16,16,16]",
    "data.spacing=[2.0,3.0,4.0]",
    "model.autoencoder.channels=[8,8]",
    "model.autoencoder.attention_levels=[false,false]",
    "model.autoencoder.norm_num_groups=4",
    "model.autoencoder.latent_channels=3",
    "model.scheduler.prediction_type=epsilon",
    "model.unet.channels=[8,8]",
    "model.unet.attention_levels=[false,false]",
    "model.unet.num_head_channels=8",
    "model.unet.norm_num_groups=4",
    "serving.max_samples=3",
    "serving.max_steps=50",
    "sampling.steps=3",
]


def serve_config(*extra: str) -> Config:
    return load_config(overrides=[*SERVE_OVERRIDES, *extra])
