"""The container image every component runs in.

The image carries kfp and ``ldm_core``, so components are built with
``install_kfp_package=False``: a cluster without internet access (common in hospitals)
runs them as they are, and ``kfp.local`` runs the same functions on this machine. The
pipeline also exposes the image as a parameter (``set_container_image``); this constant is
the compile-time default, overridable with ``LDM_IMAGE`` when building for a registry.
"""

from __future__ import annotations

import os

from ldm_core.config import ClusterConfig

DEFAULT_IMAGE = ClusterConfig().image
"""The config's ``cluster.image``: one default for the step pods and the training pods."""
BASE_IMAGE = os.environ.get("LDM_IMAGE", DEFAULT_IMAGE)
