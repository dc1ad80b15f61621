"""One function per pipeline stage, called by the KFP component bodies.

Each stage takes plain paths and values, so the same call runs under ``kfp.local`` (the
component is a subprocess on this machine), in a cluster pod, and directly from tests.
The component layer (``components/``) only moves KFP artifacts to and from these paths.

Config travels as a preset name plus a list of ``key=value`` overrides (pipeline
parameters are strings and lists); every stage resolves it the same way and saves the
resolved ``config.yaml`` next to what it writes, so a stage's outputs say how they were
made.

Training stages start their work through a :class:`~ldm_core.launcher.Launcher`:
``local`` runs torchrun here, ``kubeflow`` creates a PyTorchJob and ``trainjob`` a Kubeflow
Trainer v2 TrainJob whose pods share a PVC with the component pod (input copied in, result
copied out), ``auto`` picks the job API the cluster serves (and never trains in the pipeline
pod itself). Training is restart-safe: a finished run whose inputs and config match is
reused (``stage.json`` records what it was made from), and an unfinished one resumes from
its checkpoints.

This module imports neither kfp nor kubernetes; the cluster launchers are imported only on
the cluster paths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ldm_core.config import Config, load_config
from ldm_core.errors import LdmError
from ldm_core.io import (
    AUTOENCODER_PT,
    CONFIG_YAML,
    DEPLOYMENT_JSON,
    STAGE_JSON,
    UNET_PT,
    atomic_write_json,
    sha256_file,
)
from ldm_core.launcher import Launcher, LocalLauncher, TrainingTask
from ldm_core.pod import in_cluster

log = logging.getLogger(__name__)

BACKENDS = ("auto", "local", "kubeflow", "trainjob")
"""Where training runs: ``local`` (torchrun in this process's machine or pod), ``kubeflow``
(a PyTorchJob, Training Operator v1), ``trainjob`` (a TrainJob, Kubeflow Trainer v2), or
``auto`` (see :func:`choose_backend`)."""
RESUME_STATE = ("checkpoints", "latents")
"""Run-dir entries that only serve resuming (and can be large); they stay in the run dir
and are left out of the copy that becomes the pipeline artifact."""
TRAINING_SECTIONS = ("data", "model", "train")
"""The config sections a training run depends on; the rest (evaluation, serving, ...) does
not change what training produces, so it stays out of the run's key."""


class StageError(LdmError):
    """A stage cannot run with the inputs it was given; the message names the input."""


# --------------------------------------------------------------------------- config


def resolve_config(preset: str, overrides: Sequence[str] = ()) -> Config:
    """The preset, then the run's overrides (configure put the pipeline parameters first in
    that list, so the user's own overrides win, as ``--set`` does on the CLI)."""
    return load_config(None, preset=preset or None, overrides=overrides)


def _save_config(cfg: Config, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_YAML
    cfg.save(path)
    return path


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _training_config(cfg: Config) -> str:
    full = cfg.to_dict()
    return json.dumps({k: full[k] for k in TRAINING_SECTIONS}, sort_keys=True)


def _dataset_hash(cache_dir: Path) -> str:
    from ldm_core.data.preprocessed import read_manifest

    return str(read_manifest(cache_dir)["dataset_hash"])


PIPELINE_PARAMETERS: dict[str, tuple[str, Any]] = {
    "image": ("cluster.image", ""),
    "step_image": ("cluster.step_image", ""),
    "pvc_name": ("cluster.pvc_name", ""),
    "nproc": ("train.nproc", 0),
    "nnodes": ("train.nnodes", 0),
    "eval_samples": ("evaluation.num_samples", 0),
    "eval_steps": ("evaluation.steps", 0),
    "eval_gpus": ("cluster.evaluate.gpus", -1),
    "gate_min_ms_ssim_ratio": ("evaluation.gate_min_ms_ssim_ratio", -1.0),
    "gate_max_mmd": ("evaluation.gate_max_mmd", -1.0),
    "gate_min_mask_dice": ("evaluation.gate_min_mask_dice", -1.0),
    "gate_max_hist_distance": ("evaluation.gate_max_hist_distance", -1.0),
    "deployment_mode": ("serving.deployment_mode", ""),
    "min_replicas": ("serving.min_replicas", -1),
    "max_replicas": ("serving.max_replicas", -1),
}
"""The config fields the pipeline shows as parameters, so the Kubeflow UI offers the common
ones: parameter -> (config field, the value that means "as the config says"). Every other
field is reached through ``overrides``; a new field needs no new plumbing, only an entry
here if the UI should show it. "Unset" is 0 for counts that cannot be 0, and -1 or the
empty string where 0 is a real value (no GPU, scale to zero)."""


def parameter_overrides(params: Mapping[str, Any]) -> list[str]:
    """The pipeline parameters that are set, as ``key=value`` config overrides.

    Raises:
        StageError: a parameter that is not in :data:`PIPELINE_PARAMETERS`.
    """
    unknown = sorted(set(params) - set(PIPELINE_PARAMETERS))
    if unknown:
        raise StageError(
            f"pipeline parameters {', '.join(unknown)}: not config parameters "
            f"(known: {', '.join(PIPELINE_PARAMETERS)})"
        )
    return [
        f"{key}={params[name]}"
        for name, (key, unset) in PIPELINE_PARAMETERS.items()
        if name in params and params[name] != unset
    ]


STEP_SECTIONS: dict[str, tuple[str, ...]] = {
    "data": ("data", "storage"),
    "training": ("data", "model", "train", "storage", "cluster"),
}
"""The config sections the data steps (download, preprocess) and the training steps read.
Configure hands them only the overrides of those sections: a step's inputs are its KFP
cache key, so a change that cannot alter its output (a gate threshold, a serving setting)
leaves it cached instead of downloading and preprocessing the data again."""


def overrides_of(overrides: Sequence[str], sections: Sequence[str]) -> list[str]:
    """The ``key=value`` overrides whose key is in one of ``sections``, in order."""
    return [item for item in overrides if item.split("=", 1)[0].split(".")[0] in sections]


class Configured(NamedTuple):
    """What the configure step hands the rest of the run: the overrides each step resolves
    its config with (every override for evaluate and deploy, those of
    :data:`STEP_SECTIONS` for the data and training steps), and the evaluate pod's size (a
    pod's size is known before it starts, so it travels as pipeline values the KFP driver
    puts into the pod spec)."""

    overrides: list[str]
    data_overrides: list[str]
    training_overrides: list[str]
    evaluate_cpu: str
    evaluate_memory: str
    evaluate_gpus: str
    """A string, like the CPU and memory: the KFP driver resolves a resource placeholder
    with the parameter's string value, and an integer output resolves to nothing there (no
    GPU limit: evaluate would crash asking for CUDA), on every backend from 2.4 on."""


def configure_stage(
    preset: str,
    overrides: Sequence[str],
    output: str | Path | None = None,
    *,
    mount_path: str = "",
    **params: Any,
) -> Configured:
    """Fold the pipeline's parameters into the run's overrides, validate the result, and
    size the steps that follow: the one place where pipeline parameters meet the config.

    ``params`` are the pipeline parameters of :data:`PIPELINE_PARAMETERS`. The user's
    ``overrides`` come after them, so they win (as ``--set`` does on the CLI). A config that
    does not validate fails the run here, naming the field, before any data is downloaded.
    ``output`` receives the resolved ``config.yaml``; ``mount_path`` is where the compiled
    pipeline mounts the PVC in the training steps (empty: no PVC, e.g. a local run).

    Raises:
        StageError: ``cluster.pvc_name`` overridden away from the ``pvc_name`` parameter, or
            ``cluster.workdir`` away from where the compiled pipeline mounts the PVC: the
            step pods mount what the pipeline says, so the config must agree.
    """
    folded = [*parameter_overrides(params), *overrides]
    cfg = resolve_config(preset, folded)
    pvc_name = params.get("pvc_name")
    if pvc_name and cfg.cluster.pvc_name != pvc_name:
        raise StageError(
            f"cluster.pvc_name: {cfg.cluster.pvc_name!r} differs from the pipeline parameter "
            f"pvc_name={pvc_name!r}, the PVC the training steps mount; set the "
            "parameter instead of the override"
        )
    if mount_path and cfg.cluster.workdir != mount_path:
        raise StageError(
            f"cluster.workdir: {cfg.cluster.workdir!r} differs from {mount_path!r}, where the "
            "compiled pipeline mounts the PVC in the training steps; leave it as it is"
        )
    if output is not None:
        _save_config(cfg, Path(output))
    ev = cfg.cluster.evaluate
    return Configured(
        folded,
        overrides_of(folded, STEP_SECTIONS["data"]),
        overrides_of(folded, STEP_SECTIONS["training"]),
        ev.cpu,
        ev.memory,
        str(ev.gpus),
    )


# --------------------------------------------------------------------------- data stages


def download_stage(
    source: str,
    output: str | Path,
    preset: str = "",
    overrides: Sequence[str] = (),
    subjects: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Fetch or generate the raw dataset into ``output`` (Decathlon Task01 layout)."""
    from ldm_core.data.download import download

    cfg = resolve_config(preset, overrides)
    out = download(source, Path(output), cfg, subjects=subjects or None, seed=seed)
    images = sorted(out.glob("imagesTr/*.nii*"))
    return {"source": source, "path": str(out), "images": len(images)}


def preprocess_stage(
    raw_dir: str | Path,
    output: str | Path,
    preset: str = "",
    overrides: Sequence[str] = (),
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Resample, crop/pad and scale the raw volumes into the training cache."""
    from ldm_core.data.preprocess import preprocess
    from ldm_core.data.preprocessed import read_manifest, subjects

    cfg = resolve_config(preset, overrides)
    out = preprocess(Path(raw_dir), Path(output), cfg, skip_bad=skip_bad)
    manifest = read_manifest(out)
    return {
        "path": str(out),
        "dataset_hash": manifest["dataset_hash"],
        "train_subjects": len(subjects(manifest, "train")),
        "val_subjects": len(subjects(manifest, "val")),
        "shape": list(manifest["shape"]),
    }


# --------------------------------------------------------------------------- launching


def choose_backend(backend: str) -> str:
    """Resolve ``auto``: ``local`` outside a cluster; inside one, ``kubeflow`` when the
    PyTorchJob API is served, else ``trainjob`` when the TrainJob API is; reject unknown names.

    In a cluster, ``auto`` never falls back to training in the pipeline's own pod (one CPU,
    no GPU): with neither API served to this pod's service account it fails, naming both
    APIs and the grant they need. ``local`` there must be asked for by name.
    """
    if backend not in BACKENDS:
        raise StageError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if not in_cluster():
        return "local"
    from ldm_core.kube import pytorchjob as pj
    from ldm_core.kube import trainjob as tj
    from ldm_core.kube.errors import PIPELINE_ROLE, RBAC_MANIFEST
    from ldm_core.kube.resources import cluster_serves

    pytorchjob, why_not_pytorchjob = cluster_serves(pj.RESOURCE)
    if pytorchjob:
        return "kubeflow"
    trainjob, why_not_trainjob = cluster_serves(tj.RESOURCE)
    if trainjob:
        return "trainjob"
    raise StageError(
        "backend auto: running in a cluster, but this pod can run no training job: "
        f"PyTorchJob (kubeflow.org/v1, Kubeflow Training Operator): {why_not_pytorchjob}; "
        f"TrainJob (trainer.kubeflow.org/v1alpha1, Kubeflow Trainer v2): {why_not_trainjob}. "
        "Install one of them, and bind the pipeline's service account to the Role "
        f"{PIPELINE_ROLE} ({RBAC_MANIFEST}: get, create, patch and delete on "
        "pytorchjobs.kubeflow.org or trainjobs.trainer.kubeflow.org); or set backend=local to "
        "train inside this pipeline pod"
    )


def _launcher(backend: str, cfg: Config, stage: str) -> Launcher:
    """How training stage ``stage`` (``train_autoencoder`` / ``train_diffusion``, its
    ``cfg.cluster`` section) starts on ``backend``."""
    if backend == "local":
        return LocalLauncher()
    from ldm_core.kube.pytorchjob import PyTorchJobLauncher
    from ldm_core.kube.trainjob import TrainJobLauncher

    return (TrainJobLauncher if backend == "trainjob" else PyTorchJobLauncher)(cfg, stage)


def _job_name(kind: str, key: str) -> str:
    # DNS-1035 label, short enough for the pods' names the operator derives from it.
    return f"ldm-{kind}-{key[:12]}"


def _finished(run_dir: Path, marker: str, key: str) -> bool:
    try:
        stage = json.loads((run_dir / STAGE_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return stage.get("key") == key and (run_dir / marker).is_file()


def _mark_finished(run_dir: Path, key: str, info: dict[str, Any]) -> None:
    """Record the run's key, written last: a run dir without it is unfinished."""
    atomic_write_json(run_dir / STAGE_JSON, {"key": key, **info})


def _copy_tree(src: Path, dst: Path, skip: Sequence[str] = ()) -> None:
    """Copy a directory (less the entries named in ``skip``), replacing ``dst``, through a
    sibling temp dir so that a killed copy never leaves a half-filled ``dst`` behind."""
    tmp = dst.with_name(f".{dst.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*skip) if skip else None)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def _train(
    *,
    kind: str,
    stage: str,
    verb: str,
    marker: str,
    key: str,
    cfg: Config,
    inputs: dict[str, Path],
    output: Path,
    backend: str,
    local_workdir: str,
) -> dict[str, Any]:
    """Run one training verb so that ``output`` ends up holding the finished run dir.

    On a cluster backend the job pods cannot see the component's artifact paths, so
    inputs are staged on the shared PVC (``cluster.workdir``) under names derived from the
    key, the job trains into a run dir there (which outlives a killed component, so a retry
    resumes or reuses it), and the result is copied to ``output``. Locally the run dir is
    ``output`` itself, or, when ``local_workdir`` is given (``run_local`` gives one), a run
    dir under it named by the key: then a pipeline re-run whose training inputs did not
    change (say, only an evaluation override did) copies the finished run instead of
    training again.
    """
    chosen = choose_backend(backend)
    name = _job_name(kind, key)
    nproc, nnodes = cfg.train.nproc, cfg.train.nnodes
    if chosen == "local":
        staged = inputs
        run_dir = Path(local_workdir) / "runs" / name if local_workdir else output
    else:
        root = Path(cfg.cluster.workdir) / "brain-ldm"
        run_dir = root / "runs" / name
        staged = {}
        for flag, src in inputs.items():
            dst = root / "inputs" / f"{name}-{flag.strip('-')}"
            if not dst.is_dir():
                _copy_tree(src, dst)
            staged[flag] = dst
    info = {
        "job": name,
        "backend": chosen,
        "nproc": nproc,
        "nnodes": nnodes,
        "run_dir": str(run_dir),
    }
    if _finished(run_dir, marker, key):
        log.info(
            "%s: finished run with the same inputs and config found in %s; reusing it",
            kind,
            run_dir,
        )
        info["reused"] = True
    else:
        config_path = _save_config(cfg, run_dir)
        args: list[str] = []
        for flag, path in staged.items():
            args += [flag, str(path)]
        args += ["--output", str(run_dir), "--config", str(config_path)]
        task = TrainingTask(name=name, verb=verb, args=args, nproc_per_node=nproc, nnodes=nnodes)
        _launcher(chosen, cfg, stage).run(task)
        if not (run_dir / marker).is_file():
            raise StageError(f"{run_dir}: {verb} returned but wrote no {marker}")
        _mark_finished(run_dir, key, info)
        info["reused"] = False
    if run_dir != output:
        _copy_tree(run_dir, output, skip=RESUME_STATE)
    return info


# --------------------------------------------------------------------------- training


def train_autoencoder_stage(
    data_dir: str | Path,
    output: str | Path,
    preset: str = "",
    overrides: Sequence[str] = (),
    backend: str = "local",
    local_workdir: str = "",
) -> dict[str, Any]:
    """Train the AutoencoderKL on the cache; ``output`` becomes the AE run dir.

    ``local_workdir``: where the local backend keeps runs by key (see :func:`_train`)."""
    cfg = resolve_config(preset, overrides)
    data = Path(data_dir)
    key = _digest("autoencoder", _training_config(cfg), _dataset_hash(data))
    info = _train(
        kind="ae",
        stage="train_autoencoder",
        verb="train-autoencoder",
        marker=AUTOENCODER_PT,
        key=key,
        cfg=cfg,
        inputs={"--data": data},
        output=Path(output),
        backend=backend,
        local_workdir=local_workdir,
    )
    return {**info, "steps": cfg.train.autoencoder.steps}


def train_diffusion_stage(
    data_dir: str | Path,
    autoencoder_dir: str | Path,
    output: str | Path,
    bundle_output: str | Path,
    preset: str = "",
    overrides: Sequence[str] = (),
    backend: str = "local",
    local_workdir: str = "",
) -> dict[str, Any]:
    """Train the latent UNet, then pack AE + UNet into the model bundle at ``bundle_output``."""
    from ldm_core.bundle import build_bundle

    cfg = resolve_config(preset, overrides)
    data, ae_dir = Path(data_dir), Path(autoencoder_dir)
    ae_weights = ae_dir / AUTOENCODER_PT
    if not ae_weights.is_file():
        raise StageError(f"{ae_dir}: no {AUTOENCODER_PT}; is this a finished autoencoder run?")
    key = _digest(
        "diffusion",
        _training_config(cfg),
        _dataset_hash(data),
        sha256_file(ae_weights),
    )
    info = _train(
        kind="ldm",
        stage="train_diffusion",
        verb="train-diffusion",
        marker=UNET_PT,
        key=key,
        cfg=cfg,
        inputs={"--data": data, "--autoencoder": ae_dir},
        output=Path(output),
        backend=backend,
        local_workdir=local_workdir,
    )
    bundle = build_bundle(ae_dir, Path(output), Path(bundle_output), data_dir=data_dir)
    return {**info, "steps": cfg.train.diffusion.steps, "bundle": str(bundle)}


# --------------------------------------------------------------------------- evaluate


def evaluate_stage(
    bundle_dir: str | Path,
    data_dir: str | Path,
    output: str | Path,
    preset: str = "",
    overrides: Sequence[str] = (),
    training_runs: Sequence[str | Path] = (),
    report_path: str | Path | None = None,
    metrics_path: str | Path | None = None,
) -> dict[str, Any]:
    """Score the bundle against the real cache and decide the quality gate.

    ``output`` receives metrics.json, figures, reports and samples; ``training_runs``
    (the AE and diffusion run dirs) add loss curves to the report, which is also copied
    to ``report_path`` (the pipeline's HTML artifact). The numeric metrics are returned
    (for a KFP Metrics artifact) and written as JSON to ``metrics_path``: kfp.local's cache
    treats an artifact without a file as missing, which would re-run evaluate every time.
    Also returns the verdict and the files written.
    """
    from ldm_core.evaluate import evaluate

    cfg = resolve_config(preset, overrides)
    out = Path(output)
    _save_config(cfg, out)
    result = evaluate(
        cfg, Path(bundle_dir), Path(data_dir), out, training_logs=[Path(p) for p in training_runs]
    )
    verdict = result["gate"]
    files = result["files"]
    if report_path is not None:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files["report_html"], report_path)
    metrics = {
        k: float(v)
        for k, v in result.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    if metrics_path is not None:
        atomic_write_json(metrics_path, metrics)
    return {
        "metrics": metrics,
        "gate_passed": bool(verdict["passed"]),
        "gate_reason": "; ".join(verdict["reasons"]) or "all quality-gate checks passed",
        "files": files,
    }


# --------------------------------------------------------------------------- deploy


def deploy_stage(
    bundle_dir: str | Path,
    output: str | Path,
    preset: str = "",
    overrides: Sequence[str] = (),
    backend: str = "local",
    storage_prefix: str = "",
    smoke_steps: int = 2,
    serving_dir: str = "",
    evaluation_dir: str | Path | None = None,
    run: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Serve the bundle (a local model server, or an InferenceService on a cluster), run
    one real inference through it, and write ``deployment.json`` into ``output``.

    ``evaluation_dir`` (the evaluate step's output) and ``run`` (the KFP run, as
    ``ldm_core.lineage.RUN_FIELDS``) complete the lineage the deployment records.

    The local server keeps its pid and log in ``serving_dir`` when given (``run_local``
    gives one per output directory, so a new deploy replaces the previous server), else in
    ``output``. On a cluster, ``{namespace}`` in ``storage_prefix`` becomes this pod's own
    namespace, the profile its S3 keys belong to (:func:`ldm_core.storage.fill_namespace`).
    Returns the deploy record with ``endpoint`` (base URL) added.
    """
    from ldm_core.deploy import deploy

    cfg = resolve_config(preset, overrides)
    if backend not in BACKENDS:
        raise StageError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    chosen = backend if backend != "auto" else ("kubeflow" if in_cluster() else "local")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    common = {"smoke_steps": smoke_steps, "evaluation_dir": evaluation_dir, "run": run}
    if chosen == "local":
        state_dir = Path(serving_dir or out)
        result = deploy(cfg, Path(bundle_dir), backend="local", state_dir=state_dir, **common)
    else:
        if not storage_prefix:
            raise StageError(
                "storage_prefix: the kubeflow backend uploads the bundle to an s3:// prefix; none given"
            )
        from ldm_core.kube.client import current_namespace
        from ldm_core.storage import fill_namespace

        result = deploy(
            cfg,
            Path(bundle_dir),
            backend="kubeflow",
            storage_prefix=fill_namespace(storage_prefix, current_namespace()),
            **common,
        )
    result = {**result, "endpoint": result.get("url")}
    atomic_write_json(out / DEPLOYMENT_JSON, result, default=str)
    return result
