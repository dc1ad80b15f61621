"""How a training stage is started: one interface, two backends.

A training stage is an ``ldm`` verb (``train-autoencoder`` or ``train-diffusion``) that
runs in every process of a torchrun group. Locally the group is started as a ``torchrun``
subprocess; on a cluster the same command line becomes the container command of a
Kubeflow PyTorchJob (``ldm_core.kube.pytorchjob.PyTorchJobLauncher``). Both backends take a
:class:`TrainingTask` and either return normally or raise :class:`LaunchError`.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Protocol

from ldm_core.errors import LdmError

log = logging.getLogger(__name__)


class LaunchError(LdmError):
    """The training group failed; the message carries the reason and the last log lines."""


@dataclass
class TrainingTask:
    """One training stage to run on ``nnodes`` x ``nproc_per_node`` processes."""

    name: str
    """Deterministic job name (from the pipeline run and task): a restart adopts, not duplicates."""
    verb: str
    """``train-autoencoder`` or ``train-diffusion``."""
    args: list[str] = field(default_factory=list)
    """Arguments after the verb, e.g. ``["--data", d, "--output", o, "--set", "train.amp=bf16"]``."""
    nproc_per_node: int = 1
    nnodes: int = 1
    env: dict[str, str] = field(default_factory=dict)
    """Extra, non-secret environment for every process."""

    def command(self) -> list[str]:
        """The ``ldm`` command line each process runs (torchrun adds the rendezvous)."""
        return ["-m", "ldm_core.cli", self.verb, *self.args]


class Launcher(Protocol):
    def run(self, task: TrainingTask) -> None:
        """Run the task to completion; raise LaunchError if it fails."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalLauncher:
    """Runs the task on this machine: ``torchrun --standalone`` for several processes,
    a plain ``python -m ldm_core.cli`` for one. Output streams to this process's stdout
    so progress shows in the component's log."""

    def __init__(self, python: str | None = None, tail_lines: int = 40) -> None:
        self.python = python or sys.executable
        self.tail_lines = tail_lines

    def argv(self, task: TrainingTask) -> list[str]:
        if task.nnodes != 1:
            raise LaunchError(
                f"{task.name}: the local launcher runs on one node; got nnodes={task.nnodes}"
            )
        if task.nproc_per_node < 1:
            raise LaunchError(
                f"{task.name}: nproc_per_node must be >= 1, got {task.nproc_per_node}"
            )
        if task.nproc_per_node == 1:
            return [self.python, *task.command()]
        return [
            self.python,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(task.nproc_per_node),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{_free_port()}",
            *task.command(),
        ]

    def run(self, task: TrainingTask) -> None:
        argv = self.argv(task)
        env = {**os.environ, **task.env}
        if task.nproc_per_node > 1:
            # Each rank gets its share of the cores instead of all of them.
            threads = max(1, (os.cpu_count() or 1) // task.nproc_per_node)
            env.setdefault("OMP_NUM_THREADS", str(threads))
        log.info(
            "%s: launching %s", task.name, " ".join(argv[:6]) + (" ..." if len(argv) > 6 else "")
        )
        tail: list[str] = []
        with subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                tail.append(line.rstrip("\n"))
                del tail[: -self.tail_lines]
            rc = proc.wait()
        if rc != 0:
            last = "\n".join(tail[-self.tail_lines :])
            raise LaunchError(
                f"{task.name}: {task.verb} exited with code {rc}; last output:\n{last}"
            )
