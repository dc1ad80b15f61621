"""Reader for the Medical Segmentation Decathlon layout (Task01_BrainTumour and kin).

A Decathlon task is a directory with a ``dataset.json`` that names the modalities (the 4th
axis of each 4D image), the label values, and the training pairs
(``{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}``).
The listing in ``dataset.json`` is authoritative: the real Task01 archive also carries
macOS ``._BRATS_*`` resource forks inside ``imagesTr`` that are not images.

Errors name ``dataset.json`` and the field at fault, so a hand-edited or truncated file
is fixed in one go. Whether the listed files exist is left to the caller, which can then
report (or, with ``--skip-bad``, skip) each missing one like any other unreadable file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm_core.errors import LdmError

log = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"

# Names other datasets use for the Task01 modalities (BraTS 2021: flair, t1, t1ce, t2),
# so ``data.channel: t1ce`` finds Task01's ``t1gd``. Keys and values are lower case.
CHANNEL_ALIASES: dict[str, tuple[str, ...]] = {
    "flair": ("flair", "t2f", "t2flair", "t2-flair"),
    "t1w": ("t1w", "t1", "t1n"),
    "t1gd": ("t1gd", "t1ce", "t1c", "t1-gd", "t1post"),
    "t2w": ("t2w", "t2"),
}


@dataclass(frozen=True)
class Subject:
    """One training case: ``id`` from the image file name, paths resolved under the root."""

    id: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class MsdDataset:
    root: Path
    name: str
    modalities: dict[int, str]
    labels: dict[int, str]
    subjects: list[Subject]

    def channel_index(self, channel: str) -> int:
        """Index of ``channel`` (a modality name, any case or a known alias, or an index)."""
        return resolve_channel(channel, self.modalities, self.root / DATASET_JSON)


def is_msd(root: str | Path) -> bool:
    """Whether ``root`` looks like a Decathlon task (it holds a ``dataset.json``)."""
    return (Path(root) / DATASET_JSON).is_file()


def read_dataset(root: str | Path) -> MsdDataset:
    """Parse ``root/dataset.json`` into an :class:`MsdDataset`."""
    root = Path(root)
    path = root / DATASET_JSON
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LdmError(
            f"{path}: not found; a Decathlon task directory holds a dataset.json"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LdmError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LdmError(f"{path}: top level must be an object, got {type(data).__name__}")

    modalities = _index_map(data, "modality", path)
    labels = _index_map(data, "labels", path) if "labels" in data else {}
    training = data.get("training")
    if not isinstance(training, list):
        raise LdmError(f"{path}: field 'training' must be a list of {{image, label}} objects")
    if not training:
        raise LdmError(f"{path}: field 'training' is empty")

    subjects: list[Subject] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(training):
        where = f"training[{i}]"
        if isinstance(entry, str):  # some tasks list bare image paths
            entry = {"image": entry}
        if not isinstance(entry, dict):
            raise LdmError(f"{path}: field '{where}' must be an object with 'image' and 'label'")
        image = entry.get("image")
        if not isinstance(image, str) or not image.strip():
            raise LdmError(f"{path}: field '{where}.image' is missing or not a path")
        label = entry.get("label")
        if label is not None and not isinstance(label, str):
            raise LdmError(f"{path}: field '{where}.label' is not a path")
        image_path = _resolve(root, image, path, f"{where}.image")
        label_path = _resolve(root, label, path, f"{where}.label") if label else None
        sid = subject_id(image_path)
        if sid in seen:
            raise LdmError(
                f"{path}: field '{where}.image' repeats subject {sid!r} of training[{seen[sid]}]"
            )
        seen[sid] = i
        subjects.append(Subject(id=sid, image=image_path, label=label_path))

    num = data.get("numTraining")
    if isinstance(num, int) and num != len(subjects):
        log.warning("%s: numTraining=%d but 'training' lists %d cases", path, num, len(subjects))
    name = data.get("name", root.name)
    return MsdDataset(
        root=root,
        name=str(name),
        modalities=modalities,
        labels=labels,
        subjects=subjects,
    )


def resolve_channel(channel: str, modalities: dict[int, str], where: Path | str) -> int:
    """Map ``data.channel`` to an index of ``modalities``; errors list what is available."""
    text = str(channel).strip()
    available = ", ".join(f"{i}={n}" for i, n in sorted(modalities.items()))
    if text.lstrip("-").isdigit():
        index = int(text)
        if index not in modalities:
            raise LdmError(
                f"data.channel: index {index} is not a modality in {where} (modality: {available})"
            )
        return index
    wanted = canonical_channel(text)
    for index, name in sorted(modalities.items()):
        if canonical_channel(name) == wanted:
            return index
    raise LdmError(
        f"data.channel: {channel!r} is not a modality in {where} (modality: {available}); "
        "give one of these names or an index"
    )


def canonical_channel(name: str) -> str:
    """Lower-case name with aliases folded: ``T1ce`` and ``t1gd`` both give ``t1gd``."""
    key = name.strip().lower()
    for canonical, aliases in CHANNEL_ALIASES.items():
        if key in aliases:
            return canonical
    return key


def subject_id(path: str | Path) -> str:
    """File name without ``.nii`` / ``.nii.gz``: ``BRATS_001.nii.gz`` -> ``BRATS_001``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _index_map(data: dict[str, Any], key: str, path: Path) -> dict[int, str]:
    value = data.get(key)
    if not isinstance(value, dict) or not value:
        raise LdmError(
            f'{path}: field \'{key}\' must be an object like {{"0": "FLAIR", "1": "T1w"}}'
        )
    out: dict[int, str] = {}
    for k, v in value.items():
        if not str(k).isdigit():
            raise LdmError(f"{path}: field '{key}' has key {k!r}; keys must be indices like \"0\"")
        if not isinstance(v, str):
            raise LdmError(f"{path}: field '{key}.{k}' must be a name, got {v!r}")
        out[int(k)] = v
    return out


def _resolve(root: Path, rel: str, path: Path, field: str) -> Path:
    """Resolve a dataset.json path under ``root``; refuse ones that point outside it."""
    candidate = Path(rel)
    if candidate.is_absolute():
        raise LdmError(
            f"{path}: field '{field}' is an absolute path ({rel}); expected ./imagesTr/..."
        )
    if ".." in candidate.parts:
        raise LdmError(f"{path}: field '{field}' leaves the dataset directory ({rel})")
    return root / candidate
