"""The container image every component runs in.

The image carries kfp and ``ldm_core``, so components are built with
``install_kfp_package=False``: a cluster without internet access (common in hospitals)
runs them as they are, and ``kfp.local`` runs the same functions on this machine. The
pipeline sets every task's image from its ``image`` parameter (``set_container_image``);
this is only the components' own default, the config's ``cluster.step_image`` (the CPU
build most steps run). To compile a pipeline whose images default to another registry, pass
``--image`` and ``--step-image`` to ``python -m pipelines.brain_ldm``.
"""

from __future__ import annotations

from ldm_core.config import ClusterConfig

BASE_IMAGE = ClusterConfig().step_image
"""The config's ``cluster.step_image``: the default of the light steps' pods."""
