"""Reader for any folder of NIfTI volumes (BraTS 2021 downloads, a user's own scans).

Every ``.nii`` / ``.nii.gz`` file under the folder, at any depth, is one subject, in sorted
order of relative path so the listing (and so the train/val split) is the same on every
machine. Hidden files and directories are skipped: archives made on macOS carry ``._*``
resource forks with the same suffix that are not images.

The subject id is the file name without its suffix; if two files share a name in different
subdirectories the relative path (``/`` replaced by ``__``) keeps the ids unique.

When ``data.channel`` is a modality name and some file names carry it as a token
(``BraTS2021_00000_flair.nii.gz``), only those files are taken: a BraTS 2021 folder holds
every modality and the segmentation side by side, and a cohort should be one modality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ldm_core.data.msd import CHANNEL_ALIASES, canonical_channel, subject_id
from ldm_core.errors import LdmError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class Volume:
    id: str
    path: Path


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def list_volumes(root: str | Path, channel: str | None = None) -> list[Volume]:
    """The NIfTI files under ``root`` (recursively, sorted), optionally filtered by channel."""
    root = Path(root)
    if not root.is_dir():
        raise LdmError(f"{root}: not a directory")
    files = sorted(
        (p for p in root.rglob("*") if is_nifti(p) and p.is_file() and not _hidden(p, root)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise LdmError(f"{root}: no NIfTI files (.nii or .nii.gz) found")
    if channel is not None:
        matching = [p for p in files if _has_channel_token(p, channel)]
        if matching:
            files = matching
    ids = [subject_id(p) for p in files]
    duplicates = {i for i in ids if ids.count(i) > 1}
    volumes = []
    for path, sid in zip(files, ids):
        if sid in duplicates:
            sid = subject_id(path.relative_to(root).as_posix().replace("/", "__"))
        volumes.append(Volume(id=sid, path=path))
    return volumes


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _has_channel_token(path: Path, channel: str) -> bool:
    """Whether the file name holds ``channel`` (or an alias) as a ``_ - .`` separated token."""
    if str(channel).strip().isdigit():
        return False
    wanted = canonical_channel(channel)
    names = CHANNEL_ALIASES.get(wanted, (wanted,))
    tokens = subject_id(path).replace("-", "_").replace(".", "_").lower().split("_")
    return any(t in names for t in tokens)
