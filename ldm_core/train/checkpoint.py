"""Atomic, complete training checkpoints: saving one, and resuming from the right one.

A checkpoint is written through :func:`ldm_core.io.atomic_write` (hidden temp file in the
same directory, fsynced, renamed into place, directory fsynced): a reader therefore sees
either the whole file under its final name or nothing, even if the writer is killed with
SIGKILL mid-write or the node loses power. Only files named ``ckpt-<step>.pt`` count; temp
files never match. Resuming still loads and checks the newest candidate and falls back to
the previous one if it does not load, so a damaged file costs one interval, never the run.

Both trainers describe their state the same way, as a ``parts`` dict of objects with
``state_dict`` / ``load_state_dict`` (model, optimizer, scaler, guard, EMA, discriminator,
...): :func:`save` writes those parts plus every rank's RNG state and the config, and
:func:`resume` puts them back.

Everything lives in plain types (tensors, numbers, lists, dicts) so that files load with
``torch.load(weights_only=True)``: a checkpoint is data, never code.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm_core import io
from ldm_core.config import Config
from ldm_core.errors import LdmError
from ldm_core.train import distributed
from ldm_core.train.distributed import DistEnv

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` that never leaves a partial file under ``path`` (see :mod:`ldm_core.io`)."""
    return io.atomic_write(path, lambda f: torch.save(obj, f))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint or model file written by this package (data only, no pickled code)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise LdmError(f"{path}: file not found") from None
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        raise LdmError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise LdmError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": _to_lists(random.getstate()),
        "numpy": [
            kind,
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where the devices match)."""
    random.setstate(_to_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def restore_rank_rng(
    states: list[dict[str, Any]], rank: int, world_size: int, fallback_seed: int
) -> None:
    """Give this rank back its own RNG stream from a checkpoint's per-rank states.

    With a different number of ranks than when saved, exact continuation is impossible;
    each rank then gets a fresh, distinct seed derived from the step instead.
    """
    if len(states) == world_size:
        set_rng_state(states[rank])
        return
    log.warning(
        "checkpoint holds RNG states of %d ranks but this run has %d; reseeding",
        len(states),
        world_size,
    )
    random.seed(fallback_seed + rank)
    np.random.seed((fallback_seed + rank) % 2**32)
    torch.manual_seed(fallback_seed + rank)


def _to_lists(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_to_lists(v) for v in value]
    return value


def _to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """The ``ckpt-<step>.pt`` files of one run directory: save, prune, pick the latest."""

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.dir = Path(directory)
        self.keep = max(1, keep)

    def path_for(self, step: int) -> Path:
        return self.dir / f"ckpt-{step:08d}.pt"

    def list(self) -> list[tuple[int, Path]]:
        """Finished checkpoints, oldest first (temp files and strangers are ignored)."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write the checkpoint of ``step`` atomically, then drop all but the newest ``keep``."""
        path = atomic_save({**state, "step": step}, self.path_for(step))
        for _, old in self.list()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The newest checkpoint that loads, or None when there is none.

        A file that fails to load is skipped with a warning and renamed to ``*.corrupt``:
        kept for a post-mortem, but no longer counted, so it can neither be picked later nor
        push a good checkpoint out of the ``keep`` newest.
        """
        for step, path in reversed(self.list()):
            try:
                state = load(path, map_location)
            except LdmError as e:
                log.warning("skipping unreadable checkpoint: %s", e)
                _quarantine(path)
                continue
            if state.get("step") != step:
                log.warning("skipping %s: it records step %r", path, state.get("step"))
                _quarantine(path)
                continue
            state["path"] = str(path)
            return state
        return None


def _quarantine(path: Path) -> None:
    try:
        path.replace(path.with_name(path.name + ".corrupt"))
    except OSError as e:
        log.warning("could not rename %s aside: %s", path, e)


def check_same_architecture(
    saved_cfg: dict[str, Any], current_cfg: dict[str, Any], section: str, where: Path
) -> None:
    """Refuse to resume a model with another architecture, naming the fields that differ.

    ``section`` is a config section or a single field (a setting the weights depend on as
    much as on the architecture, such as the latent space they were trained in). A saved
    config without it predates it and is not checked.
    """
    old = _dig(saved_cfg, section)
    new = _dig(current_cfg, section)
    if old is None or old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = [
            f"{section}.{k}: checkpoint {old.get(k)!r}, config {new.get(k)!r}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        ]
    else:
        diffs = [f"{section}: checkpoint {old!r}, config {new!r}"]
    raise LdmError(
        f"{where}: was trained with a different architecture ({'; '.join(diffs)}); "
        "use a new output directory or the original settings"
    )


def _dig(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def load_shared(
    manager: CheckpointManager, env: DistEnv, map_location: str | torch.device
) -> dict[str, Any] | None:
    """The checkpoint every rank resumes from: rank 0 picks it, all ranks load that file.

    Picking on one rank matters: were each rank to look for itself, a file damaged in a
    way only some ranks notice would start ranks at different steps.
    """
    chosen = None
    if env.is_main:
        state = manager.load_latest(map_location)
        chosen = state["path"] if state is not None else None
    chosen = distributed.broadcast_object(env, chosen)
    if chosen is None:
        return None
    if env.is_main:
        return state
    return load(chosen, map_location)


def restore(
    state: dict[str, Any],
    parts: dict[str, Any],
    *,
    cfg: dict[str, Any],
    arch_sections: Sequence[str],
    env: DistEnv,
    seed: int,
    optional: Collection[str] = (),
) -> int:
    """Put a resumed checkpoint back into a run; return the step to continue from.

    Refuses another architecture (``arch_sections`` of the saved vs current ``cfg``), loads
    ``state[key]`` into each of ``parts`` (objects with ``load_state_dict``), and gives this
    rank back its RNG stream. Every key must be in the checkpoint except those named in
    ``optional``, which keep their fresh state when absent (a discriminator that did not
    exist yet when the checkpoint was written).
    """
    where = Path(state["path"])
    for section in arch_sections:
        check_same_architecture(state["config"], cfg, section, where)
    for key, part in parts.items():
        if key not in state:
            if key in optional:
                continue
            raise LdmError(f"{where}: checkpoint has no {key!r}; it was not written by this stage")
        part.load_state_dict(state[key])
    step = int(state["step"])
    restore_rank_rng(state["rng"], env.rank, env.world_size, seed + step)
    return step


def resume(
    manager: CheckpointManager,
    parts: dict[str, Any],
    *,
    stage: str,
    total_steps: int,
    cfg: Config,
    arch_sections: Sequence[str],
    env: DistEnv,
    optional: Collection[str] = (),
) -> int:
    """Restore ``parts`` from the run's newest good checkpoint; return the step to continue
    from, 0 when there is none (a new run keeps its fresh parts and RNG).

    The counterpart of :func:`save`; see :func:`restore` for ``optional``. A collective:
    every rank calls it.
    """
    state = load_shared(manager, env, env.device)
    if state is None:
        return 0
    step = restore(
        state,
        parts,
        cfg=cfg.to_dict(),
        arch_sections=arch_sections,
        env=env,
        seed=cfg.train.seed,
        optional=optional,
    )
    log.info(
        "resuming %s training from %s (step %d of %d)", stage, state["path"], step, total_steps
    )
    return step


def save(
    manager: CheckpointManager, step: int, parts: dict[str, Any], *, cfg: Config, env: DistEnv
) -> None:
    """Checkpoint ``parts`` (the same dict :func:`resume` takes) at ``step``.

    A collective: every rank calls it. Each rank's RNG state is gathered, because every
    rank draws its own noise and an exact resume needs all of those streams back; rank 0
    alone writes, and the barrier lets no rank go on before the file is in place.
    """
    rng = distributed.gather_object(env, rng_state())
    if env.is_main:
        state = {key: part.state_dict() for key, part in parts.items()}
        manager.save({**state, "rng": rng, "config": cfg.to_dict()}, step)
    distributed.barrier(env)


def finished(final: Path, cfg: Config, arch_sections: Sequence[str], steps: int) -> bool:
    """True when ``final`` (a stage's finished model file) exists and was trained for at
    least ``steps`` steps; a final model of another architecture is refused (LdmError)
    rather than silently kept or overwritten."""
    if not final.exists():
        return False
    saved = load(final)
    for section in arch_sections:
        check_same_architecture(saved.get("config", {}), cfg.to_dict(), section, final)
    return int(saved.get("steps", 0)) >= steps
