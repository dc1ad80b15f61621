"""Shared fixtures. Tests run on the CPU, with no cluster and no network but loopback."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores here; keep torch from oversubscribing them across test processes.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Loopback traffic must never go through a proxy from the environment."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(autouse=True)
def _restore_threads():
    """Trainers apply train.threads process-wide; give the next test its setting back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
