"""``ldm preprocess``: raw NIfTI (Task01 layout or any folder) -> the training cache.

The cache format is fixed by :mod:`ldm_core.data.preprocessed`. This module decides which
files are subjects, checks each one before the transforms see it (so a bad file is reported by
name and reason instead of as a stack trace from deep inside MONAI), runs the transform
chain, splits subjects into train/val, and writes the volumes and the manifest.

Re-running is cheap: subjects whose raw file (sha256) and data settings are unchanged are
taken from the existing cache, and an unchanged manifest is not rewritten, so a pipeline
retry or a second ``make demo`` skips the work.

Beyond the keys the cache contract requires, the manifest records ``layout`` (msd |
folder), ``channel`` and ``channel_index``, ``data`` (the settings that shaped the cache)
and, per usable subject, its own output ``affine``. The top-level ``affine`` is the first
usable subject's: subjects from one grid (the demo's, or a registered cohort) share it, and
otherwise they differ in origin only by where each scan's field of view was centred.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from ldm_core.config import Config, DataConfig
from ldm_core.data import folder, msd
from ldm_core.data.preprocessed import FORMAT_VERSION, write_manifest
from ldm_core.errors import LdmError
from ldm_core.io import MANIFEST_JSON, atomic_write, sha256_file

log = logging.getLogger(__name__)

VOLUMES_DIR = "volumes"
PIPELINE_VERSION = 1
"""Bump when the transform chain changes what it writes, so old caches are rebuilt."""
SINGULAR_RATIO = 1e-6
"""An affine whose smallest singular value is below this fraction of its largest squeezes
the volume onto a plane or a line: no scanner geometry, and resampling it fills the grid
with copies of a few voxels."""


@dataclass(frozen=True)
class Item:
    """One candidate subject: where it came from and which volume of the file to use."""

    id: str
    path: Path
    channel: int | None
    listed_as: str = ""
    """Where the file was named (``dataset.json training[3].image``), for error messages."""


class BadInput(LdmError):
    """One input file cannot be used; with ``--skip-bad`` it is skipped, else fatal."""


def preprocess(input: Path, output: Path, cfg: Config, skip_bad: bool = False) -> Path:
    """Build (or reuse) the cache for ``input`` in ``output``; returns ``output``."""
    input, output = Path(input), Path(output)
    if not input.exists():
        raise LdmError(f"{input}: input directory not found")
    if not input.is_dir():
        raise LdmError(f"{input}: input must be a directory (Task01 layout or a folder of NIfTI)")
    layout, items = discover(input, cfg.data.channel)
    log.info("%s: %s layout, %d subjects, channel %s", input, layout, len(items), cfg.data.channel)

    settings = data_settings(cfg.data)
    channel_index = items[0].channel if items else None
    previous = _previous_entries(output, settings, layout, channel_index)
    (output / VOLUMES_DIR).mkdir(parents=True, exist_ok=True)

    entries: list[dict[str, Any]] = []
    for item in tqdm(items, desc="preprocess", unit="subject"):
        entry: dict[str, Any] = {"id": item.id, "source": _relative(item.path, input)}
        try:
            entry["sha256"] = _hash_input(item)
        except BadInput as e:
            _bad(item, str(e), entry, skip_bad)
            entries.append(entry)
            continue
        old = previous.get(item.id)
        file = f"{VOLUMES_DIR}/{item.id}.npy"
        if (
            old
            and old.get("sha256") == entry["sha256"]
            and old.get("status") == "ok"
            and (output / file).is_file()
        ):
            entry.update(file=file, status="ok", reason="", affine=old["affine"])
            entries.append(entry)
            continue
        try:
            volume, affine = _process(item, cfg.data)
        except BadInput as e:
            _bad(item, str(e), entry, skip_bad)
            entries.append(entry)
            continue
        _save_volume(output / file, volume)
        entry.update(file=file, status="ok", reason="", affine=affine.tolist())
        entries.append(entry)

    _assign_splits(entries, cfg.data.val_fraction, cfg.data.split_seed)
    ok = [e for e in entries if e["status"] == "ok"]
    manifest = {
        "format": FORMAT_VERSION,
        "layout": layout,
        "channel_index": channel_index,
        "channel": cfg.data.channel,
        "data": settings,
        "shape": list(cfg.data.shape),
        "spacing": list(cfg.data.spacing),
        "affine": ok[0]["affine"] if ok else np.eye(4).tolist(),
        "dataset_hash": dataset_hash({**settings, "channel_index": channel_index}, entries),
        "subjects": entries,
    }
    existing = _read_json(output / MANIFEST_JSON)
    if existing == manifest:
        log.info("%s: cache is up to date (dataset %s)", output, manifest["dataset_hash"][:12])
    else:
        write_manifest(output, manifest)
    _remove_stale_volumes(output, entries)
    if not ok:
        raise LdmError(
            f"{input}: no usable subjects, all {len(entries)} were skipped "
            f"(reasons in {output / MANIFEST_JSON})"
        )
    skipped = len(entries) - len(ok)
    log.info(
        "%s: %d subjects (%d train, %d val), %d skipped",
        output,
        len(ok),
        sum(e["split"] == "train" for e in ok),
        sum(e["split"] == "val" for e in ok),
        skipped,
    )
    return output


# --------------------------------------------------------------------------- inputs


def discover(root: Path, channel: str) -> tuple[str, list[Item]]:
    """Subjects under ``root``: the Task01 listing if there is a dataset.json, else every NIfTI."""
    if msd.is_msd(root):
        dataset = msd.read_dataset(root)
        index = dataset.channel_index(channel)
        items = [
            Item(s.id, s.image, index, f"{msd.DATASET_JSON} training[{i}].image")
            for i, s in enumerate(dataset.subjects)
        ]
        return "msd", items
    text = str(channel).strip()
    index = int(text) if text.isdigit() else None
    return "folder", [Item(v.id, v.path, index) for v in folder.list_volumes(root, channel)]


def _hash_input(item: Item) -> str:
    if not item.path.is_file():
        where = f" (listed in {item.listed_as})" if item.listed_as else ""
        raise BadInput(f"{item.path}: file not found{where}")
    try:
        return sha256_file(item.path)
    except OSError as e:
        raise BadInput(f"{item.path}: cannot read ({e.strerror or e})") from None


def check_header(item: Item) -> int:
    """Validate ``item``'s NIfTI header without reading the voxels; returns its volume count.

    Catches what the transforms would trip over with an obscure message, or worse pass
    through silently: unreadable or non-NIfTI files, 2D images, 5D+ images, voxel types
    that are not real numbers (complex, RGB), and geometry that is no geometry
    (:func:`check_geometry`).
    """
    path = item.path
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises many types for many kinds of damage
        raise BadInput(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise BadInput(f"{path}: not a NIfTI image ({type(img).__name__})")
    shape = img.shape
    if len(shape) < 3:
        raise BadInput(f"{path}: {len(shape)}D image of shape {shape}; a 3D volume is needed")
    if min(shape[:3]) < 2:
        raise BadInput(f"{path}: shape {shape} is a single slice, not a 3D volume")
    if len(shape) > 4:
        raise BadInput(f"{path}: {len(shape)}D image of shape {shape}; expected 3D or 4D")
    dtype = img.get_data_dtype()
    if dtype.fields is not None:
        raise BadInput(
            f"{path}: voxel type {dtype} is RGB or structured; a scalar volume is needed"
        )
    if dtype.kind not in "iuf":
        raise BadInput(f"{path}: voxel type {dtype} ({dtype.kind!r}) is not a real number type")
    check_geometry(path, img)
    return shape[3] if len(shape) == 4 else 1


def check_geometry(path: Path, img: nib.Nifti1Image | nib.Nifti2Image) -> None:
    """Refuse a header whose voxel sizes or voxel-to-world affine describe no real grid.

    nibabel repairs such headers as it loads them, and says so only in a log line: voxel
    sizes of zero become 1 mm, negative ones their absolute value. MONAI then swaps a
    non-finite or singular affine for a made-up one. Either way the volume would be
    resampled on a grid it was never acquired on. So the header is read again as it is
    written: its voxel sizes (``pixdim[1:4]``) must be positive and finite, and the affine
    nibabel uses (the sform, else the qform, else the voxel sizes alone) finite and
    invertible.
    """
    with img.file_map["image"].get_prepare_fileobj("rb") as f:
        raw = type(img.header).from_fileobj(f, check=False)
    sizes = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    if not (np.isfinite(sizes).all() and (sizes > 0).all()):
        unset = raw["qform_code"] == 0 and raw["sform_code"] == 0
        raise BadInput(
            f"{path}: voxel sizes (pixdim[1:4]) are {sizes.tolist()}; they must be positive "
            f"and finite{' (and neither qform nor sform is set)' if unset else ''}"
        )
    if raw["sform_code"] > 0:
        source = "sform"
    elif raw["qform_code"] > 0:
        source = "qform"
    else:
        source = "pixdim (qform and sform unset)"
    affine = raw.get_best_affine()
    if not np.isfinite(affine).all():
        raise BadInput(f"{path}: the affine from the {source} is not finite: {affine[:3].tolist()}")
    singular = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if singular[-1] <= SINGULAR_RATIO * singular[0]:
        raise BadInput(
            f"{path}: the affine from the {source} is singular (it maps the volume onto a "
            f"plane or a line): {affine[:3].tolist()}"
        )


def _process(item: Item, data: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    volumes = check_header(item)
    channel = item.channel
    if volumes > 1 and channel is None:
        # A configuration problem, not a bad file: stop rather than skip every subject.
        raise LdmError(
            f"{item.path}: 4D with {volumes} volumes; set data.channel to the index of the "
            f"one to use (0-{volumes - 1}), or use a Task01 folder whose dataset.json names them"
        )
    if volumes == 1 and channel is not None and channel > 0:
        raise BadInput(f"{item.path}: data.channel={channel} but the file holds a single volume")
    if volumes == 1:
        channel = None
    from ldm_core.data.transforms import load_volume  # MONAI: only when there is work to do

    try:
        return load_volume(item.path, data, channel)
    except Exception as e:  # a damaged file fails anywhere in reading or resampling
        cause: BaseException = e
        while cause.__cause__ is not None:  # MONAI wraps errors in "applying transform ..."
            cause = cause.__cause__
        text = str(cause).strip()
        reason = text.splitlines()[0] if text else type(cause).__name__
        raise BadInput(f"{item.path}: {reason}") from e


def _bad(item: Item, reason: str, entry: dict[str, Any], skip_bad: bool) -> None:
    if not skip_bad:
        raise BadInput(f"{reason} (use --skip-bad to skip such files)")
    log.warning("skipping %s", reason)
    entry.update(status="skipped", reason=reason)


# --------------------------------------------------------------------------- outputs


def data_settings(data: DataConfig) -> dict[str, Any]:
    """The data config fields that change the cache's content (not e.g. loader workers)."""
    settings = asdict(data)
    settings.pop("num_workers", None)
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as in the manifest
    settings["pipeline_version"] = PIPELINE_VERSION
    return settings


def dataset_hash(settings: dict[str, Any], entries: list[dict[str, Any]]) -> str:
    """Identity of the cache content: settings + every usable subject's raw hash and split."""
    content = {
        "format": FORMAT_VERSION,
        "settings": settings,
        "subjects": [[e["id"], e["sha256"], e["split"]] for e in entries if e["status"] == "ok"],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def split_subjects(ids: list[str], val_fraction: float, seed: int) -> set[str]:
    """Validation ids: a seeded shuffle of the sorted ids, so the split is reproducible.

    With ``val_fraction > 0`` and at least two subjects, validation gets at least one and
    training keeps at least one; ``val_fraction == 0`` asks for no validation at all.
    """
    n = len(ids)
    if n < 2 or val_fraction <= 0:
        return set()
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    return set(order[:n_val])


def _assign_splits(entries: list[dict[str, Any]], val_fraction: float, seed: int) -> None:
    ok_ids = [e["id"] for e in entries if e["status"] == "ok"]
    val = split_subjects(ok_ids, val_fraction, seed)
    for e in entries:
        if e["status"] == "ok":
            e["split"] = "val" if e["id"] in val else "train"
        else:
            e["split"] = None
            e.setdefault("file", None)
            e.setdefault("sha256", None)
    # Keep the key order stable in the manifest (id, source, sha256, split, file, status, ...).
    keys = ("id", "source", "sha256", "split", "file", "status", "reason", "affine")
    for i, e in enumerate(entries):
        entries[i] = {k: e[k] for k in keys if k in e}


def _previous_entries(
    output: Path, settings: dict[str, Any], layout: str, channel_index: int | None
) -> dict[str, dict[str, Any]]:
    """Entries of an existing cache built the same way, by subject id.

    The channel's index is compared too: the same file read through an edited dataset.json
    could name a different volume "FLAIR".
    """
    old = _read_json(output / MANIFEST_JSON)
    if (
        not isinstance(old, dict)
        or old.get("format") != FORMAT_VERSION
        or old.get("data") != settings
        or old.get("layout") != layout
        or old.get("channel_index") != channel_index
    ):
        return {}
    return {e["id"]: e for e in old.get("subjects", []) if isinstance(e, dict) and "id" in e}


def _save_volume(path: Path, volume: np.ndarray) -> None:
    """Write float16 ``[1, D, H, W]`` atomically and durably."""
    atomic_write(path, lambda f: np.save(f, volume.astype(np.float16)))


def _remove_stale_volumes(output: Path, entries: list[dict[str, Any]]) -> None:
    keep = {e["file"] for e in entries if e.get("file")}
    for path in (output / VOLUMES_DIR).glob("*"):
        if f"{VOLUMES_DIR}/{path.name}" not in keep and path.is_file():
            path.unlink()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
