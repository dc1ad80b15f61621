"""The presets: ``tiny-cpu`` (the dataclass defaults) and the GPU presets, as partial
configs laid over those defaults."""

from __future__ import annotations

import copy
from typing import Any


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    """Lay ``extra`` over ``base`` in place, section by section (how presets, files and
    overrides combine)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
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
    deep_merge(preset, specific)
    return preset


PRESETS: dict[str, dict[str, Any]] = {
    # Trains the demo cohort's AE + LDM on 2 CPU cores in minutes (4 mm, 48x64x48); on a
    # cluster its pods ask for no GPU and a couple of cores (ClusterConfig's defaults).
    "tiny-cpu": {},
    # The CPU preset trained for quality: the whole pipeline in under an hour on 2 cores.
    # Half-resolution latents (24x32x24, one downsampling) from an autoencoder whose
    # posterior noise starts small and stays small (initial_sigma, kl_weight: with MONAI's
    # sigma of 1 and a KL weight of 1e-6 the decoder learns from mostly noise and blurs) and
    # that trains with a spectral loss (L1 alone smooths the sulci and the texture away); a
    # cohort of 64 demo subjects so the UNet's half hour draws new brains rather than copies;
    # a UNet trained on latents standardised per channel; DDIM with a little step noise
    # (eta 0.3); 16 samples scored by a gate calibrated at this size (benchmarks/README.md,
    # "Quality preset").
    "quality-cpu": {
        "data": {"demo_subjects": 64},
        "model": {
            "autoencoder": {
                "channels": [16, 16],
                "attention_levels": [False, False],
                "latent_channels": 3,
            },
            "unet": {"channels": [16, 32, 32]},
        },
        "train": {
            "autoencoder": {
                "steps": 900,
                "adv_start_step": 500,
                "initial_sigma": 0.05,
                "kl_weight": 1e-8,
                "spectral_weight": 10.0,
            },
            "diffusion": {
                "steps": 1600,
                "lr_warmup_steps": 50,
                "lr_decay": "cosine",
                "standardise_channels": True,
                "truncate_at": 600,
                "prior_components": 4,
            },
            "val_every": 100,
            "checkpoint_every": 100,
        },
        "sampling": {"eta": 0.3, "truncate_at": 600},
        "evaluation": {
            "num_samples": 16,
            "gate_min_detail_ratio": 0.85,
            "gate_min_mask_dice": 0.85,
            "gate_max_nn_correlation": 0.55,
        },
    },
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
