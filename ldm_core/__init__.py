"""brain-ldm engine: data, models, training, sampling, evaluation, storage and serving.

Nothing in this package imports kfp; only ``ldm_core.kube`` imports the Kubernetes
client, and only pipeline components import ``ldm_core.kube``.
"""

__version__ = "0.1.0"
