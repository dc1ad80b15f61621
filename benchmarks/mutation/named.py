"""The named mutations: defects the fast tests once let through.

Each case is one exact text replacement in one source file (a regular expression where
several lines go). It is applied to a temporary copy of the tree and the case's fast test
files run there (``pytest -x``, the copy first on ``PYTHONPATH``, so subprocesses such as
the model server import the mutated code too). A case is ``killed`` when a test fails,
``survived`` when every test passes; a case whose text is no longer in its file is
``stale`` (the code moved on: update the case, never drop it). Before the cases, the same
test files run once on the unmutated copy, so a failure is the mutation's, not the tree's.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.mutation.targets import ROOT

#: Left out of the temporary copy: environments, caches and run outputs.
_NOT_COPIED = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "mutants",
    "demo-output",
    "runs",
    ".whl",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
)
_SUMMARY_LINE = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


@dataclass(frozen=True)
class Mutation:
    """One defect, as a text replacement.

    Args:
        name: short identifier (``<point>-<what>``).
        point: the area the defect is in: ``a`` the quality gate, ``b`` the rollout,
            ``c`` the smoke check, ``d`` the training launcher, ``e`` sampling.
        path: the source file, relative to the repository root.
        old: the text to replace; a regular expression (``re.MULTILINE``) when ``regex``.
        new: what replaces it.
        tests: the fast test files that must catch it.
        regex: ``old`` is a pattern; every match is replaced.
    """

    name: str
    point: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    regex: bool = False

    def apply(self, source: str) -> str | None:
        """``source`` mutated, or None when ``old`` is not there exactly (once, unless a
        pattern)."""
        if self.regex:
            mutated, count = re.subn(self.old, self.new, source, flags=re.MULTILINE)
            return mutated if count else None
        if source.count(self.old) != 1:
            return None
        return source.replace(self.old, self.new)


_ROLLOUT_TESTS = ("tests/test_isvc_status.py", "tests/test_isvc_rollout.py")
_SMOKE_TESTS = ("tests/test_deploy_local.py", "tests/test_isvc_rollout.py")
_LAUNCHER_TESTS = ("tests/test_pytorchjob.py",)

MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "a-gate-without-ms-ssim-ratio",
        "a",
        "ldm_core/gate.py",
        # every check of the ratio (a lower bound, and an upper one where there is one)
        r'^[ \t]*\("ms_ssim_ratio",[^\n]*\n',
        "",
        ("tests/test_evaluate.py", "tests/test_evaluate_gate.py"),
        regex=True,
    ),
    Mutation(
        "b-rollout-trusts-observed-generation",
        "b",
        "ldm_core/kube/isvc_status.py",
        "    if created is None or created == previous_revision:\n",
        '    if status.get("observedGeneration") != (obj.get("metadata") or {}).get("generation"):\n',
        _ROLLOUT_TESTS,
    ),
    Mutation(
        "b-rollout-without-new-revision-check",
        "b",
        "ldm_core/kube/isvc_status.py",
        "    if created is None or created == previous_revision:\n",
        "    if created is None:\n",
        _ROLLOUT_TESTS,
    ),
    Mutation(
        "b-promotion-without-revision-identity",
        "b",
        "ldm_core/kube/isvc_status.py",
        "    if revision is not None and state.revision != revision:\n",
        "    if False:\n",
        _ROLLOUT_TESTS,
    ),
    Mutation(
        "c-smoke-without-shape-check",
        "c",
        "ldm_core/smoke.py",
        "    if list(volume.shape) != expected:\n",
        "    if False:\n",
        _SMOKE_TESTS,
    ),
    Mutation(
        "c-smoke-without-bundle-shape-check",
        "c",
        "ldm_core/smoke.py",
        "    if bundle is not None and list(volume.shape[2:]) != list(bundle.image_shape):\n",
        "    if False:\n",
        _SMOKE_TESTS,
    ),
    Mutation(
        "c-smoke-without-affine-check",
        "c",
        "ldm_core/smoke.py",
        "    if bundle is not None and not np.allclose(affine, bundle.affine, rtol=1e-5, atol=1e-4):\n",
        "    if False:\n",
        _SMOKE_TESTS,
    ),
    Mutation(
        "c-smoke-without-digest-check",
        "c",
        "ldm_core/smoke.py",
        "    if bundle is not None and served != bundle.digest:\n",
        "    if False:\n",
        _SMOKE_TESTS,
    ),
    Mutation(
        "d-launcher-without-condition-status-true",
        "d",
        "ldm_core/kube/job_launcher.py",
        '    return [c for c in conditions(job) if str(c.get("status")) == "True"]\n',
        "    return conditions(job)\n",
        _LAUNCHER_TESTS,
    ),
    Mutation(
        "d-launcher-eviction-fatal-under-exitcode",
        "d",
        "ldm_core/kube/pytorchjob.py",
        '    evicted = [p for p in pods if _is_evicted(p)] if restart_policy != "ExitCode" else []\n',
        "    evicted = [p for p in pods if _is_evicted(p)]\n",
        _LAUNCHER_TESTS,
    ),
    Mutation(
        "e-decode-multiplies-scale-factor",
        "e",
        "ldm_core/sample.py",
        "latents / bundle.scale_factor",
        "latents * bundle.scale_factor",
        ("tests/test_sample_trained.py", "tests/test_sample.py"),
    ),
)


def copy_tree(dest: Path) -> Path:
    """The working tree (tracked or not, without environments and outputs) under ``dest``."""
    return Path(shutil.copytree(ROOT, dest / "tree", ignore=_NOT_COPIED, symlinks=True))


def run_tests(tree: Path, tests: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
    """``pytest -x`` over ``tests`` in ``tree``: outcome (passed | failed | timeout | error),
    the failing test ids, seconds, and the output's tail when it is neither pass nor fail.

    pytest runs in a session of its own, so a timeout also ends the servers it started."""
    argv = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"outcome": "timeout", "seconds": round(time.monotonic() - started, 1)}
    outcome = {0: "passed", 1: "failed"}.get(proc.returncode, "error")
    result: dict[str, Any] = {
        "outcome": outcome,
        "failed_tests": [test for _, test in _SUMMARY_LINE.findall(output)],
        "seconds": round(time.monotonic() - started, 1),
    }
    if outcome == "error":
        result["output_tail"] = output[-2000:]
    return result


def check(mutation: Mutation, timeout_s: float) -> dict[str, Any]:
    """Apply ``mutation`` to a fresh copy of the tree and run its tests there."""
    report: dict[str, Any] = {"name": mutation.name, "point": mutation.point}
    source = (ROOT / mutation.path).read_text()
    mutated = mutation.apply(source)
    if mutated is None:
        print(f"named: {mutation.name}: stale", file=sys.stderr)
        return {**report, "status": "stale", "detail": f"{mutation.path}: text not found"}
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        tree = copy_tree(Path(tmp))
        (tree / mutation.path).write_text(mutated)
        run = run_tests(tree, mutation.tests, timeout_s)
    status = {"failed": "killed", "passed": "survived"}.get(run["outcome"], run["outcome"])
    print(f"named: {mutation.name}: {status} ({run['seconds']:.0f} s)", file=sys.stderr)
    return {**report, "status": status, **run}


def baseline(timeout_s: float) -> dict[str, Any]:
    """Every case's test files on the unmutated tree; they must pass."""
    tests = tuple(dict.fromkeys(t for m in MUTATIONS for t in m.tests))
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        return run_tests(copy_tree(Path(tmp)), tests, timeout_s)


def run_named(jobs: int, timeout_s: float) -> dict[str, Any]:
    """The baseline, then every case (``jobs`` at a time): one JSON-ready dict."""
    started = time.monotonic()
    clean = baseline(timeout_s)
    print(f"named: baseline {clean['outcome']} ({clean['seconds']:.0f} s)", file=sys.stderr)
    if clean["outcome"] != "passed":
        return {"baseline": clean, "cases": [], "ok": False}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        cases = list(pool.map(lambda m: check(m, timeout_s), MUTATIONS))
    return {
        "baseline": clean,
        "cases": cases,
        "killed": sum(c["status"] == "killed" for c in cases),
        "total": len(cases),
        "ok": all(c["status"] == "killed" for c in cases),
        "seconds": round(time.monotonic() - started, 1),
    }
