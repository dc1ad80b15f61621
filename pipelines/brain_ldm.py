"""The brain-ldm pipeline: download -> preprocess -> train AE -> train LDM -> evaluate -> deploy.

Deploy runs only when evaluation passes the quality gate (``dsl.If``). The same function
runs under ``kfp.local`` (``python -m pipelines.run_local``) and compiles to the YAML a
Kubeflow cluster runs::

    python -m pipelines.brain_ldm --output pipelines/brain_ldm.yaml

The run's config (preset + ``overrides``) is the one source of truth for sizes, placement
and settings: the first step, ``configure``, folds the parameters the UI shows (image,
pvc_name, nproc, nnodes, eval_*, gate_*, deployment_mode, min/max_replicas) into the
overrides as config keys (``ldm_core.stages.PIPELINE_PARAMETERS``), validates the result,
and hands every later step that list; the
training jobs and the InferenceService are built from it (``ldm_core.config.ClusterConfig``)
and the evaluate pod is sized from configure's outputs (resource placeholders, resolved by
the KFP driver: backend 2.4.1+, as Kubeflow 1.10 ships). Task settings that KFP takes only
at compile time stay here: the shared PVC mount and the S3 Secret; ``kfp.local`` ignores them.
Training steps need little themselves: with the kubeflow (trainjob) backend they create a PyTorchJob
(TrainJob) that holds the GPUs, and they mount the PVC that job shares with them.

The compiled YAML loads on every KFP backend from 2.4 on (``pipelines.kfp_compat``): task
settings that backend 2.4 can take only as constants (the S3 Secret's name, node selectors)
are constants here, and a Secret is never optional.
"""

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes

from components import (
    configure,
    deploy,
    download,
    evaluate,
    preprocess,
    train_autoencoder,
    train_diffusion,
)
from ldm_core.config import DEFAULT_PRESET, ClusterConfig
from pipelines import kfp_compat

PIPELINE_NAME = "brain-ldm"
GPU_RESOURCE = "nvidia.com/gpu"
_CLUSTER = ClusterConfig()
WORKDIR = _CLUSTER.workdir
"""Where the shared PVC is mounted in the training steps (``cluster.workdir``, compiled in:
KFP takes a mount path only at compile time; configure refuses a run that moves it)."""
S3_SECRET = _CLUSTER.s3_secret
"""The Secret with the S3 credentials, in the run's namespace (manifests/README.md creates it):
``cluster.s3_secret``'s default, compiled in. A constant, and required with every key below:
KFP backends before 2.5 take no Secret name from a pipeline parameter, and before 2.15 no
optional Secret. (The training pods take ``cluster.s3_secret`` as the config says.)"""
S3_SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "S3_ENDPOINT": "S3_ENDPOINT",
}


class Outputs(NamedTuple):
    """What a run hands back: the evaluation (metrics.json, figures, samples), the report,
    the model bundle, and whether it passed the gate."""

    evaluation: dsl.Artifact
    metrics: dsl.Metrics
    report: dsl.HTML
    bundle: dsl.Model
    gate_passed: bool


def _resources(task: dsl.PipelineTask, cpu: str, memory: str) -> dsl.PipelineTask:
    return task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)


@kfp_compat.down_level
@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Train a 3D latent diffusion model of brain MRI, evaluate it, and serve it when it passes the quality gate.",
)
def brain_ldm(
    source: str = "demo",
    subjects: int = 0,
    seed: int = 0,
    preset: str = DEFAULT_PRESET,
    overrides: list = [],  # noqa: B006 -- a pipeline parameter default, never mutated
    nproc: int = 1,
    nnodes: int = 1,
    backend: str = "auto",
    image: str = _CLUSTER.image,
    step_image: str = _CLUSTER.step_image,
    pvc_name: str = _CLUSTER.pvc_name,
    eval_samples: int = 0,
    eval_steps: int = 0,
    eval_gpus: int = -1,
    storage_prefix: str = "s3://mlpipeline/private/{namespace}/models",
    smoke_steps: int = 2,
    deployment_mode: str = "",
    min_replicas: int = -1,
    max_replicas: int = -1,
    gate_min_ms_ssim_ratio: float = -1.0,
    gate_max_mmd: float = -1.0,
    gate_min_mask_dice: float = -1.0,
    gate_max_hist_distance: float = -1.0,
    local_workdir: str = "",
    serving_dir: str = "",
) -> Outputs:
    """Parameters (0 for counts, -1 or empty otherwise, mean "as the config says"):

    source: demo | msd | http(s)://archive | s3://bucket/prefix | a directory.
    subjects: demo cohort size (0 = the config's data.demo_subjects). seed: demo generator seed.
    preset, overrides: the run config (``tiny-cpu`` ... ``multi-gpu``) and ``key=value``
    refinements; any ``cluster.*`` / ``serving.*`` field too (``cluster.predictor.gpus=1``).
    nproc: processes (GPUs) per training pod. nnodes: training pods (PyTorchJob Master +
    Workers; 1 for the local backend). backend: auto | local | kubeflow (PyTorchJob) |
    trainjob (Kubeflow Trainer v2); auto picks the training-job API the cluster serves.
    image: image of the training job pods and of evaluate, the pods that may drive a GPU
    (cluster.image, the CUDA build of images/training). step_image: image of the other steps
    (cluster.step_image, its CPU build).
    pvc_name: PVC shared by training tasks and their PyTorchJob pods (cluster.pvc_name).
    eval_samples, eval_steps: samples and sampling steps of the evaluation.
    eval_gpus: GPUs of the evaluation pod (cluster.evaluate.gpus; the request alone places
    it on a GPU node).
    storage_prefix: s3:// prefix the cluster deploy uploads the bundle to (InferenceService
    storageUri); {namespace} becomes the run's namespace, and the default is where a profile's
    keys may write on every Kubeflow release (manifests/README.md, "Artifact store and S3").
    smoke_steps: sampling steps of the smoke inference after deploying.
    deployment_mode, min_replicas, max_replicas: the InferenceService's (serving.*):
    Serverless | RawDeployment, and 0 replicas = scale to zero (Serverless).
    gate_*: quality-gate thresholds (evaluation.gate_*); deploy runs only when all hold.
    local_workdir, serving_dir: for runs on this machine (kfp.local): where the local backend
    keeps training runs by key, so a re-run reuses them, and where the local model server
    keeps its pid and log; empty = inside each step's own output.
    """
    conf = configure(
        preset=preset,
        overrides=overrides,
        mount_path=WORKDIR,
        image=image,
        step_image=step_image,
        pvc_name=pvc_name,
        nproc=nproc,
        nnodes=nnodes,
        eval_samples=eval_samples,
        eval_steps=eval_steps,
        eval_gpus=eval_gpus,
        gate_min_ms_ssim_ratio=gate_min_ms_ssim_ratio,
        gate_max_mmd=gate_max_mmd,
        gate_min_mask_dice=gate_min_mask_dice,
        gate_max_hist_distance=gate_max_hist_distance,
        deployment_mode=deployment_mode,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
    )
    conf.set_display_name("configure")
    _resources(conf, "500m", "1Gi")
    # Every later step resolves its config from the preset and configure's overrides (the
    # data and training steps get those of the sections they read, so that changing, say,
    # a gate threshold leaves them cached), nothing else.
    run_overrides = conf.outputs["overrides"]
    data_overrides = conf.outputs["data_overrides"]
    training_overrides = conf.outputs["training_overrides"]

    dl = download(
        source=source, preset=preset, overrides=data_overrides, subjects=subjects, seed=seed
    )
    dl.set_display_name("download")
    kubernetes.use_secret_as_env(dl, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS)
    _resources(dl, "1", "2Gi")

    pre = preprocess(raw_data=dl.outputs["raw_data"], preset=preset, overrides=data_overrides)
    pre.set_display_name("preprocess")
    _resources(pre, "2", "8Gi")

    ae = train_autoencoder(
        cache=pre.outputs["cache"],
        preset=preset,
        overrides=training_overrides,
        backend=backend,
        local_workdir=local_workdir,
    )
    ae.set_display_name("train autoencoder")

    ldm = train_diffusion(
        cache=pre.outputs["cache"],
        autoencoder=ae.outputs["autoencoder"],
        preset=preset,
        overrides=training_overrides,
        backend=backend,
        local_workdir=local_workdir,
    )
    ldm.set_display_name("train diffusion")
    for task in (ae, ldm):
        _resources(task, "1", "4Gi")
        kubernetes.mount_pvc(task, pvc_name=pvc_name, mount_path=WORKDIR)
        # A retried component adopts its PyTorchJob and resumes from checkpoints on the PVC.
        task.set_retry(num_retries=2, backoff_duration="60s")

    ev = evaluate(
        bundle=ldm.outputs["bundle"],
        cache=pre.outputs["cache"],
        autoencoder=ae.outputs["autoencoder"],
        diffusion=ldm.outputs["diffusion"],
        preset=preset,
        overrides=run_overrides,
    )
    ev.set_display_name("evaluate")
    # Sized by the config (cluster.evaluate), through configure's outputs.
    ev.set_cpu_request(conf.outputs["evaluate_cpu"])
    ev.set_memory_request(conf.outputs["evaluate_memory"])
    ev.set_memory_limit(conf.outputs["evaluate_memory"])
    ev.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(conf.outputs["evaluate_gpus"])
    kubernetes.add_toleration(ev, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")

    with dsl.If(ev.outputs["Output"] == True, name="quality-gate-passed"):  # noqa: E712
        dep = deploy(
            bundle=ldm.outputs["bundle"],
            evaluation=ev.outputs["evaluation"],
            preset=preset,
            overrides=run_overrides,
            backend=backend,
            storage_prefix=storage_prefix,
            smoke_steps=smoke_steps,
            serving_dir=serving_dir,
            # The run's identity for the model's lineage: resolved by KFP backends from 2.5 on
            # (2.4.1 passes the text through, which the lineage leaves out) and by kfp.local.
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        )
        dep.set_display_name("deploy")
        kubernetes.use_secret_as_env(dep, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS)
        _resources(dep, "1", "4Gi")
        # Rolling out twice is harmless but must not be skipped: the endpoint is live state.
        dep.set_caching_options(enable_caching=False)

    for task in (conf, dl, pre, ae, ldm):
        task.set_container_image(step_image)
    dep.set_container_image(step_image)
    # Evaluate samples on train.device: a GPU preset's evaluate needs the CUDA image.
    ev.set_container_image(image)
    return Outputs(
        evaluation=ev.outputs["evaluation"],
        metrics=ev.outputs["metrics"],
        report=ev.outputs["report"],
        bundle=ldm.outputs["bundle"],
        gate_passed=ev.outputs["Output"],
    )


def compile_pipeline(output: str | Path, image: str = "", step_image: str = "") -> Path:
    """Compile the pipeline to ``output`` (YAML) and return its path; ``image`` and
    ``step_image`` replace the defaults of those parameters."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    defaults = {k: v for k, v in {"image": image, "step_image": step_image}.items() if v}
    compiler.Compiler().compile(
        brain_ldm, package_path=str(output), pipeline_parameters=defaults or None
    )
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the brain-ldm pipeline to YAML.")
    parser.add_argument("--output", default="pipelines/brain_ldm.yaml", help="YAML file to write")
    parser.add_argument(
        "--image",
        default="",
        help=f"default of the image parameter (default: {_CLUSTER.image}, cluster.image)",
    )
    parser.add_argument(
        "--step-image",
        default="",
        help="default of the step_image parameter "
        f"(default: {_CLUSTER.step_image}, cluster.step_image)",
    )
    args = parser.parse_args(argv)
    print(compile_pipeline(args.output, args.image, args.step_image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
