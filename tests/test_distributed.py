"""Distributed training: the torchrun/PyTorchJob environment is read right, and two CPU
processes (gloo) train one model whose replicas stay identical."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ldm_core.errors import LdmError
from ldm_core.launcher import LocalLauncher, TrainingTask
from ldm_core.train import distributed
from tests.harness.configs import TINY_OVERRIDES, tiny_config
from tests.harness.data import fake_autoencoder_run, make_cache


def test_no_environment_means_one_process():
    assert distributed.read_env({}) == (0, 1, 0)
    assert distributed.read_env({"WORLD_SIZE": "1", "RANK": "0"}) == (0, 1, 0)


def test_pytorchjob_environment_is_read():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "job-master-0",
        "MASTER_PORT": "23456",
    }
    assert distributed.read_env(env) == (3, 4, 1)


def test_partial_environment_is_an_error():
    with pytest.raises(LdmError, match="MASTER_ADDR, MASTER_PORT not set"):
        distributed.read_env({"RANK": "0", "WORLD_SIZE": "2"})


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(LdmError, match="train.device"):
        distributed.choose_device("cuda")
    assert distributed.choose_device("auto") == torch.device("cpu")


def _digests(output: str, stage: str) -> list[list[float]]:
    found = re.findall(rf"{stage}: replica digests \[([^\]]*)\]", output)
    return [[float(v) for v in line.split(",")] for line in found]


def _run(task: str, verb: str, args: list[str], sets: list[str]) -> None:
    extra = [arg for item in [*TINY_OVERRIDES, *COMMON, *sets] for arg in ("--set", item)]
    LocalLauncher().run(
        TrainingTask(task, verb, [*args, *extra], nproc_per_node=2, env={"OMP_NUM_THREADS": "1"})
    )


COMMON = ["train.checkpoint_every=2", "train.log_every=1", "train.val_every=4", "train.device=cpu"]


def _check(output: str, stage: str, run, steps: int) -> None:
    digests = _digests(output, stage)
    assert len(digests) == 2, output[-3000:]  # logged by both ranks, each seeing both
    assert all(d == digests[0] and len(d) == 2 and d[0] == d[1] for d in digests)
    assert "rank 1 of 2, backend gloo" in output
    # Only rank 0 writes: every step is logged once.
    logged = [
        m["step"]
        for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if m["split"] == "train"
    ]
    assert logged == list(range(1, steps + 1))


def test_two_cpu_processes_keep_autoencoder_replicas_identical(tmp_path, capsys):
    """torchrun --nproc-per-node 2 with gloo, discriminator (BatchNorm) included."""
    data = make_cache(tmp_path / "data", n_train=4, n_val=1)
    ae = tmp_path / "ae"
    sets = [
        "train.autoencoder.steps=4",
        "train.autoencoder.adv_start_step=2",
        "train.autoencoder.batch_size=1",
    ]
    _run("ae", "train-autoencoder", ["--data", str(data), "--output", str(ae)], sets)
    _check(capsys.readouterr().out, "autoencoder", ae, 4)
    assert torch.load(ae / "autoencoder.pt", weights_only=True)["steps"] == 4


@pytest.mark.slow
def test_two_cpu_processes_share_one_latent_cache_and_keep_unet_replicas_identical(
    tmp_path, capsys
):
    """Rank 0 encodes the latent cache while rank 1 waits on the barrier, then both train."""
    data = make_cache(tmp_path / "data", n_train=4, n_val=1)
    ae = fake_autoencoder_run(tmp_path / "ae", tiny_config(*COMMON))
    dm = tmp_path / "dm"
    sets = ["train.diffusion.steps=4", "train.diffusion.batch_size=2"]
    _run(
        "dm",
        "train-diffusion",
        ["--data", str(data), "--autoencoder", str(ae), "--output", str(dm)],
        sets,
    )
    output = capsys.readouterr().out
    _check(output, "diffusion", dm, 4)
    assert output.count("latent cache written") == 1
    assert torch.load(dm / "unet.pt", weights_only=True)["steps"] == 4
