"""Lineage: what a model bundle was made from, how it scored, and where it is served.

One JSON record follows a bundle through the pipeline, each stage adding what it knows:

- ``ldm bundle`` (:func:`ldm_core.bundle.save`) writes ``lineage.json`` into the bundle: the
  dataset manifest's hash, the digest of the resolved config, the two training checkpoints
  (sha256 of the files the bundle was packed from, and their steps), the package versions
  and the bundle's own digest (the digest leaves ``lineage.json`` out, so recording it does
  not change it);
- ``ldm evaluate`` adds the metrics and the quality gate's verdict, in ``lineage.json`` of
  its output directory, and shows the record in its report;
- the deploy stage adds the KFP run (when the pipeline passes it), the images, where the
  bundle was uploaded and which InferenceService and revision serve it, and what the Model
  Registry answered (:mod:`ldm_core.registry`); the InferenceService carries the record,
  without those last two, in its :data:`ANNOTATION`.

The record is plain JSON, readable without a cluster (``ldm lineage PATH``). The functions
here are pure: each returns a new record and never touches the one it was given.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ldm_core.config import Config
from ldm_core.errors import LdmError
from ldm_core.io import DEPLOYMENT_JSON, LINEAGE_JSON, atomic_write_json, sha256_file

FORMAT_VERSION = 1
"""Version of the record's layout; a reader refuses a newer one."""
ANNOTATION = "brain-ldm/lineage"
"""The InferenceService annotation holding the record (compact JSON) the deploy rolled out.
KServe copies an InferenceService's annotations into its revisions' template, so the key is
set in the same write as the spec it describes: a later edit would start a new revision."""
SECTIONS = ("bundle", "data", "config", "checkpoints", "evaluation", "run", "images")
"""The record's sections, in the order they are shown; ``deployment`` and ``registry``
follow when a deploy added them."""
RUN_FIELDS = ("run_id", "run_name", "pipeline_name", "task_name")
"""What the record keeps of a KFP run (see :func:`run_identity`)."""
_UNRESOLVED = re.compile(r"^\{\{\$\.[^}]*\}\}$")
"""A KFP placeholder the backend passed through unresolved, e.g. ``{{$.pipeline_job_uuid}}``."""


class LineageError(LdmError):
    """A lineage record is missing, unreadable, or belongs to another bundle."""


def config_digest(cfg: Config) -> str:
    """sha256 of the resolved config as canonical JSON: two runs with the same settings have
    the same digest however their YAML was written."""
    text = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint(path: str | Path, steps: int) -> dict[str, Any]:
    """A training checkpoint as the record names it: the sha256 of its file and its steps."""
    return {"file": Path(path).name, "sha256": sha256_file(path), "steps": int(steps)}


def for_bundle(
    cfg: Config,
    *,
    bundle_digest: str,
    dataset_hash: str,
    checkpoints: Mapping[str, Mapping[str, Any]],
    package_versions: Mapping[str, str],
) -> dict[str, Any]:
    """The record of a freshly built bundle: its inputs and its identity; nothing is known
    yet of its evaluation or deployment.

    ``checkpoints`` maps ``autoencoder`` / ``diffusion`` to :func:`checkpoint`'s dicts (a
    bundle saved without its training runs gives only the steps)."""
    return {
        "format_version": FORMAT_VERSION,
        "bundle": {"digest": bundle_digest, "package_versions": dict(package_versions)},
        "data": {"dataset_hash": dataset_hash},
        "config": {"digest": config_digest(cfg), "objective": cfg.model.scheduler.objective},
        "checkpoints": {name: dict(value) for name, value in checkpoints.items()},
        "evaluation": None,
        "run": None,
        "images": None,
    }


def _with(record: Mapping[str, Any], **sections: Any) -> dict[str, Any]:
    out = copy.deepcopy(dict(record))
    out.update(copy.deepcopy(sections))
    return out


def with_evaluation(
    record: Mapping[str, Any], metrics: Mapping[str, Any], verdict: Mapping[str, Any]
) -> dict[str, Any]:
    """``record`` with the evaluation's numeric metrics and the gate's verdict."""
    numbers = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    gate = {"passed": bool(verdict.get("passed")), "reasons": list(verdict.get("reasons", []))}
    return _with(record, evaluation={"gate": gate, "metrics": numbers})


def run_identity(values: Mapping[str, Any]) -> dict[str, str] | None:
    """The KFP run a stage ran in, from what the pipeline passed it (:data:`RUN_FIELDS`), or
    None when nothing is known.

    A component learns its run from KFP placeholders (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``
    compiles to ``{{$.pipeline_job_uuid}}``). The KFP backend resolves them from 2.5.0 on
    (kubeflow/pipelines 2.5.0 backend/src/v2/driver/driver.go, "pipeline_job_uuid"); 2.4.1,
    Kubeflow 1.10.0's, hands the literal text to the component, and kfp.local 2.17 resolves
    them. An unresolved placeholder is unknown, not an identity, so it is left out.
    """
    unknown = sorted(set(values) - set(RUN_FIELDS))
    if unknown:
        raise LineageError(f"run: {unknown[0]} is not one of {', '.join(RUN_FIELDS)}")
    run = {
        key: str(value)
        for key, value in values.items()
        if value not in (None, "") and not _UNRESOLVED.match(str(value))
    }
    return run or None


def with_run(record: Mapping[str, Any], values: Mapping[str, Any] | None) -> dict[str, Any]:
    """``record`` with the KFP run of :func:`run_identity` (kept as it was when none is known)."""
    run = run_identity(values or {})
    return _with(record, run=run) if run else _with(record)


def with_images(record: Mapping[str, Any], cfg: Config) -> dict[str, Any]:
    """``record`` with the images the deploy's config names: the one that trains and
    evaluates (``cluster.image``) and the one that serves (``cluster.serving_image``)."""
    return _with(
        record, images={"training": cfg.cluster.image, "serving": cfg.cluster.serving_image}
    )


def with_evaluation_of(record: Mapping[str, Any], evaluation_dir: str | Path) -> dict[str, Any]:
    """``record`` with the evaluation recorded in ``evaluation_dir`` (``ldm evaluate``'s output).

    Raises:
        LineageError: that evaluation scored another bundle, or it wrote no lineage.
    """
    evaluated = read(Path(evaluation_dir) / LINEAGE_JSON)
    ours, theirs = record["bundle"]["digest"], (evaluated.get("bundle") or {}).get("digest")
    if theirs != ours:
        raise LineageError(
            f"{Path(evaluation_dir) / LINEAGE_JSON}: evaluates bundle {theirs}, not {ours}: "
            "pass the evaluation of the bundle being deployed"
        )
    if not evaluated.get("evaluation"):
        raise LineageError(f"{Path(evaluation_dir) / LINEAGE_JSON}: holds no evaluation")
    return _with(record, evaluation=evaluated["evaluation"])


def for_deploy(
    record: Mapping[str, Any],
    cfg: Config,
    evaluation_dir: str | Path | None = None,
    run: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A bundle's ``record`` (:func:`ldm_core.bundle.lineage`) with what a deploy knows
    before it starts: the evaluation that gated the bundle (``ldm evaluate``'s output
    directory), the KFP run, and the images of the deploy's config."""
    out = with_images(with_run(record, run), cfg)
    return out if evaluation_dir is None else with_evaluation_of(out, evaluation_dir)


def with_deployment(record: Mapping[str, Any], deployment: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with where the deploy put the bundle, from its result (see
    :func:`ldm_core.deploy.deploy`): the storage URI and the InferenceService and revision
    that serve it, or the local server's URL."""
    keep = ("backend", "storage_uri", "name", "namespace", "revision", "url", "action")
    return _with(
        record, deployment={k: deployment[k] for k in keep if deployment.get(k) is not None}
    )


def with_registry(record: Mapping[str, Any], outcome: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with what the Model Registry answered (:mod:`ldm_core.registry`)."""
    return _with(record, registry=dict(outcome))


# --------------------------------------------------------------------------- files


def write(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` atomically to ``path`` (a directory gets ``lineage.json``)."""
    path = Path(path)
    target = path / LINEAGE_JSON if path.is_dir() else path
    return atomic_write_json(target, dict(record))


def read(path: str | Path) -> dict[str, Any]:
    """The record at ``path``: a ``lineage.json``, a directory holding one, or a deploy's
    ``deployment.json`` (its ``lineage`` key), or the directory holding that.

    Raises:
        LineageError: nothing there, not JSON, or a layout newer than this version reads.
    """
    path = Path(path)
    candidates = [path / LINEAGE_JSON, path / DEPLOYMENT_JSON] if path.is_dir() else [path]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise LineageError(
            f"{path}: no lineage record ({' or '.join(p.name for p in candidates)} not found)"
        )
    try:
        data = json.loads(found.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LineageError(f"{found}: not readable as JSON ({exc})") from None
    if found.name == DEPLOYMENT_JSON:
        data = data.get("lineage")
        if not isinstance(data, dict):
            raise LineageError(f"{found}: has no 'lineage' (deployed before lineage was kept)")
    return checked(data, str(found))


def checked(data: Any, source: str) -> dict[str, Any]:
    """``data`` if it is a record this version reads, else LineageError naming ``source``."""
    if not isinstance(data, dict):
        raise LineageError(
            f"{source}: a lineage record is a JSON object, got {type(data).__name__}"
        )
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise LineageError(
            f"{source}: format_version {version!r}, this version reads {FORMAT_VERSION}"
        )
    for section in ("bundle", "data", "config"):
        if not isinstance(data.get(section), dict):
            raise LineageError(f"{source}: {section}: missing")
    return data


# --------------------------------------------------------------------------- on a cluster object


def annotation(record: Mapping[str, Any]) -> str:
    """The record as the InferenceService's :data:`ANNOTATION` value: compact JSON, without
    the deployment and registry sections (they describe the object itself, read from it)."""
    kept = {k: v for k, v in record.items() if k not in ("deployment", "registry")}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


def from_annotation(text: str, where: str) -> dict[str, Any]:
    """The record an InferenceService's :data:`ANNOTATION` holds (``where`` names the object)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineageError(f"{where}: annotation {ANNOTATION} is not JSON ({exc})") from None
    return checked(data, f"{where}: annotation {ANNOTATION}")


# --------------------------------------------------------------------------- for people


def _flatten(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, Mapping):
        rows: list[tuple[str, str]] = []
        for key, inner in value.items():
            rows += _flatten(f"{prefix}.{key}" if prefix else str(key), inner)
        return rows
    if isinstance(value, list):
        return [(prefix, "; ".join(str(v) for v in value) or "(none)")]
    if isinstance(value, float):
        return [(prefix, f"{value:.4g}")]
    return [(prefix, "(unknown)" if value is None else str(value))]


def rows(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The record as ``(field, value)`` rows in :data:`SECTIONS` order, dotted names for
    nested fields, for a report's table and ``ldm lineage``. A section nothing filled yet
    reads ``(unknown)``; package versions are left out (they are in ``bundle.json``)."""
    order = [*SECTIONS, "deployment", "registry"]
    out: list[tuple[str, str]] = []
    for section in order:
        if section not in record:
            continue
        value = record[section]
        if section == "bundle" and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k != "package_versions"}
        out += _flatten(section, value)
    return out
