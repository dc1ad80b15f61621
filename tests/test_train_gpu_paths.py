"""The training loop's GPU paths that a CPU can still decide: fused Adam on CUDA only, and
pinned loader memory for a non-blocking host-to-device copy. Their CPU results stay those of
the plain paths (the determinism tests in test_train_diffusion.py hold that bit for bit)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from ldm_core.train.loader import make_loader
from ldm_core.train.optim import adam


def test_adam_fuses_on_cuda_only():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert adam(params, 1e-3, torch.device("cuda")).param_groups[0]["fused"] is True
    cpu = adam(params, 1e-3, torch.device("cpu"))
    assert not cpu.param_groups[0]["fused"]
    assert cpu.param_groups[0]["lr"] == 1e-3


def test_a_cpu_step_of_loop_adam_is_plain_adam_bit_for_bit():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 2)
    b = torch.nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 4)
    for model, opt in (
        (a, adam(a.parameters(), 1e-2, torch.device("cpu"))),
        (b, torch.optim.Adam(b.parameters(), lr=1e-2)),
    ):
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.filterwarnings("ignore:.pin_memory. argument is set as true")
def test_loader_pins_memory_when_asked_and_keeps_the_batch_order():
    data = TensorDataset(torch.arange(8.0))
    plain = make_loader(data, 2, world_size=1, rank=0, seed=3, shuffle=True)
    pinned = make_loader(data, 2, world_size=1, rank=0, seed=3, shuffle=True, pin_memory=True)
    assert pinned.pin_memory and not plain.pin_memory
    assert [b[0].tolist() for b in plain] == [b[0].tolist() for b in pinned]
