"""The container image every component runs in.

The image carries kfp and ``ldm_core``, so components are built with
``install_kfp_package=False``: a cluster without internet access (common in hospitals)
runs them as they are, and ``kfp.local`` runs the same functions on this machine. The
pipeline sets every task's image from its ``image`` parameter (``set_container_image``);
this is only the components' own default, the config's ``cluster.image``. To compile a
pipeline whose ``image`` defaults to another registry, pass ``--image`` to
``python -m pipelines.brain_ldm``.
"""

from __future__ import annotations

from ldm_core.config import ClusterConfig

BASE_IMAGE = ClusterConfig().image
"""The config's ``cluster.image``: one default for the step pods and the training pods."""
