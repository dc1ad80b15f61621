"""Training batches: a deterministic loader that shards over ranks, the endless batch
stream a resumed run re-enters at its step, and a batch's move onto the device."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ldm_core.config import Config
from ldm_core.errors import LdmError


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
    shuffle: bool,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader that gives each rank its own shard (DistributedSampler) in every case.

    Using the sampler even for one process keeps the batch order a pure function of
    (seed, epoch), which is what makes a resumed run see the same data as an uninterrupted one.
    ``pin_memory`` (for a CUDA device) puts batches in page-locked memory, so
    :func:`to_input`'s non-blocking copy overlaps the previous step's kernels; it changes no
    value.
    """
    sampler = DistributedSampler(
        dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=shuffle and len(dataset) >= world_size,
    )
    per_rank = len(sampler)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=shuffle and per_rank >= batch_size,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


def batches(loader: DataLoader, start_step: int) -> Iterator[torch.Tensor]:
    """Endless batches, resuming at the epoch (and position in it) where ``start_step`` lies."""
    per_epoch = len(loader)
    if per_epoch == 0:
        raise LdmError("training set gives no batches; lower the batch size or add subjects")
    epoch, skip = divmod(start_step, per_epoch)
    sampler = loader.sampler
    while True:
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if skip and i < skip:
                continue
            yield batch
        skip = 0
        epoch += 1


def to_input(x: torch.Tensor, cfg: Config, device: torch.device) -> torch.Tensor:
    """A batch on ``device``; the copy does not block the host when the batch is pinned."""
    x = x.to(device, non_blocking=True)
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x
