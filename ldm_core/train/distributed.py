"""The process group a training stage runs in, read from the torchrun / PyTorchJob environment.

torchrun and the Kubeflow training operator both describe the group with the same
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so
one reader serves a laptop and a cluster. A process started without them is a group of
one: no process group is created and every collective below is a no-op, so the trainers
have one code path.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ldm_core.config import Config
from ldm_core.errors import LdmError

log = logging.getLogger(__name__)

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the group, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 is the only writer of checkpoints, logs and caches."""
        return self.rank == 0


def read_env(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the environment; (0, 1, 0) when absent.

    A partial environment (e.g. WORLD_SIZE without MASTER_ADDR) is an error rather than a
    silent single-process run, because it means the launcher is misconfigured and each
    process would otherwise train its own model.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or int(env["WORLD_SIZE"]) <= 1:
        return 0, 1, 0
    missing = [k for k in _ENV_KEYS if k != "LOCAL_RANK" and k not in env]
    if missing:
        raise LdmError(
            f"distributed environment: WORLD_SIZE={env['WORLD_SIZE']} but {', '.join(missing)} "
            "not set; start the job with torchrun or a PyTorchJob"
        )
    rank = int(env["RANK"])
    world = int(env["WORLD_SIZE"])
    local = int(env.get("LOCAL_RANK", rank))
    if not 0 <= rank < world:
        raise LdmError(f"distributed environment: RANK={rank} outside WORLD_SIZE={world}")
    return rank, world, local


def choose_device(requested: str, local_rank: int = 0) -> torch.device:
    """Resolve ``train.device`` (auto | cpu | cuda | cuda:N); each rank takes its local GPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested == "cpu":
            return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LdmError(
            f"train.device: {requested!r} asked for but no CUDA device is visible; "
            "set train.device=cpu (or auto)"
        )
    if requested == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(requested)


def init(cfg: Config) -> DistEnv:
    """Join the process group (if any) and pick this rank's device.

    The backend follows the device (nccl needs GPUs, gloo runs anywhere) unless
    ``train.ddp_backend`` forces one; ``train.ddp_timeout_s`` bounds how long ranks wait on
    each other, and is long by default because rank 0 may build the latent cache alone.
    """
    rank, world, local = read_env()
    device = choose_device(cfg.train.device, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = cfg.train.ddp_backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise LdmError("train.ddp_backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
        kwargs = {}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=cfg.train.ddp_timeout_s),
            **kwargs,
        )
        log.info(
            "joined process group: rank %d of %d, backend %s, device %s",
            rank,
            world,
            backend,
            device,
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device)


def barrier(env: DistEnv) -> None:
    """Wait for every rank, e.g. while rank 0 writes something the others then read."""
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_sum(env: DistEnv, tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (identity in a group of one)."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(env: DistEnv, flag: bool) -> bool:
    """True if ``flag`` is true on any rank: every rank takes the same branch."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(env: DistEnv, obj: object) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(env: DistEnv, obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank (a collective: all ranks call it)."""
    if not env.distributed:
        return [obj]
    out: list[object] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def shutdown(env: DistEnv) -> None:
    """Leave the process group so the next stage in the same process can start clean."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def check_replicas(env: DistEnv, model: torch.nn.Module, stage: str) -> list[float]:
    """Every rank's weight digest; raises LdmError if the replicas have drifted apart.

    DDP keeps replicas identical only if every rank takes the same branches (skipped
    steps, loss terms); a silent divergence would ship rank 0's weights as if all ranks
    had agreed. The digest is a position-weighted sum of all parameters, in float64.
    """
    total = torch.zeros(1, dtype=torch.float64, device=env.device)
    for i, p in enumerate(model.parameters()):
        total += p.detach().double().sum() * (i + 1)
    digests = [torch.zeros_like(total) for _ in range(env.world_size)]
    if env.distributed:
        dist.all_gather(digests, total)
    else:
        digests = [total]
    values = [float(d.item()) for d in digests]
    if env.distributed:
        log.info("%s: replica digests %s", stage, values)
        if any(v != values[0] for v in values):
            raise LdmError(
                f"{stage}: model replicas differ across ranks (digests {values}); DDP ranks "
                "diverged; check for rank-dependent code or non-deterministic collectives"
            )
    return values
