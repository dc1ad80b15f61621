"""Kubernetes-facing code (PyTorchJob launcher, InferenceService rollout); imported only by components."""
