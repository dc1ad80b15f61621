"""KFP components, one per pipeline stage. Each body makes one call into ``ldm_core.stages``."""

from components.configure import configure
from components.deploy import deploy
from components.download import download
from components.evaluate import evaluate
from components.preprocess import preprocess
from components.train_autoencoder import train_autoencoder
from components.train_diffusion import train_diffusion

__all__ = [
    "configure",
    "deploy",
    "download",
    "evaluate",
    "preprocess",
    "train_autoencoder",
    "train_diffusion",
]
