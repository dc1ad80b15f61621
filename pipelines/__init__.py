"""Pipeline definition, local runner and cluster submission for brain-ldm."""
