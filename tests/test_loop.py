"""The shared training loop: it runs a trainer's step function with the step counter, the
data position, the non-finite guard and the log / validate / checkpoint cadence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from ldm_core.errors import LdmError
from ldm_core.train import checkpoint as ckpt
from ldm_core.train import loop
from ldm_core.train.distributed import DistEnv
from ldm_core.train.guard import NonFiniteGuard
from ldm_core.train.loader import make_loader
from ldm_core.train.metrics_log import MetricsLog
from ldm_core.train.optim import LrSchedule
from tests.harness.configs import tiny_config

ROWS = torch.arange(12, dtype=torch.float32).reshape(6, 2)


class Toy:
    """A linear model behind a step function that records what the loop asked of it.

    ``nan_at`` lists the calls (0-based, counting skipped ones) whose loss is NaN.
    """

    def __init__(self, nan_at: tuple[int, ...] = ()) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(2, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.guard = NonFiniteGuard(2, "toy")
        self.nan_at = nan_at
        self.calls: list[tuple[int, list[float]]] = []  # (step, first column of the batch)
        self.updates: list[int] = []

    @property
    def parts(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "guard": self.guard}

    def step(self, batch: list[torch.Tensor], step: int) -> loop.Step:
        (x,) = batch
        nan = len(self.calls) in self.nan_at
        self.calls.append((step, x[:, 0].tolist()))
        loss = self.model(x).pow(2).mean() * (float("nan") if nan else 1.0)

        def update() -> loop.Scalars:
            self.updates.append(step)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            return {"bias": self.model.bias.detach().sum()}

        return loop.Step(loss, update)


def run(tmp_path: Path, toy: Toy, start: int, total: int, validated: list[int] | None = None):
    cfg = tiny_config(
        "train.log_every=2",
        "train.val_every=3",
        "train.checkpoint_every=4",
        "train.keep_checkpoints=10",
    )
    loader = make_loader(TensorDataset(ROWS), 2, 1, 0, seed=0, shuffle=True)
    run = loop.Run("toy", tmp_path, cfg, DistEnv(), total)
    validate = None if validated is None else (lambda step, metrics: validated.append(step))
    last = loop.train(run, toy.step, loader, toy.parts, start=start, validate=validate)
    return last, run.checkpoints


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_steps_are_counted_from_one_and_each_cadence_includes_the_last_step(tmp_path):
    toy, validated = Toy(), []
    last, manager = run(tmp_path, toy, start=0, total=7, validated=validated)
    assert last == 7
    assert [s for s, _ in toy.calls] == toy.updates == [1, 2, 3, 4, 5, 6, 7]
    logged = metrics(tmp_path)
    assert [m["step"] for m in logged] == [2, 4, 6, 7]
    assert list(logged[0])[:4] == ["step", "split", "loss", "bias"]  # update's scalars, in order
    assert logged[-1]["bias"] == pytest.approx(toy.model.bias.item())
    assert validated == [3, 6, 7]
    assert [s for s, _ in manager.list()] == [4, 7]
    state = ckpt.load(manager.path_for(7))
    assert {"model", "optimizer", "guard", "rng", "config", "step"} <= set(state)
    torch.testing.assert_close(state["model"]["weight"], toy.model.weight)


def test_a_resumed_loop_sees_the_batches_an_uninterrupted_one_sees(tmp_path):
    straight, resumed = Toy(), Toy()
    run(tmp_path / "a", straight, start=0, total=6)
    run(tmp_path / "b", resumed, start=4, total=6)
    assert resumed.calls == straight.calls[4:]


def test_a_non_finite_step_is_skipped_logged_and_retried_on_the_next_batch(tmp_path):
    toy = Toy(nan_at=(1,))
    run(tmp_path, toy, start=0, total=3)
    assert [s for s, _ in toy.calls] == [1, 2, 2, 3]
    assert toy.updates == [1, 2, 3]
    assert toy.calls[1][1] != toy.calls[2][1]  # the retry takes the next batch
    skipped = [m for m in metrics(tmp_path) if m["loss"] is None]
    assert skipped == [
        {
            "step": 2,
            "split": "train",
            "loss": None,
            "nonfinite_total": 1,
            "time": skipped[0]["time"],
        }
    ]
    assert toy.guard.in_row == 0 and toy.guard.total == 1


def test_too_many_non_finite_steps_stop_the_run_and_the_log_is_closed(tmp_path, monkeypatch):
    closed = []
    close = MetricsLog.close
    monkeypatch.setattr(MetricsLog, "close", lambda self: closed.append(close(self)))
    toy = Toy(nan_at=(1, 2))
    with pytest.raises(LdmError, match="toy: loss was NaN/Inf for 2 steps in a row"):
        run(tmp_path, toy, start=0, total=5)
    assert toy.updates == [1] and closed == [None]
    assert [m["nonfinite_total"] for m in metrics(tmp_path) if m["loss"] is None] == [1, 2]


@pytest.mark.parametrize(
    "warmup, decay, expected",
    [
        # Linear warm-up to the base rate, then flat.
        (2, "constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        # After the warm-up: the full rate once, then a half cosine over the 4 remaining
        # steps, ending above zero (the last step still learns).
        (2, "cosine", [0.5, 1.0, 1.0, 0.8535534, 0.5, 0.1464466]),
        (0, "cosine", [1.0, 0.9330127, 0.75, 0.5, 0.25, 0.0669873]),
        # A warm-up as long as the run only warms up.
        (10, "cosine", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
    ],
)
def test_learning_rate_schedule_is_a_function_of_the_step(warmup, decay, expected):
    schedule = LrSchedule(base=1.0, total=6, warmup=warmup, decay=decay)
    assert [schedule.at(step) for step in range(1, 7)] == pytest.approx(expected, abs=1e-6)
    optimizer = torch.optim.SGD(
        [{"params": [torch.zeros(1, requires_grad=True)]}, {"params": [torch.zeros(1)]}], lr=9.0
    )
    assert schedule.apply(optimizer, 1) == pytest.approx(expected[0])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected[0]] * 2)
