"""The container image every component runs in.

The image carries kfp and ``ldm_core``, so components are built with
``install_kfp_package=False``: a cluster without internet access (common in hospitals)
runs them as they are, and ``kfp.local`` runs the same functions on this machine. The
pipeline also exposes the image as a parameter (``set_container_image``); this constant is
the compile-time default, overridable with ``LDM_IMAGE`` when building for a registry.
"""

from __future__ import annotations

import os

DEFAULT_IMAGE = "ghcr.io/brain-ldm/brain-ldm-training:0.1.0"
BASE_IMAGE = os.environ.get("LDM_IMAGE", DEFAULT_IMAGE)
