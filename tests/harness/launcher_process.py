"""A training-job launcher as its own process, as it runs in a pipeline step's pod.

``python -m tests.harness.launcher_process API_URL USER_AGENT NAMESPACE JOB KIND`` runs the
autoencoder stage as a job of KIND (``pytorchjob`` or ``trainjob``) named JOB and follows
it; a launch that fails exits 143 with the reason on stderr. Tests send it SIGTERM, which
only a process's main thread can receive.
"""

from __future__ import annotations

import logging
import sys

from ldm_core.config import load_config
from ldm_core.errors import LdmError
from ldm_core.kube.client import api_client
from ldm_core.kube.job_launcher import LauncherTiming
from ldm_core.kube.pytorchjob import PyTorchJobLauncher
from ldm_core.kube.trainjob import TrainJobLauncher
from ldm_core.launcher import TrainingTask

LAUNCHERS = {"pytorchjob": PyTorchJobLauncher, "trainjob": TrainJobLauncher}


def main(url: str, agent: str, namespace: str, job: str, kind: str) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    client = api_client(url)
    client.user_agent = agent
    cfg = load_config(
        overrides=[
            "cluster.image=registry.example/brain-ldm-training:0.1.0",
            f"cluster.namespace={namespace}",
        ]
    )
    timing = LauncherTiming(poll_s=0.05, log_reconnect_s=0.05, start_timeout_s=60, timeout_s=120)
    task = TrainingTask(name=job, verb="train-autoencoder", args=["--data", "/d", "--output", "/o"])
    try:
        LAUNCHERS[kind](cfg, "train_autoencoder", api_client=client, timing=timing).run(task)
    except LdmError as exc:
        print(f"launch failed: {exc}", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
