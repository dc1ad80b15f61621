"""Checkpoints: atomic, complete, pruned, never a torn one, and a killed run resumes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_core.errors import LdmError
from ldm_core.train import checkpoint as ckpt
from ldm_core.train.autoencoder import train_autoencoder
from ldm_core.train.distributed import DistEnv
from ldm_core.train.guard import NonFiniteGuard
from tests.harness.configs import TINY_OVERRIDES, ae_config, tiny_config
from tests.harness.data import make_cache

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_save_leaves_no_temp_files_and_loads_as_data(tmp_path):
    path = ckpt.atomic_save({"w": torch.arange(3), "rng": ckpt.rng_state()}, tmp_path / "a.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]
    assert torch.equal(ckpt.load(path)["w"], torch.arange(3))


def test_rng_state_round_trip_restores_every_generator():
    state = ckpt.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(2))
    ckpt.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_manager_keeps_last_k_and_ignores_temp_files(tmp_path):
    manager = ckpt.CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30):
        manager.save({"x": torch.tensor(step)}, step)
    (tmp_path / ".ckpt-00000040.pt.abcd.tmp").write_bytes(b"half a file")
    assert [s for s, _ in manager.list()] == [20, 30]
    assert manager.load_latest()["step"] == 30


def test_torn_checkpoint_is_never_picked(tmp_path):
    manager = ckpt.CheckpointManager(tmp_path, keep=3)
    manager.save({"x": torch.ones(1000)}, 10)
    good = manager.path_for(10).read_bytes()
    manager.path_for(20).write_bytes(
        good[: len(good) // 2]
    )  # torn: e.g. copied by hand, disk error
    manager.path_for(30).write_bytes(b"")
    state = manager.load_latest()
    assert state is not None and state["step"] == 10
    # The torn files are set aside (kept for a post-mortem) and no longer count.
    assert [s for s, _ in manager.list()] == [10]
    assert (tmp_path / "ckpt-00000020.pt.corrupt").exists()
    # A renamed-into-place file whose recorded step disagrees with its name is refused too.
    os.replace(manager.path_for(10), manager.path_for(40))
    assert manager.load_latest() is None


def test_architecture_mismatch_names_the_fields(tmp_path):
    with pytest.raises(
        LdmError, match=r"model.unet.channels: checkpoint \[16, 32\], config \[32, 64\]"
    ):
        ckpt.check_same_architecture(
            {"model": {"unet": {"channels": [16, 32], "x": 1}}},
            {"model": {"unet": {"channels": [32, 64], "x": 1}}},
            "model.unet",
            tmp_path / "ckpt-00000010.pt",
        )


def _parts(seed: int) -> dict:
    """A model, its optimizer after one step, and a guard: what trainers checkpoint."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).square().mean().backward()
    optimizer.step()
    return {"model": model, "optimizer": optimizer, "guard": NonFiniteGuard(3, "test")}


def test_save_then_resume_puts_every_part_and_the_rng_stream_back(tmp_path):
    cfg, env = tiny_config(), DistEnv()
    manager = ckpt.CheckpointManager(tmp_path)
    assert (
        ckpt.resume(
            manager, _parts(1), stage="t", total_steps=9, cfg=cfg, env=env, arch_sections=()
        )
        == 0
    )

    saved = _parts(0)
    saved["guard"].record(False, 5)
    ckpt.save(manager, 5, saved, cfg=cfg, env=env)
    state = ckpt.load(manager.path_for(5))
    assert list(state) == ["model", "optimizer", "guard", "rng", "config", "step"]
    assert state["config"] == cfg.to_dict() and len(state["rng"]) == env.world_size
    expected_draw = torch.rand(3)

    fresh = _parts(1)
    step = ckpt.resume(
        manager, fresh, stage="t", total_steps=9, cfg=cfg, env=env, arch_sections=("model",)
    )
    assert step == 5
    assert torch.equal(torch.rand(3), expected_draw)  # this rank's RNG stream continues
    for name, value in saved["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[name], value)
    assert fresh["optimizer"].state_dict()["state"][0]["step"] == 1
    assert fresh["guard"].state_dict() == {"in_row": 1, "total": 1}


def test_resume_fills_optional_parts_only_when_the_checkpoint_has_them(tmp_path):
    cfg, env = tiny_config(), DistEnv()
    manager = ckpt.CheckpointManager(tmp_path)
    ckpt.save(manager, 2, _parts(0), cfg=cfg, env=env)
    extra = torch.nn.Linear(1, 1)
    before = {k: v.clone() for k, v in extra.state_dict().items()}
    parts = {**_parts(1), "discriminator": extra}
    kwargs = {"stage": "t", "total_steps": 4, "cfg": cfg, "env": env, "arch_sections": ()}
    assert ckpt.resume(manager, parts, optional=("discriminator",), **kwargs) == 2
    assert all(torch.equal(extra.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(LdmError, match=r"ckpt-00000002.pt: checkpoint has no 'discriminator'"):
        ckpt.resume(manager, parts, **kwargs)


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    """Full state (weights, optimizer, RNG, data position) is saved: stopping at step 3 and
    resuming to 6 gives the same weights as running 6 steps at once."""
    data = make_cache(tmp_path / "data", n_train=3, n_val=1)
    common = ("train.checkpoint_every=3", "train.val_every=3", "train.autoencoder.batch_size=2")
    straight = train_autoencoder(
        ae_config("train.autoencoder.steps=6", *common), data, tmp_path / "a"
    )
    train_autoencoder(ae_config("train.autoencoder.steps=3", *common), data, tmp_path / "b")
    resumed = train_autoencoder(
        ae_config("train.autoencoder.steps=6", *common), data, tmp_path / "b"
    )
    a = torch.load(straight / "autoencoder.pt", weights_only=True)
    b = torch.load(resumed / "autoencoder.pt", weights_only=True)
    assert b["steps"] == 6
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, msg=name)
    steps = [
        m["step"]
        for m in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines())
        if m["split"] == "train"
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_sigkill_loses_at_most_one_interval_and_resumes(tmp_path):
    data = make_cache(tmp_path / "data", n_train=2, n_val=0)
    out = tmp_path / "run"
    sets = [
        *TINY_OVERRIDES,
        "train.autoencoder.steps=14",
        "train.checkpoint_every=4",
        "train.log_every=1",
        "train.autoencoder.batch_size=1",
        "train.autoencoder.adv_start_step=1000",
        "train.threads=1",
        "train.keep_checkpoints=2",
    ]
    argv = [
        sys.executable,
        "-m",
        "ldm_core.cli",
        "train-autoencoder",
        "--data",
        str(data),
        "--output",
        str(out),
    ]
    for item in sets:
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    first = out / "checkpoints" / "ckpt-00000004.pt"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    killed_at = max(m["step"] for m in metrics)
    saved = max(s for s, _ in ckpt.CheckpointManager(out / "checkpoints").list())
    assert killed_at - saved < 4  # at most one interval of work lost
    assert not (out / "autoencoder.pt").exists()

    rerun = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (
        f"resuming autoencoder training from {out / 'checkpoints' / f'ckpt-{saved:08d}.pt'} (step {saved} of 14)"
        in rerun.stderr
    )
    final = torch.load(out / "autoencoder.pt", weights_only=True)
    assert final["steps"] == 14
    steps = [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert steps == list(range(1, 15))  # work past the checkpoint was redone, not double-logged
    assert [s for s, _ in ckpt.CheckpointManager(out / "checkpoints").list()] == [12, 14]
