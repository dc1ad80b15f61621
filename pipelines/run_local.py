"""Run the whole pipeline on this machine with ``kfp.local`` -- the embedded default.

    python -m pipelines.run_local --output demo-output [--nproc 1] [--preset tiny-cpu] \
        [--set train.autoencoder.steps=50 ...] [--subjects 12] [--keep-serving]

Each stage runs as a subprocess (``SubprocessRunner``), the same component code a cluster
runs in pods. Finished stages are cached under ``OUTPUT/pipeline_root/.kfp_cache``: a
re-run with the same inputs reuses them, a changed input re-runs only what depends on it.
When the quality gate passes, the deploy stage starts a local KServe server; this script
then asks it for one sample over HTTP (Open Inference Protocol V2), prints where the
metrics, figures and generated NIfTI are and how to call the server, and stops the server
unless ``--keep-serving``.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import re
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm_core.config import DEFAULT_PRESET, PRESETS, load_config
from ldm_core.errors import LdmError
from ldm_core.io import DEPLOYMENT_JSON, METRICS_JSON

STAGES = ("download", "preprocess", "train-autoencoder", "train-diffusion", "evaluate", "deploy")
HEADLINE_METRICS = (
    "ms_ssim_ratio",
    "mmd",
    "hist_distance",
    "mask_dice",
    "detail_ratio",
    "nn_correlation",
    "fid",
)
"""The metrics the quality gate reads (and FID when computed), printed at the end."""
MODEL_METRICS = (
    "recon_ssim",
    "recon_psnr",
    "recon_lesions_kept",
    "lesion_share_generated",
    "lesion_share_real",
    "recon_ventricle_contrast_ratio",
    "ventricle_contrast_generated",
    "ventricle_contrast_real",
)
"""What the autoencoder keeps of the validation volumes, and how often samples show a lesion
and how dark their ventricles are against the real volumes, printed below them."""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK = re.compile(
    r"(Executing task|Task|Skipping conditional task|Skipping task) '?([\w-]+)'?(.*)"
)


@dataclass
class LocalRun:
    """What a local run produced; paths point into ``pipeline_root`` (cached stages'
    outputs stay where their first run wrote them)."""

    pipeline_root: Path
    gate_passed: bool
    evaluation: Path
    report: Path
    metrics: dict[str, float]
    bundle: Path
    deployment: dict[str, Any] | None
    seconds: float
    stages: dict[str, str] = field(default_factory=dict)
    """Stage -> ``ran`` | ``cached`` | ``skipped`` | ``failed``."""


class _Progress(logging.Filter):
    """Turns kfp.local's task log records into one progress line per stage event.

    A filter on the root logger rather than a handler: kfp.local swaps the root logger's
    handlers for its own while a pipeline runs, but leaves its filters alone.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__()
        self.stream = stream or sys.stderr
        self.started: dict[str, float] = {}
        self.states: dict[str, str] = {}
        self.t0 = time.monotonic()

    def filter(self, record: logging.LogRecord) -> bool:
        m = _TASK.match(_ANSI.sub("", record.getMessage()))
        if m:
            verb, task, rest = m.groups()
            if task.startswith("condition-"):  # the dsl.If group around deploy
                task = "deploy"
            if task in STAGES:
                self._observe(verb, task, rest)
        return True

    def _observe(self, verb: str, task: str, rest: str) -> None:
        n = f"[{STAGES.index(task) + 1}/{len(STAGES)}] {task}"
        now = time.monotonic()
        if verb == "Executing task":
            self.started[task] = now
            self._say(f"{n}: running")
        elif "cache hit" in rest:
            self.states[task] = "cached"
            self._say(f"{n}: reused from the cache (same inputs as a finished run)")
        elif "finished with status" in rest:
            ok = "SUCCESS" in rest
            self.states[task] = "ran" if ok else "failed"
            took = now - self.started.get(task, now)
            self._say(f"{n}: {'done' if ok else 'FAILED'} in {took:.1f} s")
        elif verb.startswith("Skipping"):
            self.states[task] = "skipped"
            self._say(f"{n}: skipped ({rest.strip(' :()') or 'condition not met'})")

    def _say(self, text: str) -> None:
        elapsed = time.monotonic() - self.t0
        print(f"==> {elapsed:6.1f}s  {text}", file=self.stream, flush=True)


def run_pipeline(
    output: str | Path,
    *,
    source: str = "demo",
    subjects: int = 0,
    preset: str = DEFAULT_PRESET,
    overrides: list[str] | None = None,
    nproc: int = 1,
    backend: str = "local",
    eval_samples: int = 0,
    eval_steps: int = 0,
    gate: dict[str, float] | None = None,
    package: str | Path | None = None,
    cache: bool = True,
) -> LocalRun:
    """Run the pipeline under kfp.local into ``output/pipeline_root``.

    ``package`` runs a compiled YAML (e.g. the checked-in one) instead of the Python
    pipeline function; ``gate`` maps ``gate_*`` parameter names to thresholds.
    """
    from kfp import local

    from pipelines.brain_ldm import brain_ldm

    overrides = list(overrides or [])
    load_config(None, preset=preset, overrides=overrides)  # fail here, not in a subprocess
    root = Path(output).resolve() / "pipeline_root"
    root.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), enable_caching=cache
    )
    pipeline = brain_ldm
    if package is not None:
        from kfp import components

        pipeline = components.load_component_from_file(str(package))
    args: dict[str, Any] = {
        "source": source,
        "subjects": subjects,
        "preset": preset,
        "overrides": overrides,
        "nproc": nproc,
        "backend": backend,
        "eval_samples": eval_samples,
        "eval_steps": eval_steps,
        **(gate or {}),
        # Training runs kept by the key of what they depend on, so a re-run that changed
        # only, say, an evaluation override reuses them.
        "local_workdir": str(Path(output).resolve() / "work"),
        # One serving state dir per output dir: a new deploy replaces the last one's server.
        "serving_dir": str(Path(output).resolve() / "serving"),
    }
    progress = _Progress()
    started_wall, t0 = time.time(), time.monotonic()
    with _observed(progress), warnings.catch_warnings():
        # The tasks carry the cluster image and GPU settings; kfp.local says it ignores them.
        warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        task = pipeline(**args)
    outputs = task.outputs
    deployment = None
    if outputs["gate_passed"]:
        deployment = _latest_deployment(root, started_wall)
    metrics_file = Path(outputs["evaluation"].path) / METRICS_JSON
    metrics = {
        k: v for k, v in json.loads(metrics_file.read_text()).items() if isinstance(v, int | float)
    }
    return LocalRun(
        pipeline_root=root,
        gate_passed=bool(outputs["gate_passed"]),
        evaluation=Path(outputs["evaluation"].path),
        report=Path(outputs["report"].path),
        metrics=metrics,
        bundle=Path(outputs["bundle"].path),
        deployment=deployment,
        seconds=time.monotonic() - t0,
        stages=dict(progress.states),
    )


@contextmanager
def _observed(progress: _Progress) -> Iterator[None]:
    """Let ``progress`` see kfp.local's task records, which it logs at INFO outside its own
    logging context; the root logger's level is restored after."""
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.INFO)
    root_logger.addFilter(progress)
    try:
        yield
    finally:
        root_logger.removeFilter(progress)
        root_logger.setLevel(level)


def _latest_deployment(root: Path, since: float) -> dict[str, Any] | None:
    """deployment.json of this run's deploy task (deploy is never cached, so it is new)."""
    found = [
        p
        for p in root.glob(f"*/deploy/deployment/{DEPLOYMENT_JSON}")
        if p.stat().st_mtime >= since - 1
    ]
    if not found:
        return None
    return json.loads(max(found, key=lambda p: p.stat().st_mtime).read_text())


# --------------------------------------------------------------------------- inference


def infer_v2(
    endpoint: str, model: str, seed: int = 0, steps: int | None = None, timeout: float = 300.0
) -> bytes:
    """One Open Inference Protocol V2 request for a gzip-NIfTI sample; returns its bytes."""
    body: dict[str, Any] = {
        "inputs": [{"name": "seed", "datatype": "INT64", "shape": [1], "data": [seed]}],
        "parameters": {"output": "nifti", **({"steps": steps} if steps else {})},
    }
    url = f"{endpoint.rstrip('/')}/v2/models/{model}/infer"
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise LdmError(
            f"POST {url}: HTTP {e.code}: {e.read().decode(errors='replace')[:300]}"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        raise LdmError(f"POST {url}: {getattr(e, 'reason', e)}") from None
    for out in answer.get("outputs", []):
        if out.get("name") == "nifti":
            return base64.b64decode(out["data"][0])
    raise LdmError(f"POST {url}: no 'nifti' output in the response: {list(answer)}")


def curl_example(endpoint: str, model: str) -> str:
    body = '{"inputs":[{"name":"seed","datatype":"INT64","shape":[1],"data":[7]}],"parameters":{"output":"nifti"}}'
    return (
        f"curl -s -X POST {endpoint.rstrip('/')}/v2/models/{model}/infer \\\n"
        f"     -H 'content-type: application/json' \\\n"
        f"     -d '{body}' \\\n"
        f'  | python -c "import sys,json,base64; '
        f"open('sample.nii.gz','wb').write(base64.b64decode(json.load(sys.stdin)['outputs'][0]['data'][0]))\""
    )


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the brain-ldm pipeline locally with kfp.local."
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="directory for everything the run writes"
    )
    parser.add_argument(
        "--nproc", type=int, default=1, help="training processes (torchrun); default 1"
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (repeatable)",
    )
    parser.add_argument(
        "--source", default="demo", help="demo | msd | http(s):// | s3:// | DIR (default demo)"
    )
    parser.add_argument(
        "--subjects",
        type=int,
        default=0,
        help="demo cohort size (default: the preset's data.demo_subjects)",
    )
    parser.add_argument(
        "--eval-steps", type=int, default=0, help="sampling steps of the evaluation"
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="run every stage even if a finished one matches (needed when the files of a "
        "--source directory changed: the cache key sees its path, not its content)",
    )
    parser.add_argument(
        "--keep-serving", action="store_true", help="leave the local model server running"
    )
    args = parser.parse_args(argv)

    try:
        result = run_pipeline(
            args.output,
            source=args.source,
            subjects=args.subjects,
            preset=args.preset,
            overrides=args.set,
            nproc=args.nproc,
            eval_steps=args.eval_steps,
            cache=not args.no_cache,
        )
    except LdmError as e:
        print(f"run_local: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # kfp.local: a task failed (its log is above)
        print(f"run_local: error: {e}", file=sys.stderr)
        return 1
    return _report(result, args.output.resolve(), args.keep_serving)


def _report(result: LocalRun, output: Path, keep_serving: bool) -> int:
    say = print
    say("")
    say(
        f"Pipeline finished in {result.seconds:.0f} s  ({', '.join(f'{k}: {v}' for k, v in result.stages.items())})"
    )
    say(f"  metrics      {result.evaluation / METRICS_JSON}")
    for names in (HEADLINE_METRICS, MODEL_METRICS):
        shown = [k for k in names if k in result.metrics]
        if shown:
            say("               " + ", ".join(f"{k}={result.metrics[k]:.4g}" for k in shown))
    say(
        f"  report       {result.evaluation / 'report.html'}  (figures: {result.evaluation / 'figures'})"
    )
    say(f"  samples      {result.evaluation / 'samples'}")
    say(f"  model bundle {result.bundle}")
    if not result.gate_passed:
        reasons = (
            json.loads((result.evaluation / METRICS_JSON).read_text())
            .get("gate", {})
            .get("reasons", [])
        )
        say("Quality gate FAILED, so nothing was deployed:")
        for reason in reasons:
            say(f"  - {reason}")
        return 2
    dep = result.deployment
    if not dep:
        print(
            "run_local: error: the gate passed but no deployment record was found", file=sys.stderr
        )
        return 1
    endpoint, model = str(dep["endpoint"]), str(dep.get("model_name", "brain-ldm"))
    generated = output / "generated" / "sample_seed0.nii.gz"
    try:
        t0 = time.monotonic()
        data = infer_v2(endpoint, model, seed=0)
        generated.parent.mkdir(parents=True, exist_ok=True)
        generated.write_bytes(data)
        say(
            f"  inference    POST {endpoint}/v2/models/{model}/infer (seed 0) -> {generated} "
            f"({len(data) / 1024:.0f} KiB, {time.monotonic() - t0:.1f} s)"
        )
        say("")
        say(
            f"Call the served model ({'still running' if keep_serving else 'stopped now; --keep-serving leaves it up'}):"
        )
        say(curl_example(endpoint, model))
    finally:
        if not keep_serving:
            from ldm_core.deploy import stop_local

            stop_local(dep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
