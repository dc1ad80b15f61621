"""Tiny configs for fast tests: 32^3 images, two-level networks (latent 3x16^3)."""

from __future__ import annotations

from ldm_core.config import Config, load_config

TINY_OVERRIDES = [
    "data.shape=[32,32,32]",
    "data.spacing=[6.0,6.0,6.0]",
    "model.autoencoder.channels=[8,16]",
    "model.autoencoder.attention_levels=[false,false]",
    "model.autoencoder.norm_num_groups=8",
    "model.unet.channels=[16,32]",
    "model.unet.attention_levels=[false,true]",
    "model.unet.norm_num_groups=8",
    "model.unet.num_head_channels=8",
]


def tiny_config(*extra: str) -> Config:
    return load_config(overrides=[*TINY_OVERRIDES, *extra])
